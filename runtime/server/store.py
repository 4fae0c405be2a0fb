"""Conversations' compressed KV state in Redis, shared by server replicas.

A conversation's cache is written through to Redis after every turn as a *session blob* — the
session-file bytes of :mod:`tqedge.runtime.session_file` (the TurboQuant codes as stored,
checksummed, bound to the bundle + cache-configuration fingerprint, no pickle) — so that any
replica can continue it, and a replica that dies loses nothing.

Keys (``P`` = prefix, ``F`` = fingerprint, ``H(x)`` = SHA-256 of the token ids ``x`` as int32 LE)::

    P:blob:F:H(ids[:n])   the blob of a conversation whose cache holds the n tokens ids[:n]
    P:idx:F:H(ids[:R])    sorted set of the n stored under the same first R = ROOT_TOKENS ids

A new request finds the longest stored prefix of its ids with one ZREVRANGEBYSCORE on its root
index and one pipelined EXISTS over the candidates. Both kinds of key carry a TTL; the Redis
server's own ``maxmemory`` + ``allkeys-lru`` policy bounds memory (see docs/SCALE.md).
Conversations shorter than ``ROOT_TOKENS`` are not stored (recomputing them is cheap).

Writes run on one background thread (off the reply's path); a Redis that is down is logged
once per outage and the server keeps serving (conversations then recompute).
"""

from __future__ import annotations

import hashlib
import logging
import queue
import threading
from urllib.parse import urlparse

import numpy as np

from tqedge.errors import TqedgeError

log = logging.getLogger(__name__)

ROOT_TOKENS = 32  # ids that name a conversation's index (the chat template's head + first words)
MAX_CANDIDATES = 64  # stored lengths looked at per lookup (newest turns of the longest prefixes)
DEFAULT_TTL_S = 7 * 24 * 3600
WRITE_QUEUE = 64  # pending write-throughs; beyond that the oldest are dropped (logged)


def ids_hash(ids) -> str:
    """Hex SHA-256 of token ids (int32 little-endian)."""
    return hashlib.sha256(np.asarray(ids, dtype="<i4").tobytes()).hexdigest()


def check_url(url: str) -> str:
    """Validate a ``redis://`` / ``rediss://`` / ``unix://`` URL; returns it (one-line error if not)."""
    u = urlparse(url)
    if u.scheme not in ("redis", "rediss", "unix") or (u.scheme != "unix" and not u.hostname):
        raise TqedgeError(f"--store must be redis://HOST:PORT[/DB] (or rediss://, unix://), not {url!r}")
    return url


class RedisStore:
    """Session blobs in Redis (see the module docstring).

    Args:
        url: ``redis://host:port/db``.
        fingerprint: the bundle + cache-configuration fingerprint blobs are bound to.
        ttl_s: expiry of every key, refreshed on write.
        prefix: key namespace.
        client: an existing ``redis.Redis`` (tests); default: one made from ``url``.
    """

    def __init__(self, url: str, fingerprint: str, ttl_s: int = DEFAULT_TTL_S, prefix: str = "tqedge",
                 client=None):
        try:
            import redis
        except ImportError:
            raise TqedgeError('--store needs the "scale" extra: pip install "tqedge[scale]"') from None
        self._errors = (redis.RedisError, OSError)
        self.url, self.fp, self.ttl, self.prefix = check_url(url), fingerprint, int(ttl_s), prefix
        self.r = client or redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=2)
        self.counters = dict(written=0, write_errors=0, hits=0, misses=0, read_errors=0, dropped=0)
        self._down = False
        self._q: queue.Queue = queue.Queue(WRITE_QUEUE)
        self._writer = threading.Thread(target=self._write_loop, name="tqedge-store", daemon=True)
        self._writer.start()

    # -- keys -------------------------------------------------------------------------------
    def _blob_key(self, ids) -> str:
        return f"{self.prefix}:blob:{self.fp}:{ids_hash(ids)}"

    def _idx_key(self, ids) -> str:
        return f"{self.prefix}:idx:{self.fp}:{ids_hash(ids[:ROOT_TOKENS])}"

    # -- writing ----------------------------------------------------------------------------
    def put(self, ids: list[int], blob: bytes) -> bool:
        """Queue ``blob`` (a cache holding exactly ``ids``) for writing; False if not stored."""
        if len(ids) < ROOT_TOKENS:
            return False
        try:
            self._q.put_nowait((list(ids), blob))
        except queue.Full:
            self.counters["dropped"] += 1
            log.warning("store: write queue full; a conversation state was not written")
            return False
        return True

    def flush(self, timeout: float = 10.0) -> None:
        """Wait until every queued write has been attempted (tests, shutdown)."""
        done = threading.Event()
        self._q.put((None, done))
        done.wait(timeout)

    def close(self) -> None:
        """Finish queued writes and stop the writer."""
        self.flush()
        self._q.put((None, None))
        self._writer.join(timeout=5)

    def _write_loop(self) -> None:
        while True:
            ids, blob = self._q.get()
            if ids is None:
                if blob is None:
                    return
                blob.set()  # a flush marker
                continue
            try:
                p = self.r.pipeline(transaction=True)
                p.set(self._blob_key(ids), blob, ex=self.ttl)
                p.zadd(self._idx_key(ids), {str(len(ids)): len(ids)})
                p.expire(self._idx_key(ids), self.ttl)
                p.execute()
                self.counters["written"] += 1
                self._up()
            except self._errors as e:
                self.counters["write_errors"] += 1
                self._fail(e)

    # -- reading ----------------------------------------------------------------------------
    def longest_prefix(self, ids: list[int]) -> tuple[int, bytes] | None:
        """The longest stored state whose ids are a proper prefix of ``ids``: ``(n, blob)``.

        Returns None on a miss or when Redis is unreachable (logged; the caller recomputes).
        """
        if len(ids) <= ROOT_TOKENS:
            return None
        try:
            found = [int(n) for n in self.r.zrevrangebyscore(self._idx_key(ids), len(ids) - 1, ROOT_TOKENS,
                                                             start=0, num=MAX_CANDIDATES)]
            p = self.r.pipeline(transaction=False)
            for n in found:  # candidates of other conversations under the same root miss here
                p.exists(self._blob_key(ids[:n]))
            for n, there in zip(found, p.execute() if found else []):
                blob = self.r.get(self._blob_key(ids[:n])) if there else None
                if blob is not None:  # (it may have expired between the two calls)
                    self.counters["hits"] += 1
                    self._up()
                    return n, bytes(blob)
            self._up()
        except self._errors as e:
            self.counters["read_errors"] += 1
            self._fail(e)
            return None
        self.counters["misses"] += 1
        return None

    def _fail(self, e) -> None:
        if not self._down:
            log.warning("store %s unreachable (%s); serving without it, conversations recompute", self.url, e)
        self._down = True

    def _up(self) -> None:
        if self._down:
            log.info("store %s reachable again", self.url)
        self._down = False

"""Conversations of the server: caches carved from one KV budget, prefix matching, LRU to disk.

The global budget (``--kv-budget``) is cut into fixed per-conversation caches
(``--session-budget``, default budget / max_sessions); at most ``slots`` of them exist, each
preallocated once and reused. A request *extends* a known conversation when its rendered
token ids start with the ids of that conversation's previous prompt: the conversation's cache
is reused, trimmed back to the common prefix if the reply re-tokenized differently, and only
the new tokens are prefilled.

With a shared store (:mod:`tqedge.runtime.server.store`, Redis), every finished turn is also
written through as a compressed blob, and a request that extends a conversation held by
another replica (or by a replica that died) is continued from the longest stored prefix
instead of recomputed.

When a new conversation needs a cache and all are taken, the least recently used idle one is
written to disk in compressed form (:mod:`tqedge.runtime.session_file`: the TurboQuant codes
as stored) and its cache handed over. When that conversation comes back, its file is loaded
into a cache bit-exactly; a corrupt or mismatched file is logged, deleted and the conversation
recomputed from its messages.

Threading: the engine's worker thread is the only caller that changes state; a lock makes
``snapshot`` (``/v1/stats``, from the event loop) safe to call at any time.
"""

from __future__ import annotations

import itertools
import logging
import os
import shutil
import tempfile
import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

from tqedge.errors import TqedgeError
from tqedge.runtime import session_file as SF
from tqedge.runtime.chat import common_prefix
from tqedge.units import format_bytes, parse_bytes

log = logging.getLogger(__name__)

SUFFIX = ".tqs"


@dataclass
class Session:
    """One conversation.

    Attributes:
        sid: id (also its file name on disk).
        ids: the tokens of the conversation so far: last prompt + generated reply (the cache
            holds the first ``cache.offset`` of them).
        prompt_len: length of the last prompt; a request whose ids start with ``ids[:prompt_len]``
            continues this conversation.
        cache: its cache while in memory, None while on disk.
        busy: a generation is running on it.
    """

    sid: str
    ids: list[int] = field(default_factory=list)
    prompt_len: int = 0
    cache: object | None = None
    busy: bool = False
    last_used: float = field(default_factory=time.monotonic)

    def match(self, ids: list[int]) -> int:
        """Common prefix with ``ids`` if they extend this conversation, else -1."""
        if not self.prompt_len:
            return -1
        n = common_prefix(self.ids, ids)
        return n if n >= self.prompt_len else -1


@dataclass
class Acquired:
    """A session ready to generate: feed ``new`` (≥ 1 token); ``cached`` prompt tokens were reused."""

    session: Session
    new: list[int]
    cached: int
    restored: bool = False


class SessionManager:
    """Budget-carved caches for conversations, with LRU eviction to disk (see module docstring).

    Args:
        model: the loaded model (``new_cache``, ``manifest``).
        kv_budget: global KV budget (bytes or "256MiB").
        max_sessions: most conversations held in memory at once.
        session_budget: budget of one conversation's cache (default kv_budget / max_sessions).
        kv_bits: cache bits ("4,3", "exact", None = the bundle default).
        session_dir: folder for evicted conversations (default: a temp folder, removed on close).
        max_disk_sessions: evicted conversations kept on disk; the oldest files are deleted.
        store: a shared store URL (``redis://host:port``) for write-through conversation state.
    """

    def __init__(self, model, kv_budget="256MiB", max_sessions: int = 4, session_budget=None,
                 kv_bits=None, session_dir=None, max_disk_sessions: int = 256, store: str | None = None):
        self.model = model
        self.budget = parse_bytes(kv_budget)
        if max_sessions < 1:
            raise TqedgeError(f"--max-sessions must be ≥ 1, not {max_sessions}")
        self.session_budget = parse_bytes(session_budget) if session_budget else self.budget // max_sessions
        self.slots = min(max_sessions, self.budget // max(self.session_budget, 1))
        if self.slots < 1:
            raise TqedgeError(f"session budget {format_bytes(self.session_budget)} exceeds the KV budget "
                              f"{format_bytes(self.budget)}")
        self.cache_opts = {"kv_budget": self.session_budget, "kv_bits": kv_bits}
        first = model.new_cache(**self.cache_opts)  # validates the budget now, not on the first request
        self.fingerprint = SF.fingerprint(model.manifest, first)
        self.cache_bytes, self.capacity = int(first.nbytes), int(first.capacity)  # of one conversation
        self.free: list = [first]
        self.n_caches = 1
        self.active: OrderedDict[str, Session] = OrderedDict()  # LRU order: oldest first
        self.on_disk: OrderedDict[str, Session] = OrderedDict()
        self._own_dir = session_dir is None
        self.dir = Path(tempfile.mkdtemp(prefix="tqedge-sessions-") if session_dir is None else session_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.max_disk = max_disk_sessions
        self.counters = dict(evicted=0, restored=0, discarded=0, reused=0, new=0, from_store=0)
        self.lock = threading.RLock()
        self.store = None
        if store:
            from tqedge.runtime.server.store import RedisStore

            self.store = RedisStore(store, self.fingerprint)
        if not self._own_dir:
            self._index_dir()

    # -- public -----------------------------------------------------------------------------
    def can_admit(self) -> bool:
        """Whether :meth:`acquire` would find a cache now (free, creatable or evictable)."""
        return bool(self.free) or self.n_caches < self.slots or any(not s.busy for s in self.active.values())

    def acquire(self, ids: list[int], align: int = 1) -> Acquired | None:
        """Find (or start) the conversation ``ids`` continue and bring its cache to a prefix of them.

        Args:
            ids: the request's prompt token ids.
            align: a reused prefix that ends inside the previous prompt (a request sent again,
                or a shorter version of it) is cut back to a multiple of this many tokens (the
                batcher's prompt chunk), so the rest is fed in the same chunks as the first time
                and the greedy reply is the same. A prefix reaching into the previous reply is
                reused whole: those tokens were decoded one at a time, so no re-chunking would
                make the cache equal a fresh prefill of them.

        Returns:
            An :class:`Acquired` (the session is marked busy), or None when every cache is busy.
        """
        with self.lock:
            return self._acquire(ids, max(1, int(align)))

    def _acquire(self, ids: list[int], align: int) -> Acquired | None:
        best, best_n = None, -1
        for s in itertools.chain(self.active.values(), self.on_disk.values()):
            n = -1 if s.busy else s.match(ids)
            if n > best_n:
                best, best_n = s, n
        if self.store is not None:
            got = self._from_store(ids, best_n, align)
            if got is not None:
                return got
        if best is None or best_n < 0:
            return self._start(ids)
        restored = False
        if best.cache is None:  # on disk: load it into a cache
            cache = self._take_cache()
            if cache is None:
                return None
            if not self._restore(best, cache):
                return self._start(ids, cache)
            restored = True
        best.busy = True
        self.active[best.sid] = best
        self.active.move_to_end(best.sid)
        self.counters["reused"] += 1
        return self._sync(best, ids, restored, align)

    def release(self, session: Session, ids: list[int], prompt_len: int) -> None:
        """A generation on ``session`` ended; ``ids`` = prompt + generated tokens."""
        with self.lock:
            session.ids, session.prompt_len = list(ids), prompt_len
            session.busy, session.last_used = False, time.monotonic()
            if session.sid in self.active:
                self.active.move_to_end(session.sid)
            if self.store is not None and session.cache is not None:
                cache = session.cache
                held = session.ids[: cache.offset]
                meta = {"server": {"prompt_len": prompt_len, "ids": [int(i) for i in session.ids]}}
                self.store.put(held, SF.encode_session(self.fingerprint, cache, meta))

    def drop(self, session: Session) -> None:
        """Forget ``session`` (after a failed generation); its cache becomes free."""
        with self.lock:
            self.active.pop(session.sid, None)
            if session.cache is not None:
                session.cache.reset()
                self.free.append(session.cache)
                session.cache = None

    def snapshot(self) -> dict:
        """Counters for ``/v1/stats`` (safe to call from another thread)."""
        with self.lock:
            active = list(self.active.values())
            on_disk, counters, n_caches = len(self.on_disk), dict(self.counters), self.n_caches
        used = 0
        for s in active:
            c = s.cache
            if c is not None:
                used += c.nbytes * c.length // max(c.capacity, 1)
        return {"active": len(active), "busy": sum(s.busy for s in active), "on_disk": on_disk,
                "slots": self.slots, "kv_bytes_used": int(used), "kv_bytes_allocated": n_caches * self.cache_bytes,
                "kv_bytes_total": self.budget, "session_budget": self.session_budget, **counters}

    def close(self) -> None:
        """Shut down: idle conversations go to a ``session_dir`` the user gave (so a restarted
        server picks them up); a temp folder the manager created is removed."""
        if self.store is not None:
            self.store.close()
        with self.lock:
            if self._own_dir:
                shutil.rmtree(self.dir, ignore_errors=True)
                return
            for s in [s for s in self.active.values() if not s.busy and s.prompt_len]:
                self._evict(s)

    def _index_dir(self) -> None:
        """Pick up conversations a previous server left in ``session_dir`` (same bundle and
        cache configuration only; other files are left alone), oldest first."""
        for path in sorted(self.dir.glob(f"*{SUFFIX}"), key=lambda p: p.stat().st_mtime):
            try:
                header = SF.read_header(path)
                saved = header.get("meta", {}).get("server")
                if header.get("fingerprint") != self.fingerprint or not isinstance(saved, dict):
                    continue
                s = Session(path.stem, [int(i) for i in saved["ids"]], int(saved["prompt_len"]))
            except (TqedgeError, KeyError, TypeError, ValueError) as e:
                log.warning("ignoring %s: %s", path.name, e)
                continue
            self.on_disk[s.sid] = s
        if self.on_disk:
            log.info("found %d saved conversations in %s", len(self.on_disk), self.dir)

    # -- internals --------------------------------------------------------------------------
    def _from_store(self, ids: list[int], local_n: int, align: int) -> Acquired | None:
        """Continue ``ids`` from the shared store when it holds a longer prefix than any local
        conversation (``local_n``); a blob that does not verify is refused and logged."""
        hit = self.store.longest_prefix(ids)
        if hit is None or hit[0] <= local_n:
            return None
        n, blob = hit
        cache = self._take_cache()
        if cache is None:
            return None
        try:
            data = SF.decode_session(blob, where="stored conversation")
            SF.restore_cache(cache, data, self.model.manifest, where="stored conversation")
            saved = data.meta.get("server") or {}
            s_ids, prompt_len = [int(i) for i in saved.get("ids", [])], int(saved.get("prompt_len", 0))
            if s_ids[:n] != list(ids[:n]) or cache.offset != n:
                raise TqedgeError("stored conversation: holds other tokens than its key says")
        except (TqedgeError, ValueError, TypeError) as e:
            log.warning("%s; recomputing the conversation", e)
            self.counters["discarded"] += 1
            cache.reset()
            self.free.append(cache)
            return None
        s = Session(uuid.uuid4().hex, s_ids, prompt_len, cache=cache, busy=True)
        self.active[s.sid] = s
        self.counters["from_store"] += 1
        return self._sync(s, ids, True, align)

    def _start(self, ids: list[int], cache=None) -> Acquired | None:
        cache = cache if cache is not None else self._take_cache()
        if cache is None:
            return None
        cache.reset()
        s = Session(uuid.uuid4().hex, cache=cache, busy=True)
        self.active[s.sid] = s
        self.counters["new"] += 1
        return Acquired(s, list(ids), 0)

    def _sync(self, s: Session, ids: list[int], restored: bool, align: int) -> Acquired:
        cache = s.cache
        held = s.ids[: cache.offset]
        n = common_prefix(held, ids)
        if n == len(ids):  # nothing new: re-feed the last token for its logits
            n -= 1
        if n <= s.prompt_len:
            n -= n % align
        if n < len(held):
            if cache.evicted:  # a slid cache cannot be rewound
                log.info("session %s: cache slid and cannot be rewound; re-prefilling", s.sid[:8])
                cache.reset()
                n = 0
            else:
                cache.trim(len(held) - n)
        return Acquired(s, list(ids[n:]), n, restored)

    def _take_cache(self):
        if self.free:
            return self.free.pop()
        if self.n_caches < self.slots:
            self.n_caches += 1
            return self.model.new_cache(**self.cache_opts)
        victim = next((s for s in self.active.values() if not s.busy), None)
        if victim is None:
            return None
        self._evict(victim)
        return self.free.pop()

    def _path(self, s: Session) -> Path:
        return self.dir / f"{s.sid}{SUFFIX}"

    def _evict(self, s: Session) -> None:
        """Write ``s`` to disk (compressed, as stored) and free its cache."""
        t0 = time.perf_counter()
        cache = s.cache
        try:
            n = SF.save_session(self._path(s), self.model.manifest, cache,
                                {"server": {"prompt_len": s.prompt_len, "ids": [int(i) for i in s.ids]}})
            self.on_disk[s.sid] = s
            log.info("session %s: evicted to disk (%s, %d tokens, %.0f ms)", s.sid[:8], format_bytes(n),
                     cache.length, 1e3 * (time.perf_counter() - t0))
            self.counters["evicted"] += 1
        except OSError as e:  # disk full / read-only: the conversation will be recomputed if it returns
            log.warning("session %s: could not write to disk (%s); dropped", s.sid[:8], e)
        self.active.pop(s.sid, None)
        cache.reset()
        self.free.append(cache)
        s.cache = None
        while len(self.on_disk) > self.max_disk:
            _, old = self.on_disk.popitem(last=False)
            self._unlink(old)

    def _restore(self, s: Session, cache) -> bool:
        """Load ``s`` from its file into ``cache``; on any problem log, delete and return False."""
        path = self._path(s)
        self.on_disk.pop(s.sid, None)
        try:
            data = SF.read_session(path)
            SF.restore_cache(cache, data, self.model.manifest, where=f"session file {path.name}")
            saved = data.meta.get("server") or {}
            if [int(i) for i in saved.get("ids", [])] != s.ids or len(s.ids) < cache.offset:
                raise TqedgeError(f"session file {path.name}: holds another conversation")
        except TqedgeError as e:
            log.warning("%s; recomputing the conversation", e)
            self.counters["discarded"] += 1
            cache.reset()
            self._unlink(s)
            return False
        self._unlink(s)
        s.cache = cache
        self.counters["restored"] += 1
        return True

    def _unlink(self, s: Session) -> None:
        try:
            os.unlink(self._path(s))
        except FileNotFoundError:
            pass
        except OSError as e:
            log.warning("session %s: could not delete its file (%s)", s.sid[:8], e)

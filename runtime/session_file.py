"""Session files: a KV cache (and the conversation around it) saved to disk and restored bit-exactly.

A TurboQuant cache is saved *as stored* — the packed codes, scales and fp16 sink/window
buffers from ``cache.state()`` — never dequantized or re-quantized, so a restored cache is
bit-identical on every slot it can read and continues exactly as the original would have. Layout (all integers little-endian)::

    b"TQESESS\\0"   8 bytes magic
    u32            format version (FORMAT_VERSION)
    u64            header length H
    H bytes        JSON header (UTF-8): fingerprint, cache config and options, scalars,
                   array table [{name, dtype, shape, offset, nbytes}], meta (chat state)
    payload        the arrays as raw little-endian bytes, each at a 64-byte aligned offset;
                   only the live slots (axis -2, see ``live_rows``) of each array are stored
    32 bytes       SHA-256 of everything before it

The *fingerprint* is a SHA-256 over the bundle's manifest and the cache configuration
(kind, shapes, codec configs): a file is only ever loaded into a cache built the same way for
the same bundle. No pickle anywhere; files are written atomically (temp file + rename), and a
truncated, corrupt or mismatched file raises :class:`~tqedge.errors.TqedgeError` with one line.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tqedge.errors import TqedgeError
from tqedge.files import atomic_write_bytes

log = logging.getLogger(__name__)

MAGIC = b"TQESESS\0"
FORMAT_VERSION = 1
ALIGN = 64
_PREFIX = struct.Struct("<8sIQ")  # magic, version, header length
_DIGEST = 32
MAX_HEADER = 64 << 20  # a header larger than this is not ours


@dataclass
class SessionData:
    """A parsed session file.

    Attributes:
        fingerprint: hex SHA-256 of bundle manifest + cache config.
        cache_options: keyword arguments for ``model.new_cache`` that rebuild the cache.
        state: the cache ``state()`` (arrays and ints) to pass to ``cache.load_state``.
        meta: free JSON (the chat's messages and token ids, a server session's prompt ids).
    """

    fingerprint: str
    cache_options: dict
    state: dict
    meta: dict = field(default_factory=dict)


# -- fingerprints -----------------------------------------------------------------------------
def manifest_sha(manifest) -> str:
    """SHA-256 of a manifest's canonical JSON (it lists every bundle file's checksum)."""
    blob = json.dumps(manifest.to_dict(), sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def cache_config(cache) -> dict:
    """JSON description of how ``cache`` is built (not what it holds)."""
    ring = cache.slots
    cfg = {"kind": getattr(cache, "kind", type(cache).__name__), "capacity": int(cache.capacity),
           "sinks": int(ring.sinks), "policy": ring.policy, "nbytes": int(cache.nbytes)}
    if hasattr(cache, "tq_k"):  # CompressedKVCache
        cfg.update(window=int(cache.window), ring=int(cache.ring), heads=int(cache.num_kv_heads),
                   head_dim=int(cache.head_dim),
                   keys=[dataclasses.asdict(c.config) for c in cache.tq_k],
                   values=[dataclasses.asdict(c.config) for c in cache.tq_v])
    else:  # ExactKVCache
        cfg.update(shape=list(cache.keys.shape), dtype=cache.keys.dtype.str)
    return json.loads(json.dumps(cfg, default=list))  # tuples → lists, as after a round trip


def fingerprint(manifest, cache) -> str:
    """Hex SHA-256 identifying (bundle, cache configuration)."""
    blob = json.dumps({"manifest": manifest_sha(manifest), "cache": cache_config(cache)}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def cache_options(cache) -> dict:
    """Keyword arguments for ``model.new_cache`` that rebuild a cache configured like ``cache``."""
    ring = cache.slots
    opts = {"sinks": int(ring.sinks), "policy": ring.policy}
    if hasattr(cache, "tq_k"):
        k0, v0 = cache.tq_k[0].config, cache.tq_v[0].config
        bits = {(c.config.bits, v.config.bits) for c, v in zip(cache.tq_k, cache.tq_v)}
        opts.update(kv_budget=int(cache.budget if cache.budget is not None else cache.nbytes),
                    window=int(cache.window), rotation=k0.rotation, norm=k0.norm, qjl=bool(k0.qjl))
        if len(bits) == 1:  # uniform bits; per-layer bits come from the bundle's defaults
            opts["kv_bits"] = f"{k0.bits:g},{v0.bits:g}"
    else:
        opts.update(kv_budget=int(cache.nbytes), kv_bits="exact")
    return opts


# -- writing ----------------------------------------------------------------------------------
_RING_ARRAYS = ("k_codes", "k_scales", "v_codes", "v_scales")


def live_rows(cache, name: str, arr: np.ndarray) -> int:
    """Slots along axis -2 of state array ``name`` that can hold live tokens.

    An exact cache holds its tokens in slots ``[0, length)``; a compressed cache's ring holds
    non-sink token ``p`` at ``(p - sinks) % ring``, so ``[0, length - sinks)`` (all of it once
    it wrapped), and its fp16 sinks + window ``[0, sinks + offset)``. Slots past those are dead (never read before being rewritten): they are not
    saved and come back as zeros, which keeps the file proportional to the conversation, not
    to the budget.
    """
    if name in ("keys", "values"):
        return int(cache.length)
    sinks = int(cache.slots.sinks)
    if name.split(".")[0] in _RING_ARRAYS:
        return max(0, int(cache.length) - sinks)
    if name in ("fp_k", "fp_v"):  # sinks at [0, S), token p ≥ S at S + p % W: [0, S + offset) until it wraps
        return min(arr.shape[-2], sinks + int(cache.offset))
    return arr.shape[-2]


def encode_session(fp: str, cache, meta: dict | None = None) -> bytes:
    """Serialize ``cache.state()`` plus ``meta`` into the session file format (bytes)."""
    arrays, scalars = {}, {}
    for name, value in cache.state().items():
        if isinstance(value, np.ndarray):
            arrays[name] = value
        else:
            scalars[name] = int(value)
    table, parts, offset = [], [], 0
    for name, arr in arrays.items():
        live = arr[..., :live_rows(cache, name, arr), :]  # slots past the held tokens are dead
        le = arr.dtype.newbyteorder("<")  # '<f2', '|u1': explicit little-endian on any host
        offset = -(-offset // ALIGN) * ALIGN
        table.append({"name": name, "dtype": le.str, "shape": list(arr.shape), "rows": int(live.shape[-2]),
                      "offset": offset, "nbytes": int(live.nbytes)})
        parts.append(live)
        offset += live.nbytes
    header = {"fingerprint": fp, "cache": cache_config(cache), "cache_options": cache_options(cache),
              "scalars": scalars, "arrays": table, "payload_bytes": offset, "meta": meta or {}}
    head = json.dumps(header, separators=(",", ":")).encode()
    payload = bytearray(offset)
    for entry, arr in zip(table, parts):
        raw = np.ascontiguousarray(arr, dtype=np.dtype(entry["dtype"])).tobytes()
        payload[entry["offset"]:entry["offset"] + len(raw)] = raw
    body = _PREFIX.pack(MAGIC, FORMAT_VERSION, len(head)) + head + bytes(payload)
    return body + hashlib.sha256(body).digest()


def save_session(path, manifest, cache, meta: dict | None = None) -> int:
    """Write ``cache`` (and ``meta``) to ``path`` atomically.

    Args:
        path: the file to write (its folder must exist).
        manifest: the bundle manifest the cache belongs to (part of the fingerprint).
        cache: an ``ExactKVCache`` or ``CompressedKVCache``.
        meta: JSON-serializable extra state (e.g. the conversation).

    Returns:
        Bytes written.
    """
    data = encode_session(fingerprint(manifest, cache), cache, meta)
    atomic_write_bytes(path, data)
    return len(data)


# -- reading ----------------------------------------------------------------------------------
def decode_session(data: bytes, where: str = "session file") -> SessionData:
    """Parse and verify session-file bytes (magic, version, checksum, array table).

    Raises:
        TqedgeError: one line naming what is wrong.
    """
    if len(data) < _PREFIX.size + _DIGEST:
        raise TqedgeError(f"{where}: truncated ({len(data)} bytes)")
    magic, version, hlen = _PREFIX.unpack_from(data)
    if magic != MAGIC:
        raise TqedgeError(f"{where}: not a tqedge session file (bad magic)")
    if version != FORMAT_VERSION:
        raise TqedgeError(f"{where}: session format version {version} is not supported (this build reads {FORMAT_VERSION})")
    body, digest = data[:-_DIGEST], data[-_DIGEST:]
    if hlen > MAX_HEADER or _PREFIX.size + hlen > len(body):
        raise TqedgeError(f"{where}: truncated (header of {hlen} bytes does not fit)")
    if hashlib.sha256(body).digest() != digest:
        raise TqedgeError(f"{where}: checksum mismatch (file is corrupt or truncated)")
    try:
        header = json.loads(data[_PREFIX.size:_PREFIX.size + hlen])
        payload = memoryview(body)[_PREFIX.size + hlen:]
        if len(payload) != int(header["payload_bytes"]):
            raise TqedgeError(f"{where}: payload is {len(payload)} bytes, header says {header['payload_bytes']}")
        state = {k: int(v) for k, v in header["scalars"].items()}
        for e in header["arrays"]:
            dt, shape, off, n = np.dtype(e["dtype"]), tuple(int(s) for s in e["shape"]), int(e["offset"]), int(e["nbytes"])
            rows = int(e["rows"])
            live = (*shape[:-2], rows, shape[-1])
            if (dt.hasobject or len(shape) < 2 or not 0 <= rows <= shape[-2] or n != dt.itemsize * int(np.prod(live))
                    or off < 0 or off + n > len(payload)):
                raise TqedgeError(f"{where}: array {e['name']!r} does not fit its declared shape/offset")
            arr = np.zeros(shape, dt.newbyteorder("="))
            arr[..., :rows, :] = np.frombuffer(payload[off:off + n], dtype=dt).reshape(live)
            state[e["name"]] = arr
        return SessionData(str(header["fingerprint"]), dict(header["cache_options"]), state, dict(header["meta"]))
    except TqedgeError:
        raise
    except (ValueError, KeyError, TypeError) as e:  # checksum ok but header malformed: a foreign writer
        raise TqedgeError(f"{where}: malformed header ({type(e).__name__}: {e})") from None


def read_header(path) -> dict:
    """The JSON header of a session file, without reading or verifying its payload (cheap: for
    indexing a folder; :func:`read_session` still verifies the whole file before use)."""
    try:
        with open(path, "rb") as f:
            prefix = f.read(_PREFIX.size)
            if len(prefix) < _PREFIX.size:
                raise TqedgeError(f"session file {Path(path).name}: truncated")
            magic, version, hlen = _PREFIX.unpack(prefix)
            if magic != MAGIC or version != FORMAT_VERSION or hlen > MAX_HEADER:
                raise TqedgeError(f"session file {Path(path).name}: not a version {FORMAT_VERSION} session file")
            return json.loads(f.read(hlen))
    except OSError as e:
        raise TqedgeError(f"cannot read session file {path}: {e.strerror or e}") from None
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise TqedgeError(f"session file {Path(path).name}: malformed header") from None


def read_session(path) -> SessionData:
    """Read and verify a session file; raises TqedgeError (one line) when it is unusable."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise TqedgeError(f"cannot read session file {path}: {e.strerror or e}") from None
    return decode_session(data, where=f"session file {Path(path).name}")


def restore_cache(cache, session: SessionData, manifest, where: str = "session file") -> None:
    """Load ``session.state`` into ``cache`` after checking the fingerprint (bit-exact restore).

    Raises:
        TqedgeError: the file was saved for another bundle or cache configuration.
    """
    fp = fingerprint(manifest, cache)
    if session.fingerprint != fp:
        raise TqedgeError(f"{where}: saved for a different bundle or cache configuration "
                          f"(fingerprint {session.fingerprint[:12]}…, this cache {fp[:12]}…)")
    try:
        cache.load_state(session.state)
    except KeyError as e:
        raise TqedgeError(f"{where}: cache state lacks {e}") from None


# -- chats ------------------------------------------------------------------------------------
def save_chat(chat, path) -> int:
    """Save a :class:`~tqedge.runtime.chat.Chat` (messages, token ids, sampling, cache) to ``path``.

    Returns:
        Bytes written.
    """
    meta = {"chat": {"system": chat.system, "messages": chat.messages, "ids": [int(i) for i in chat._ids],
                     "sampling": chat.sampling}}
    try:
        return save_session(path, chat.model.manifest, chat.cache, meta)
    except TypeError as e:  # sampling options that JSON cannot hold
        raise TqedgeError(f"cannot save chat: {e}") from None


def describe_options(opts: dict) -> str:
    """``kv_bits=4,3 kv_budget=65536 window=128 sinks=4 policy=slide``: a cache configuration as
    the keyword arguments that rebuild it (see :func:`cache_options`)."""
    keys = ("kv_bits", "kv_budget", "window", "sinks", "policy", "rotation", "norm", "qjl")
    return " ".join(f"{k}={opts.get(k, 'bundle default') if k == 'kv_bits' else opts[k]}"
                    for k in keys if k in opts or k == "kv_bits")


def load_chat(model, path, kv_bits=None, **options):
    """Restore a chat saved by :func:`save_chat`; the next turn reuses the restored cache.

    Args:
        model: the model the chat was saved from (same bundle; checked by fingerprint).
        path: the session file.
        kv_bits: ``None`` (the model's default cache, optionally changed by the cache
            options below) or any ``kv_bits`` value ``model.chat`` takes: the file must have
            been saved with exactly that cache configuration, else it is refused naming both.
            ``"saved"``: rebuild the cache with the configuration stored in the file.
        **options: cache options (``kv_budget``, ``window``, ``sinks``, ``policy``; not with
            ``"saved"``) and overrides of the saved sampling defaults.

    Returns:
        A :class:`~tqedge.runtime.chat.Chat`.
    """
    from tqedge.runtime.chat import _CACHE_OPTIONS, Chat

    where = f"session file {Path(path).name}"
    cache_opts = {k: options.pop(k) for k in _CACHE_OPTIONS if k in options}
    session = read_session(path)
    saved = session.meta.get("chat")
    if not isinstance(saved, dict):
        raise TqedgeError(f"{where}: holds no chat (saved by a server?)")
    if kv_bits == "saved":
        if cache_opts:
            raise TqedgeError(f"kv_bits='saved' restores the file's whole cache configuration; drop {sorted(cache_opts)[0]}")
        cache = model.new_cache(**session.cache_options)
    else:
        cache = model.new_cache(kv_bits=kv_bits, **cache_opts)
        mine = cache_options(cache)
        if fingerprint(model.manifest, cache) != session.fingerprint and mine != session.cache_options:
            raise TqedgeError(f"{where} was saved with the cache {describe_options(session.cache_options)}; this "
                              f"model's is {describe_options(mine)} (pass kv_bits='saved' to restore it as saved)")
    chat = Chat(model, system=saved.get("system"), cache=cache, **{**saved.get("sampling", {}), **options})
    chat._messages = [dict(m) for m in saved.get("messages", [])]
    chat._ids = [int(i) for i in saved.get("ids", [])]
    restore_cache(cache, session, model.manifest, where)  # after Chat(), which resets the cache
    if len(chat._ids) < cache.offset:
        raise TqedgeError(f"{where}: {len(chat._ids)} token ids for a cache holding {cache.offset}")
    return chat

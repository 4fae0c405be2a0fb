"""KV caches: a fixed number of token slots, preallocated once from a byte budget.

Every cache has the same small interface, called by the model around each forward step::

    cache.prepare(T)                     # make room for T new tokens (may evict with "slide")
    out = cache.attend(layer, q, k, v, scale)   # per layer: store k, v; causal GQA attention
    cache.commit()                       # the T tokens are now part of the cache

plus ``offset`` (tokens seen so far = absolute position of the next token), ``length`` (tokens
held), ``capacity``, ``nbytes``, ``evicted``, ``trim(n)``, ``reset()`` and ``state()``.

Slot layout: slots ``[0, sinks)`` hold the first tokens forever; slots ``[sinks, capacity)``
are a ring of the rest. Attention is order-independent, so the ring needs no shifting: with
the ``slide`` policy a full cache overwrites its oldest non-sink slot (StreamingLLM-style).
Keys arrive with RoPE applied at their absolute positions, so relative distances stay true.
"""

from __future__ import annotations

import numpy as np

from tqedge.errors import TqedgeError
from tqedge.runtime import kv_descriptor
from tqedge.runtime.kv_spec import check_layer_bits, parse_kv_spec
from tqedge.units import format_bytes

POLICIES = ("slide", "error")


def check_policy(policy) -> None:
    """Refuse an overflow policy other than :data:`POLICIES`."""
    if policy not in POLICIES:
        raise TqedgeError(f"unknown overflow policy {policy!r} (use slide or error)")


class SlotRing:
    """Slot bookkeeping shared by all caches: which slots the next T tokens go to, and which
    of the current slots they may attend to."""

    def __init__(self, capacity: int, sinks: int, policy: str):
        check_policy(policy)
        if capacity <= sinks:
            raise TqedgeError(f"cache capacity {capacity} tokens leaves no room beside {sinks} sink tokens")
        self.capacity, self.sinks, self.policy = capacity, sinks, policy
        self.reset()

    def reset(self) -> None:
        self.offset = 0  # tokens seen so far (absolute position of the next token)
        self.length = 0  # tokens held (≤ capacity)
        self.evicted = 0  # tokens dropped by "slide"
        self._ptr = self.sinks  # next ring slot to overwrite once full
        self.new_slots: np.ndarray | None = None  # slots of the step in flight
        self.old_valid: np.ndarray | int = 0  # slots the step may read: a count (prefix) or a bool mask

    def prepare(self, t: int, error_hint=None) -> None:
        """Assign slots to ``t`` new tokens, evicting the oldest non-sink tokens if needed
        (``error_hint()``: text added to the cache-full error, built only when it is raised)."""
        if t <= 0:
            raise TqedgeError("a forward step needs at least one token")
        free = self.capacity - self.length
        if t <= free:
            self.new_slots = np.arange(self.length, self.length + t)
            self.old_valid = self.length
            return
        if self.policy == "error":
            raise TqedgeError(
                f"KV cache full: {self.length} + {t} tokens exceed the capacity of {self.capacity} tokens"
                f"{error_hint() if error_hint else ''}; use a larger --kv-budget or --policy slide"
            )
        ring = self.capacity - self.sinks
        if t > ring:
            raise TqedgeError(f"a step of {t} tokens exceeds the cache ring of {ring} tokens; feed it in chunks")
        slots = []
        for _ in range(free):  # fill the free tail first
            slots.append(self.length + len(slots))
        n_evict = t - free
        # once full, _ptr walks the ring; before, the oldest ring slot is `sinks`
        ptr = self._ptr if self.length == self.capacity else self.sinks
        for i in range(n_evict):
            slots.append(self.sinks + (ptr - self.sinks + i) % ring)
        self._ptr = self.sinks + (ptr - self.sinks + n_evict) % ring
        self.new_slots = np.asarray(slots, dtype=np.int64)
        mask = np.zeros(self.capacity, dtype=bool)
        mask[: self.length] = True
        mask[self.new_slots] = False
        self.old_valid = mask
        self.evicted += n_evict

    def commit(self) -> None:
        t = len(self.new_slots)
        self.offset += t
        self.length = min(self.capacity, self.length + t)
        self.new_slots = None

    def state(self) -> dict:
        """The counters, as plain ints (the slot contents live in the cache's arrays)."""
        return {"offset": self.offset, "length": self.length, "evicted": self.evicted, "ptr": self._ptr}

    def load_state(self, state: dict) -> None:
        """Restore the counters saved by :meth:`state`."""
        self.offset, self.length, self.evicted, self._ptr = (
            int(state[k]) for k in ("offset", "length", "evicted", "ptr"))
        self.new_slots, self.old_valid = None, 0

    def trim(self, n: int) -> None:
        """Forget the last ``n`` tokens (only possible before anything was evicted)."""
        if n < 0 or n > self.length:
            raise TqedgeError(f"cannot trim {n} tokens from a cache holding {self.length}")
        if self.evicted:
            raise TqedgeError("cannot trim a cache that has already evicted tokens; reset it")
        self.length -= n
        self.offset -= n


class ExactKVCache:
    """Uncompressed float32 (or float16) cache: the baseline and the parity reference."""

    kind = "exact"

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, capacity: int,
                 sinks: int = 4, policy: str = "slide", dtype=np.float32):
        self.num_layers, self.num_kv_heads, self.head_dim = num_layers, num_kv_heads, head_dim
        self.dtype = np.dtype(dtype)
        self.slots = SlotRing(capacity, sinks, policy)
        shape = (num_layers, num_kv_heads, capacity, head_dim)
        self.keys = np.zeros(shape, self.dtype)  # (L, Hkv, C, D)
        self.values = np.zeros(shape, self.dtype)  # (L, Hkv, C, D)
        self._native_desc = None  # the native op's descriptor, built at the first descriptor() call

    @staticmethod
    def bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int, dtype=np.float32) -> int:
        return 2 * num_layers * num_kv_heads * head_dim * np.dtype(dtype).itemsize

    @classmethod
    def capacity_for(cls, budget: int, num_layers: int, num_kv_heads: int, head_dim: int,
                     sinks: int = 4, dtype=np.float32) -> int:
        """Token slots ``budget`` bytes hold; refuses a budget below ``sinks + 2`` tokens."""
        per = cls.bytes_per_token(num_layers, num_kv_heads, head_dim, dtype)
        capacity = budget // per
        if capacity <= sinks + 1:
            raise TqedgeError(
                f"KV budget {format_bytes(budget)} holds only {capacity} tokens; "
                f"the exact cache needs at least {format_bytes((sinks + 2) * per)}"
            )
        return capacity

    @classmethod
    def from_budget(cls, budget: int, num_layers: int, num_kv_heads: int, head_dim: int,
                    sinks: int = 4, policy: str = "slide", dtype=np.float32) -> "ExactKVCache":
        capacity = cls.capacity_for(budget, num_layers, num_kv_heads, head_dim, sinks, dtype)
        return cls(num_layers, num_kv_heads, head_dim, capacity, sinks, policy, dtype)

    # -- the interface ------------------------------------------------------------------
    offset = property(lambda self: self.slots.offset)
    length = property(lambda self: self.slots.length)
    capacity = property(lambda self: self.slots.capacity)
    evicted = property(lambda self: self.slots.evicted)

    @property
    def nbytes(self) -> int:
        return self.keys.nbytes + self.values.nbytes

    def prepare(self, t: int) -> None:
        self.slots.prepare(t)

    def commit(self) -> None:
        self.slots.commit()

    def trim(self, n: int) -> None:
        self.slots.trim(n)

    def reset(self) -> None:
        self.slots.reset()

    def state(self) -> dict:
        """Arrays and counters that fully describe the cache (for save/restore)."""
        return {"keys": self.keys, "values": self.values, **self.slots.state()}

    def load_state(self, state: dict) -> None:
        """Restore from :meth:`state` of a cache with the same shape and dtype (bit-exact)."""
        copy_state_arrays(state, {"keys": self.keys, "values": self.values})
        self.slots.load_state(state)

    def descriptor(self) -> np.ndarray:
        """This step's int64 descriptor for the native op (runtime/kv_descriptor.py); after prepare()."""
        return kv_descriptor.exact(self)

    def attend(self, layer: int, q: np.ndarray, k: np.ndarray, v: np.ndarray, scale: float) -> np.ndarray:
        """Store this layer's new keys/values and attend causally (GQA).

        Args:
            layer: layer index.
            q: (T, Hq, D) float32, RoPE applied.
            k: (T, Hkv, D) float32, RoPE applied.
            v: (T, Hkv, D) float32.
            scale: softmax scale (usually 1/sqrt(D)).

        Returns:
            (T, Hq, D) float32 attention output.
        """
        s = self.slots
        t, hq, d = q.shape
        hkv = k.shape[1]
        g = hq // hkv
        qh = q.reshape(t, hkv, g, d).transpose(1, 2, 0, 3).reshape(hkv, g * t, d)  # (Hkv, G*T, D)
        kn = k.transpose(1, 0, 2)  # (Hkv, T, D)
        vn = v.transpose(1, 0, 2)  # (Hkv, T, D)
        old = int(s.old_valid) if isinstance(s.old_valid, (int, np.integer)) else np.flatnonzero(s.old_valid)
        out = exact_attention(qh, self.keys[layer], self.values[layer], old, kn, vn, scale)  # (Hkv, G*T, D)
        self.keys[layer][:, s.new_slots] = kn
        self.values[layer][:, s.new_slots] = vn
        return out.reshape(hkv, g, t, d).transpose(2, 0, 1, 3).reshape(t, hq, d)


def copy_state_arrays(state: dict, arrays: dict[str, np.ndarray]) -> None:
    """Copy saved arrays into a cache's preallocated ones, refusing any shape or dtype mismatch."""
    for key, arr in arrays.items():
        src = np.asarray(state[key])
        if src.shape != arr.shape or src.dtype != arr.dtype:
            raise TqedgeError(f"saved cache array {key} is {src.dtype}{src.shape}, expected {arr.dtype}{arr.shape}")
        arr[...] = src


def exact_attention(qh, keys, values, old, kn, vn, scale: float) -> np.ndarray:
    """Softmax attention of grouped queries over cached keys (all visible) and new keys (causal),
    the cached ones streamed in tiles under an online softmax: temporaries are bounded by the
    step and the tile (:data:`tqedge.runtime.attention.TILE_ELEMENTS`), not the context.

    Args:
        qh: (Hkv, G*T, D) queries, grouped per KV head, query-head-major then token.
        keys, values: (Hkv, C, D) one layer's cache slots.
        old: the slots every new token may see: a count ``n`` (slots ``[0, n)``) or an index array.
        kn, vn: (Hkv, T, D) the new tokens' keys/values (causal among themselves).
        scale: softmax scale.

    Returns:
        (Hkv, G*T, D) float32.
    """
    from tqedge.runtime.attention import KEY_TILE, TILE_ELEMENTS

    h, gt, _ = qh.shape
    t = kn.shape[1]
    s = np.matmul(qh, kn.transpose(0, 2, 1)) * np.float32(scale)  # (Hkv, G*T, T)
    causal = np.triu(np.ones((t, t), dtype=bool), k=1)  # True = masked
    s = np.where(np.tile(causal, (gt // t, 1))[None], np.float32(-np.inf), s)
    m = s.max(axis=-1, keepdims=True)  # finite: every token sees itself
    p = np.exp(s - m)
    denom = p.sum(axis=-1, keepdims=True)
    out = np.matmul(p, vn)  # (Hkv, G*T, D)
    n = old if isinstance(old, int) else len(old)
    tile = max(KEY_TILE, TILE_ELEMENTS // max(1, h * gt))
    for a in range(0, n, tile):
        sl = slice(a, min(n, a + tile)) if isinstance(old, int) else old[a:a + tile]
        k = keys[:, sl].astype(np.float32, copy=False)  # (Hkv, n', D)
        s = np.matmul(qh, k.transpose(0, 2, 1)) * np.float32(scale)  # (Hkv, G*T, n')
        m_new = np.maximum(m, s.max(axis=-1, keepdims=True))
        alpha = np.exp(m - m_new)
        p = np.exp(s - m_new)
        denom = denom * alpha + p.sum(axis=-1, keepdims=True)
        out *= alpha
        out += np.matmul(p, values[:, sl].astype(np.float32, copy=False))
        m = m_new
    return (out / denom).astype(np.float32, copy=False)


def layer_seed(seed: int, layer: int, kind: str) -> int:
    """Deterministic codec seed of one layer's keys (``kind="k"``) or values (``"v"``)."""
    return int(np.random.SeedSequence([seed, layer, 0 if kind == "k" else 1]).generate_state(1)[0])


def build_codecs(kv, num_layers: int, head_dim: int, bits: tuple[float, float] | None = None,
                 rotation: str | None = None, norm: str | None = None, qjl: bool | None = None,
                 seed: int | None = None, layer_bits: dict | None = None) -> tuple[list, list]:
    """One key and one value ``TurboQuant`` per layer, built from :func:`codec_configs` (same arguments)."""
    from tqedge.codec.quantizer import TurboQuant

    keys, values = codec_configs(kv, num_layers, head_dim, bits, rotation, norm, qjl, seed, layer_bits)
    return [TurboQuant(c) for c in keys], [TurboQuant(c) for c in values]


def codec_configs(kv, num_layers: int, head_dim: int, bits: tuple[float, float] | None = None,
                  rotation: str | None = None, norm: str | None = None, qjl: bool | None = None,
                  seed: int | None = None, layer_bits: dict | None = None) -> tuple[list, list]:
    """One key and one value :class:`~tqedge.codec.config.CodecConfig` per layer (validated;
    their ``code_bytes`` / ``num_scales`` are the built codecs' own, nothing allocated).

    Args:
        kv: the bundle's :class:`~tqedge.bundle.KVSpec` (defaults and per-layer overrides).
        num_layers, head_dim: model dimensions.
        bits: (key_bits, value_bits) for every layer; None = the KVSpec's, with its
            ``layer_bits`` overrides.
        rotation, norm, qjl, seed: override the KVSpec's.
        layer_bits: ``{"layer": [key_bits, value_bits]}`` overrides on top of ``bits``
            (None = the KVSpec's when ``bits`` is None, else none).

    Returns:
        (key_configs, value_configs), lists of length ``num_layers``.
    """
    from tqedge.codec.config import CodecConfig

    rotation = rotation or kv.rotation
    norm = norm or kv.norm
    qjl = kv.qjl if qjl is None else qjl
    seed = kv.seed if seed is None else seed
    overrides = layer_bits if layer_bits is not None else (kv.layer_bits or {}) if bits is None else {}
    check_layer_bits(overrides, num_layers)
    keys, values = [], []
    for layer in range(num_layers):
        kb, vb = overrides.get(str(layer), bits or (kv.key_bits, kv.value_bits))
        for kind, b, out in (("k", kb, keys), ("v", vb, values)):
            out.append(CodecConfig(dim=head_dim, bits=float(b), rotation=rotation, seed=layer_seed(seed, layer, kind),
                                   norm=norm, qjl=bool(qjl and kind == "k"), outlier_channels=None))
    return keys, values


def make_cache(manifest, kv_budget, kv_bits=None, window=None, sinks=None, policy="slide", *,
               rotation: str | None = None, norm: str | None = None, qjl: bool | None = None,
               exact_prefill: bool = False):
    """Build the cache a bundle's model needs, preallocated from ``kv_budget`` bytes.

    Args:
        manifest: the bundle manifest (architecture + KVSpec defaults).
        kv_budget: bytes or a size string ("32MiB"); all cache buffers fit in it.
        kv_bits: None = the bundle's TurboQuant default; "exact" = the fp32 cache;
            "4,3" / (4, 3) / 3.5 = TurboQuant with those key,value bits on every layer;
            "K4V3+L4,7@K4V2" adds per-layer overrides (:func:`~tqedge.runtime.kv_spec.parse_kv_spec`).
        window: recent tokens kept in fp16 (None = bundle default).
        sinks: first tokens kept in full precision (None = bundle default).
        policy: "slide" or "error" when the cache is full.
        rotation, norm, qjl: codec overrides ("hadamard"|"dense", "corrected"|"plain", bool).
        exact_prefill: prompt tokens of one step see each other in fp16 (not chunk-invariant).

    Returns:
        An :class:`ExactKVCache` or a :class:`~tqedge.runtime.compressed_cache.CompressedKVCache`.

    Raises:
        TqedgeError: bad options or too small a budget (:func:`check_cache_options` says the same
            without allocating).
    """
    return _cache(manifest, kv_budget, kv_bits, window, sinks, policy, rotation, norm, qjl, exact_prefill, build=True)


def check_cache_options(manifest, kv_budget, kv_bits=None, window=None, sinks=None, policy="slide", *,
                        rotation: str | None = None, norm: str | None = None, qjl: bool | None = None,
                        exact_prefill: bool = False) -> None:
    """Refuse what :func:`make_cache` refuses, with the same one-line errors, allocating nothing
    (no buffers, no codecs): ``tqedge.load`` checks its cache defaults with it before compiling.

    Raises:
        TqedgeError: bad options, or a budget that cannot hold the smallest cache.
    """
    _cache(manifest, kv_budget, kv_bits, window, sinks, policy, rotation, norm, qjl, exact_prefill, build=False)


def _whole(value, name: str) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        raise TqedgeError(f"{name} must be a whole number of tokens, not {value!r}") from None


def _cache(manifest, kv_budget, kv_bits, window, sinks, policy, rotation, norm, qjl, exact_prefill, build: bool):
    """The one body of :func:`make_cache` and :func:`check_cache_options`: every check, and the
    buffers only when ``build``."""
    from tqedge.runtime.compressed_cache import CompressedKVCache
    from tqedge.runtime.sliding_cache import LayeredKVCache
    from tqedge.units import parse_bytes

    a, kv = manifest.architecture, manifest.kv
    h, d = a.num_kv_heads, a.head_dim
    budget = parse_bytes(kv_budget)
    sinks = kv.sinks if sinks is None else _whole(sinks, "sinks")
    window = kv.window if window is None else _whole(window, "window")
    if sinks < 0 or window < 0:
        raise TqedgeError(f"sinks and window must be ≥ 0, got {sinks} and {window}")
    check_policy(policy)
    bits, layer_bits = (None, None) if kv_bits is None else parse_kv_spec(kv_bits)
    exact = kv_bits is not None and bits is None
    if not exact:
        key_cfgs, value_cfgs = codec_configs(kv, a.num_layers, d, bits, rotation, norm, qjl, layer_bits=layer_bits)

    def uniform(budget: int, layers: list[int]):  # one ring size for ``layers`` (None unless build)
        if exact:
            capacity = ExactKVCache.capacity_for(budget, len(layers), h, d, sinks)
            return ExactKVCache(len(layers), h, d, capacity, sinks, policy) if build else None
        keys, values = [key_cfgs[i] for i in layers], [value_cfgs[i] for i in layers]
        ring = CompressedKVCache.ring_for(budget, keys, values, h, d, sinks, window)
        if not build:
            return None
        from tqedge.codec.quantizer import TurboQuant

        return CompressedKVCache([TurboQuant(c) for c in keys], [TurboQuant(c) for c in values], h, d, ring,
                                 sinks, window, policy, exact_prefill, budget)

    windows = [a.layer_window(i) for i in range(a.num_layers)]
    if any(w is not None for w in windows):  # sliding layers: fixed window rings (runtime/sliding_cache.py)
        return LayeredKVCache.from_budget(budget, windows, h, d, uniform, np.float32 if exact else np.float16)
    return uniform(budget, list(range(a.num_layers)))

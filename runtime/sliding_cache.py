"""Per-layer cache layout for models with sliding-window layers (Gemma 3).

A sliding layer's query at position ``t`` sees only keys at distance ``t - p < W`` (its window),
so it never needs more than ``W`` tokens: :class:`WindowKVCache` gives every sliding layer a
fixed ring of exactly ``W`` slots (slot ``p % W``) and nothing else — no sink tokens, no
compressed store. Full-attention layers keep a budgeted cache (exact, or TurboQuant with fp16
sinks + window and a compressed ring) built for those layers only. :class:`LayeredKVCache`
routes each layer to its part and presents the one cache interface (``prepare`` / ``attend`` /
``commit`` …, see :mod:`tqedge.runtime.cache`).

The byte budget pays the sliding rings first (fixed: ``2 · Ls · Hkv · W · D`` elements); the rest
sizes the full layers' cache, so the tokens a budget holds are set by the full layers' per-token
cost alone.
"""

from __future__ import annotations

import numpy as np

from tqedge.errors import TqedgeError
from tqedge.runtime import kv_descriptor
from tqedge.units import format_bytes

ROW_BLOCK = 256  # query rows per score block in a prefill step


class WindowKVCache:
    """Rings of ``window`` slots for the sliding layers (float32 for the exact cache, float16
    beside a TurboQuant one: the same precision the compressed cache keeps its recent window in).

    Args:
        num_layers: sliding layers held.
        num_kv_heads, head_dim: dimensions.
        window: the sliding window W (a query sees keys at distance < W).
        dtype: storage dtype; new tokens are read at this precision too, so a result does not
            depend on how a prompt is chunked.
    """

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, window: int, dtype=np.float32):
        if window < 1:
            raise TqedgeError(f"sliding window must be ≥ 1, got {window}")
        self.window, self.dtype = int(window), np.dtype(dtype)
        shape = (num_layers, num_kv_heads, self.window, head_dim)
        self.keys = np.zeros(shape, self.dtype)  # (Ls, Hkv, W, D), slot p % W
        self.values = np.zeros(shape, self.dtype)
        self.offset, self._t = 0, None

    @staticmethod
    def layout_bytes(num_layers: int, num_kv_heads: int, head_dim: int, window: int, dtype=np.float32) -> int:
        return 2 * num_layers * num_kv_heads * window * head_dim * np.dtype(dtype).itemsize

    @property
    def nbytes(self) -> int:
        return self.keys.nbytes + self.values.nbytes

    def prepare(self, t: int) -> None:
        self._t = t

    def commit(self) -> None:
        self.offset += self._t
        self._t = None

    def attend(self, layer: int, q: np.ndarray, k: np.ndarray, v: np.ndarray, scale: float) -> np.ndarray:
        """Store this sliding layer's new keys/values and attend over the window (GQA).

        Args:
            layer: index among the sliding layers.
            q: (T, Hq, D) float32; k, v: (T, Hkv, D) float32 (RoPE applied to q and k).
            scale: softmax scale.

        Returns:
            (T, Hq, D) float32.
        """
        t0, W = self.offset, self.window
        T, hq, d = q.shape
        h = k.shape[1]
        g = hq // h
        old = np.arange(max(0, t0 - W + 1), t0)  # (N,) positions the first new token may see
        kn = k.transpose(1, 0, 2).astype(self.dtype)  # (Hkv, T, D)
        vn = v.transpose(1, 0, 2).astype(self.dtype)
        ks = np.concatenate([self.keys[layer][:, old % W], kn], axis=1).astype(np.float32)  # (Hkv, N+T, D)
        vs = np.concatenate([self.values[layer][:, old % W], vn], axis=1).astype(np.float32)
        pk = np.concatenate([old, np.arange(t0, t0 + T)])  # (N+T,) ascending
        qh = (q * np.float32(scale)).reshape(T, h, g, d).transpose(1, 0, 2, 3)  # (Hkv, T, G, D)
        out = np.empty((T, hq, d), np.float32)
        for a in range(0, T, ROW_BLOCK):
            b = min(T, a + ROW_BLOCK)
            tq = np.arange(t0 + a, t0 + b)  # (Tb,)
            lo, hi = np.searchsorted(pk, tq[0] - W + 1), np.searchsorted(pk, tq[-1], side="right")
            dist = tq[:, None] - pk[None, lo:hi]  # (Tb, Nb)
            ok = (dist >= 0) & (dist < W)
            s = np.matmul(qh[:, a:b].reshape(h, (b - a) * g, d), ks[:, lo:hi].transpose(0, 2, 1))
            s = np.where(np.repeat(ok, g, axis=0)[None], s, -np.inf)  # rows are (token, group) pairs
            s = s - s.max(axis=-1, keepdims=True)
            p = np.exp(s)  # (Hkv, Tb·G, Nb)
            o = np.matmul(p, vs[:, lo:hi]) / p.sum(axis=-1, keepdims=True)  # (Hkv, Tb·G, D)
            out[a:b] = o.reshape(h, b - a, g, d).transpose(1, 0, 2, 3).reshape(b - a, hq, d)
        keep = slice(max(0, T - W), T)  # the last W new tokens stay
        slots = np.arange(t0, t0 + T)[keep] % W
        self.keys[layer][:, slots] = kn[:, keep]
        self.values[layer][:, slots] = vn[:, keep]
        return out


class LayeredKVCache:
    """Full layers in a budgeted cache, sliding layers in fixed window rings (module docstring).

    Args:
        windows: per layer, its sliding window or None for a full-attention layer.
        full: the cache of the full layers (its layer ``j`` is the j-th full layer).
        rings: the :class:`WindowKVCache` of the sliding layers.
    """

    def __init__(self, windows: list[int | None], full, rings: WindowKVCache):
        self.windows, self.full, self.rings = list(windows), full, rings
        self.budget = None  # the byte budget it was sized from (rings + full layers), if any
        self.kind = full.kind
        self._native_desc = None  # the native op's descriptor (runtime/kv_descriptor.py), built once
        self._route: list[tuple[object, int]] = []
        n_full = n_slide = 0
        for w in self.windows:
            if w is None:
                self._route.append((full, n_full))
                n_full += 1
            else:
                self._route.append((rings, n_slide))
                n_slide += 1

    @classmethod
    def from_budget(cls, budget: int, windows: list[int | None], num_kv_heads: int, head_dim: int,
                    make_full, dtype=np.float32) -> "LayeredKVCache":
        """Pay the sliding rings first, then ``make_full(rest_bytes, full_layer_indices)``; None
        when ``make_full`` returns None (a check that allocates nothing: cache.check_cache_options).

        Raises:
            TqedgeError: the budget does not cover the rings (the message names the minimum).
        """
        sliding = [w for w in windows if w is not None]
        full_layers = [i for i, w in enumerate(windows) if w is None]
        if not full_layers:
            raise TqedgeError("a model with only sliding-window layers is not supported")
        if len(set(sliding)) != 1:
            raise TqedgeError(f"sliding layers with different windows {sorted(set(sliding))} are not supported")
        fixed = WindowKVCache.layout_bytes(len(sliding), num_kv_heads, head_dim, sliding[0], dtype)
        if budget <= fixed:
            raise TqedgeError(f"KV budget {format_bytes(budget)} does not cover the sliding layers' fixed "
                              f"{sliding[0]}-token rings ({format_bytes(fixed)}) and a cache for the full layers")
        try:
            full = make_full(budget - fixed, full_layers)
        except TqedgeError as e:
            raise TqedgeError(f"{e} (after the sliding layers' fixed rings of {format_bytes(fixed)})") from None
        if full is None:
            return None
        cache = cls(windows, full, WindowKVCache(len(sliding), num_kv_heads, head_dim, sliding[0], dtype))
        cache.budget = budget
        return cache

    def __getattr__(self, name: str):
        """The full layers' cache settings (``window``, ``tq_k``, ``keys`` …: session files)."""
        full = self.__dict__.get("full")
        if full is None or name.startswith("__"):
            raise AttributeError(name)
        return getattr(full, name)

    # -- the interface ------------------------------------------------------------------------
    offset = property(lambda self: self.full.offset)
    length = property(lambda self: self.full.length)
    capacity = property(lambda self: self.full.capacity)
    slots = property(lambda self: self.full.slots)
    sinks = property(lambda self: self.full.slots.sinks)
    policy = property(lambda self: self.full.slots.policy)

    @property
    def evicted(self) -> int:
        """Tokens the cache can no longer rewind over: the full layers' evictions, or tokens that
        left the sliding rings (a ``trim`` would need them back)."""
        return max(self.full.evicted, self.offset - self.rings.window)

    @property
    def nbytes(self) -> int:
        return self.full.nbytes + self.rings.nbytes

    @property
    def bytes_per_token(self) -> float:
        """Bytes each further token costs (the full layers' only)."""
        per = getattr(self.full, "bytes_per_token", None)  # the exact cache has only a static method
        return float(per if isinstance(per, (int, float)) else self.full.nbytes / self.full.capacity)

    @property
    def fixed_bytes(self) -> int:
        """Bytes that do not grow with the tokens held: the rings plus the full layers' fixed part."""
        return self.rings.nbytes + getattr(self.full, "fixed_bytes", 0)

    def needed_bytes(self, tokens: int) -> int:
        """Budget that holds ``tokens`` tokens: the rings plus the full layers' share."""
        own = getattr(self.full, "needed_bytes", None)
        full = own(tokens) if callable(own) else -(-tokens * self.full.nbytes // self.full.capacity)
        return int(full + self.rings.nbytes)

    def prepare(self, t: int) -> None:
        self.full.prepare(t)
        self.rings.prepare(t)

    def descriptor(self) -> np.ndarray:
        """This step's int64 descriptor for the native op (kv_descriptor.layered); after prepare()."""
        return kv_descriptor.layered(self)

    def attend(self, layer: int, q, k, v, scale: float):
        part, j = self._route[layer]
        return part.attend(j, q, k, v, scale)

    def commit(self) -> None:
        self.full.commit()
        self.rings.commit()

    def trim(self, n: int) -> None:
        """Forget the last ``n`` tokens (only while no token has left a ring or been evicted)."""
        if self.evicted and n:
            raise TqedgeError("cannot trim a cache whose sliding layers have dropped tokens; reset it")
        self.full.trim(n)
        self.rings.offset -= n

    def reset(self) -> None:
        self.full.reset()
        self.rings.offset, self.rings._t = 0, None

    def state(self) -> dict:
        """The full layers' state plus the rings (``ring_keys``, ``ring_values``)."""
        return {**self.full.state(), "ring_keys": self.rings.keys, "ring_values": self.rings.values}

    def load_state(self, state: dict) -> None:
        from tqedge.runtime.cache import copy_state_arrays

        self.full.load_state(state)
        copy_state_arrays(state, {"ring_keys": self.rings.keys, "ring_values": self.rings.values})
        self.rings.offset, self.rings._t = self.full.offset, None

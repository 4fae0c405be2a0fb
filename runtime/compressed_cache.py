"""CompressedKVCache: a TurboQuant KV cache preallocated once from a byte budget.

Layout (per layer ``l``; ``S`` sinks, ``W`` window, ``R`` ring slots, ``Hkv`` heads, ``D`` dims)::

    fp_k, fp_v   float16 (L, Hkv, S + W, D)   slots [0, S): sink tokens (positions 0..S-1)
                                              slots S + (p % W): the last W tokens (a ring)
    k_codes[l]   uint8   (Hkv, R, Bk_l)       TurboQuant codes of every non-sink token held,
    k_scales[l]  float16 (Hkv, R, Pk_l)       at ring index (p - S) % R  (same for values)

A token's codes are computed from its fp16-rounded key/value, so where or when it was encoded
never changes them. Decode encodes lazily: new tokens go to the fp16 window only. On the
native backend's one-call step the op encodes the token leaving the window in the step it
leaves (one token per step); the Python path (:meth:`prepare`) encodes the window's backlog in
one batch per layer when its oldest token is about to leave it (every ``W`` steps: a 7× step
for SmolLM2 at W = 128, docs/RESULTS.md). Prefill encodes its tokens at once. Which copy a query
reads is decided by :class:`tqedge.runtime.attention.ReadRule`, the same in decode and prefill,
so the result does not depend on chunking.

The byte budget pays for the fixed fp16 buffers first; the rest becomes ring slots at the
codec's exact bytes per token (all layers, keys and values, codes and scales). Nothing grows
after construction; ``nbytes`` (all buffers) never exceeds the budget. Transient work arrays of
a prefill step (one dequantized tile of keys and values, per-row accumulators) are bounded by the
prefill chunk and the tile, not the context, and are not part of the budget.
"""

from __future__ import annotations

import numpy as np

from tqedge.errors import TqedgeError
from tqedge.runtime import attention, kv_descriptor
from tqedge.runtime.cache import SlotRing, copy_state_arrays
from tqedge.units import format_bytes

MIN_COMPRESSED = 32  # ring slots beyond the window that any budget must afford


class CompressedKVCache:
    """TurboQuant-compressed cache with fp16 sinks and recent window (see module docstring).

    Args:
        key_codecs, value_codecs: one ``TurboQuant`` per layer for keys / values.
        num_kv_heads: KV heads per layer.
        head_dim: dimensions per head.
        ring: compressed slots (non-sink tokens held); at least ``window``.
        sinks: first tokens kept in fp16 forever.
        window: recent tokens read in fp16.
        policy: ``"slide"`` (drop the oldest non-sink token when full) or ``"error"``.
        exact_prefill: tokens of one prefill step see each other in fp16 (breaks chunk invariance).
        budget: the byte budget it was sized from (for messages), if any.
    """

    kind = "turboquant"

    def __init__(self, key_codecs: list, value_codecs: list, num_kv_heads: int, head_dim: int, ring: int,
                 sinks: int = 4, window: int = 128, policy: str = "slide",
                 exact_prefill: bool = False, budget: int | None = None):
        if len(key_codecs) != len(value_codecs) or not key_codecs:
            raise TqedgeError("need one key and one value codec per layer")
        if sinks < 0 or window < 0:
            raise TqedgeError(f"sinks and window must be ≥ 0, got {sinks} and {window}")
        if ring < max(1, window):
            raise TqedgeError(f"compressed ring of {ring} slots is smaller than the {window}-token window")
        self.tq_k, self.tq_v = list(key_codecs), list(value_codecs)
        self.num_layers, self.num_kv_heads = len(key_codecs), num_kv_heads
        self.head_dim = head_dim
        self.sinks, self.window, self.ring = sinks, window, ring
        self.exact_prefill, self.budget = exact_prefill, budget
        self.slots = SlotRing(sinks + ring, sinks, policy)
        self.capacity = self.slots.capacity  # tokens held at most (fixed)
        self.fixed_bytes, self.bytes_per_token = self.layout_bytes(key_codecs, value_codecs, num_kv_heads,
                                                        self.head_dim, sinks, window)
        h, d = num_kv_heads, self.head_dim
        self.fp_k = np.zeros((self.num_layers, h, sinks + window, d), np.float16)  # (L, Hkv, S+W, D)
        self.fp_v = np.zeros_like(self.fp_k)
        self.k_codes = [np.zeros((h, ring, c.code_bytes), np.uint8) for c in key_codecs]  # (Hkv, R, Bk)
        self.k_scales = [np.zeros((h, ring, c.num_scales), np.float16) for c in key_codecs]  # (Hkv, R, Pk)
        self.v_codes = [np.zeros((h, ring, c.code_bytes), np.uint8) for c in value_codecs]
        self.v_scales = [np.zeros((h, ring, c.num_scales), np.float16) for c in value_codecs]
        arrays = [self.fp_k, self.fp_v, *self.k_codes, *self.k_scales, *self.v_codes, *self.v_scales]
        self.nbytes = sum(a.nbytes for a in arrays)  # bytes of all preallocated buffers (fixed)
        self._native_desc = None  # the native op's descriptor, built at the first descriptor() call
        self.reset()

    # -- sizing -----------------------------------------------------------------------------
    @staticmethod
    def layout_bytes(key_codecs, value_codecs, num_kv_heads: int, head_dim: int,
                     sinks: int, window: int) -> tuple[int, int]:
        """(fixed fp16 bytes of sinks + window, bytes per compressed token over all layers)."""
        fixed = 2 * len(key_codecs) * num_kv_heads * (sinks + window) * head_dim * 2
        per = num_kv_heads * sum(ck.code_bytes + 2 * ck.num_scales + cv.code_bytes + 2 * cv.num_scales
                                 for ck, cv in zip(key_codecs, value_codecs))
        return fixed, per

    @classmethod
    def from_budget(cls, budget: int, key_codecs: list, value_codecs: list, num_kv_heads: int,
                    head_dim: int, sinks: int = 4, window: int = 128, policy: str = "slide",
                    exact_prefill: bool = False) -> "CompressedKVCache":
        """Size the ring from ``budget`` bytes; refuse a budget below sinks + window + a minimum ring.

        Returns:
            A cache whose ``nbytes`` ≤ ``budget``.

        Raises:
            TqedgeError: the budget is too small (the message names the minimum).
        """
        ring = cls.ring_for(budget, key_codecs, value_codecs, num_kv_heads, head_dim, sinks, window)
        return cls(key_codecs, value_codecs, num_kv_heads, head_dim, ring, sinks, window, policy,
                   exact_prefill, budget)

    @classmethod
    def ring_for(cls, budget: int, key_codecs: list, value_codecs: list, num_kv_heads: int, head_dim: int,
                 sinks: int, window: int) -> int:
        """Compressed slots ``budget`` bytes hold beside the fp16 sinks + window (codecs or their
        configs); refuses a budget below ``window + MIN_COMPRESSED`` slots, naming the minimum."""
        fixed, per = cls.layout_bytes(key_codecs, value_codecs, num_kv_heads, head_dim, sinks, window)
        ring = max(0, budget - fixed) // per
        need = window + MIN_COMPRESSED
        if ring < need:
            minimum = fixed + need * per
            raise TqedgeError(
                f"KV budget {format_bytes(budget)} is too small for {sinks} sink + {window} window fp16 "
                f"tokens and {need} compressed slots; the minimum is {format_bytes(minimum)} ({minimum} bytes)")
        return int(ring)

    # -- the interface ----------------------------------------------------------------------
    offset = property(lambda self: self.slots.offset)
    length = property(lambda self: self.slots.length)
    evicted = property(lambda self: self.slots.evicted)

    def reset(self) -> None:
        self.slots.reset()
        self.encoded = 0  # non-sink positions below this have codes
        self.fp_lo = 0  # non-sink positions below this have no fp16 copy (set by trim)
        self._plan = None

    def trim(self, n: int) -> None:
        """Forget the last ``n`` tokens (before any eviction). The window's fp16 copies of the
        ``n`` tokens that preceded it are gone, so those read compressed until they age out."""
        before = self.slots.offset
        self.slots.trim(n)
        self.fp_lo = min(max(self.fp_lo, before - self.window), self.slots.offset)  # later positions get fresh fp16 copies
        self.encoded = min(self.encoded, self.slots.offset)

    def prepare(self, t: int) -> None:
        """Assign slots to ``t`` new tokens and plan this step's reads (shared by all layers)."""
        s = self.slots
        s.prepare(t, error_hint=lambda: self._full_hint(t))
        t0 = s.offset
        self._rule = attention.ReadRule(self.sinks, self.window, self.ring, self.fp_lo, t0,
                                        self.exact_prefill and t > 1)
        if t == 1:
            self._plan_decode(t0)
        else:
            self._plan_prefill(t0, t)

    def _full_hint(self, t: int) -> str:
        """The budget that would hold every token so far plus ``t`` (for the cache-full error)."""
        if self.budget is None:
            return ""
        s = self.slots
        need = self.fixed_bytes + max(self.window + MIN_COMPRESSED, s.length + t - self.sinks) * self.bytes_per_token
        return f" (budget {format_bytes(self.budget)}; {s.length + t} tokens need a budget of {format_bytes(need)})"

    def commit(self) -> None:
        self.slots.commit()
        self.encoded = self._encoded_after
        self._plan = None

    def attend(self, layer: int, q: np.ndarray, k: np.ndarray, v: np.ndarray, scale: float) -> np.ndarray:
        """Store this layer's new keys/values and attend causally (GQA) under the read rule.

        Args:
            layer: layer index.
            q: (T, Hq, D) float32, RoPE applied.
            k: (T, Hkv, D) float32, RoPE applied.
            v: (T, Hkv, D) float32.
            scale: softmax scale.

        Returns:
            (T, Hq, D) float32 attention output.
        """
        if self._plan is None:
            raise TqedgeError("cache.attend called outside prepare()/commit()")
        if q.shape[0] == 1:
            return self._attend_decode(layer, q, k, v, scale)
        return self._attend_prefill(layer, q, k, v, scale)

    def descriptor(self) -> np.ndarray:
        """This step's int64 descriptor for the native op (runtime/kv_descriptor.py); after prepare()."""
        return kv_descriptor.turboquant(self)

    # -- decode -----------------------------------------------------------------------------
    def _plan_decode(self, t0: int) -> None:
        S, W, R = self.sinks, self.window, self.ring
        if W and self.encoded <= t0 - W:  # the window's oldest token is about to leave it
            self._encode_backlog(t0)
        self._encoded_after = t0 + 1 if W == 0 and t0 >= S else self.encoded
        r = np.arange(W)
        p = t0 - (t0 - r) % W  # (W,) position each ring slot holds once this token is written
        ok = np.concatenate([np.arange(S) <= t0, (p >= S) & ((p >= self.fp_lo) | (p == t0))])
        self._fp_bias = np.where(ok, 0.0, -np.inf).astype(np.float32)  # (S+W,)
        lo = max(S, t0 - R + 1)
        hi = t0 + 1 if W == 0 else max(t0 - W + 1, self.fp_lo)
        self._plan = ("decode", self._ring_ranges(lo, hi))

    def _attend_decode(self, layer, q, k, v, scale):
        t0, S, W = self.slots.offset, self.sinks, self.window
        k16, v16 = k[0].astype(np.float16), v[0].astype(np.float16)  # (Hkv, D)
        if t0 < S or W:
            slot = t0 if t0 < S else S + t0 % W
            self.fp_k[layer][:, slot] = k16
            self.fp_v[layer][:, slot] = v16
        if t0 >= S and not W:
            self._store_codes(layer, np.array([t0]), *self._encode(layer, k16[:, None], v16[:, None]))
        kc, ks, vc, vs = self.k_codes[layer], self.k_scales[layer], self.v_codes[layer], self.v_scales[layer]
        parts = [(kc[:, a:b], ks[:, a:b], vc[:, a:b], vs[:, a:b]) for a, b in self._plan[1]]  # ring ranges
        out = attention.decode(q[0], scale, self.fp_k[layer], self.fp_v[layer], self._fp_bias,
                               self.tq_k[layer], self.tq_v[layer], parts)  # (Hq, D)
        return out[None]

    # -- prefill ----------------------------------------------------------------------------
    def _plan_prefill(self, t0: int, t: int) -> None:
        S, W = self.sinks, self.window
        self._encode_backlog(t0)  # every old token read compressed has its codes
        self._encoded_after = t0 + t
        old_sinks = np.arange(min(S, t0))
        old_win = np.arange(max(S, self.fp_lo, t0 - W + 1), t0) if W else np.arange(0)
        fp_slots = np.concatenate([old_sinks, S + old_win % max(W, 1)]).astype(np.int64)
        pos = np.arange(t0, t0 + t)  # (T,)
        pf = np.concatenate([old_sinks, old_win, pos])  # (Nf,) ascending
        old_c = np.arange(max(S, t0 - self.ring + 1), min(t0, max(t0 + t - W, self.fp_lo)))
        new_c_all = np.arange(max(S, t0), t0 + t)  # new tokens that get codes
        # new tokens some row of this step reads compressed: positions < t0 + t - W
        n_new_read = 0 if self._rule.exact_prefill else int(np.sum(new_c_all < t0 + t - W))
        pc = np.concatenate([old_c, new_c_all[:n_new_read]])  # (Nc,) ascending
        self._plan = ("prefill", fp_slots, pf, pos, (old_c - S) % self.ring, pc, new_c_all, n_new_read)

    def _attend_prefill(self, layer, q, k, v, scale):
        _, fp_slots, pf, pos, old_idx, pc, new_c, n_new_read = self._plan
        S, W, L = self.sinks, self.window, layer
        t, tq_k, tq_v = len(pos), self.tq_k[L], self.tq_v[L]
        k16 = k.astype(np.float16).transpose(1, 0, 2)  # (Hkv, T, D)
        v16 = v.astype(np.float16).transpose(1, 0, 2)
        kf = np.concatenate([self.fp_k[L][:, fp_slots], k16], axis=1).astype(np.float32)  # (Hkv, Nf, D)
        vf = np.concatenate([self.fp_v[L][:, fp_slots], v16], axis=1).astype(np.float32)
        n_sink_new = t - len(new_c)
        kc_new, ks_new, vc_new, vs_new = self._encode(L, k16[:, n_sink_new:], v16[:, n_sink_new:])
        n_old = len(old_idx)

        def load_compressed(a: int, b: int):
            """Entries a:b of this step's compressed reads (old ring slots, then new tokens),
            dequantized in the projected domain: one tile, never the whole context."""
            out = []
            for tq, codes, scales, c_new, s_new in ((tq_k, self.k_codes[L], self.k_scales[L], kc_new, ks_new),
                                                    (tq_v, self.v_codes[L], self.v_scales[L], vc_new, vs_new)):
                parts = []
                if a < n_old:
                    ring = old_idx[a:min(b, n_old)]
                    parts.append(tq.dequantize_projected(codes[:, ring], scales[:, ring]))
                if b > n_old:
                    new = slice(max(a, n_old) - n_old, b - n_old)
                    parts.append(tq.dequantize_projected(c_new[:, new], s_new[:, new]))
                out.append(parts[0] if len(parts) == 1 else np.concatenate(parts, axis=1))  # (Hkv, b-a, Dp)
            return out

        out = attention.prefill(q, pos, scale, self._rule, kf, vf, pf, pc, load_compressed, tq_k, tq_v)
        # store after attending: the new tokens overwrite slots earlier rows of this step read
        sink_new = pos[pos < S]
        self.fp_k[L][:, sink_new] = k16[:, :len(sink_new)]
        self.fp_v[L][:, sink_new] = v16[:, :len(sink_new)]
        if W:
            keep = slice(max(0, len(new_c) - W), len(new_c))
            self.fp_k[L][:, S + new_c[keep] % W] = k16[:, n_sink_new:][:, keep]
            self.fp_v[L][:, S + new_c[keep] % W] = v16[:, n_sink_new:][:, keep]
        self._store_codes(L, new_c, kc_new, ks_new, vc_new, vs_new)
        return out

    # -- codes ------------------------------------------------------------------------------
    def _encode(self, layer: int, k16: np.ndarray, v16: np.ndarray):
        """Codes of fp16 keys/values (Hkv, n, D) → k_codes (Hkv, n, Bk), k_scales, v_codes, v_scales."""
        h, n, d = k16.shape
        kc, ks = self.tq_k[layer].encode(k16.reshape(h * n, d).astype(np.float32))  # (Hkv*n, Bk), (Hkv*n, Pk)
        vc, vs = self.tq_v[layer].encode(v16.reshape(h * n, d).astype(np.float32))
        return tuple(a.reshape(h, n, a.shape[-1]) for a in (kc, ks, vc, vs))  # n may be 0 (all sinks)

    def _store_codes(self, layer: int, positions: np.ndarray, kc, ks, vc, vs) -> None:
        idx = (positions - self.sinks) % self.ring  # (n,) ring indices
        self.k_codes[layer][:, idx], self.k_scales[layer][:, idx] = kc, ks
        self.v_codes[layer][:, idx], self.v_scales[layer][:, idx] = vc, vs

    def _encode_backlog(self, t0: int) -> None:
        """Encode, for every layer, the window tokens [encoded, t0) that have no codes yet."""
        start = max(self.encoded, self.sinks)
        if start < t0:
            pos = np.arange(start, t0)
            slots = self.sinks + pos % self.window
            for layer in range(self.num_layers):
                codes = self._encode(layer, self.fp_k[layer][:, slots], self.fp_v[layer][:, slots])
                self._store_codes(layer, pos, *codes)
        self.encoded = max(self.encoded, t0)

    def _ring_ranges(self, lo: int, hi: int) -> list[tuple[int, int]]:
        """Ring index ranges holding positions [lo, hi) (at most two, when they wrap)."""
        n = hi - lo
        if n <= 0:
            return []
        a = (lo - self.sinks) % self.ring
        if a + n <= self.ring:
            return [(a, a + n)]
        return [(a, self.ring), (0, a + n - self.ring)]

    # -- save / restore ---------------------------------------------------------------------
    def state(self) -> dict:
        """Plain arrays and ints that fully describe the cache (no pickle needed)."""
        out = {"fp_k": self.fp_k, "fp_v": self.fp_v, **self.slots.state(), "encoded": self.encoded,
               "fp_lo": self.fp_lo, "sinks": self.sinks, "window": self.window, "ring": self.ring}
        for l_ in range(self.num_layers):
            out[f"k_codes.{l_}"], out[f"k_scales.{l_}"] = self.k_codes[l_], self.k_scales[l_]
            out[f"v_codes.{l_}"], out[f"v_scales.{l_}"] = self.v_codes[l_], self.v_scales[l_]
        return out

    def load_state(self, state: dict) -> None:
        """Restore from :meth:`state` of a cache with the same configuration (bit-exact)."""
        for key in ("sinks", "window", "ring"):
            if int(state.get(key, -1)) != getattr(self, key):
                raise TqedgeError(f"saved cache has {key}={state.get(key)}, this cache {getattr(self, key)}")
        copy_state_arrays(state, {k: a for k, a in self.state().items() if isinstance(a, np.ndarray)})
        self.slots.load_state(state)
        self.encoded, self.fp_lo, self._plan = int(state["encoded"]), int(state["fp_lo"]), None

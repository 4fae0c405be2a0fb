"""Fused attention kernels for the native onnxruntime op: pure Numba functions on arrays.

Called from the ``TurboQuantAttention`` cfunc (:mod:`tqedge.runtime.native_op`) on the thread
that called ``Run``, without the GIL: they are serial (no ``prange``: Numba's workqueue layer
aborts when two threads launch parallel regions), allocate only small scratch arrays, never
raise (callers validate shapes first) and write only into the arrays they are given.

- :func:`exact_attend`: causal GQA softmax attention over an fp32 slot cache (old slots a
  prefix or a mask, new tokens causal among themselves), then stores the new keys/values.
- :func:`f32_to_f16` / :func:`f16_to_f32`: IEEE half conversions (round to nearest even, like
  NumPy's ``astype(np.float16)``) without Numba float16 support.

Every function gives the results of its NumPy counterpart (``runtime/cache.py``'s
``exact_attention``) up to float32 summation order.
"""

from __future__ import annotations

import numpy as np
from tqedge.codec.numba_runtime import njit

_OPTS = dict(warm=False, nogil=True, fastmath={"reassoc", "contract", "nsz", "arcp", "afn"})  # -inf kept


@njit(**_OPTS)
def exact_attend(q, k, v, keys, values, n_old, mask, new_slots, scale, out):
    """Attention of T new tokens over an fp32 slot cache, then store their keys/values.

    Args:
        q: (T, Hq, D) float32 queries (RoPE applied).
        k, v: (T, Hkv, D) float32 new keys / values.
        keys, values: (Hkv, C, D) float32 the layer's slots.
        n_old: slots ``[0, n_old)`` are visible; -1: the slots where ``mask`` (C,) is non-zero.
        mask: (C,) uint8 (read only when ``n_old == -1``).
        new_slots: (T,) int64 slots the new tokens go to (in [0, C)).
        scale: softmax scale.
        out: (T, Hq, D) float32 result.
    """
    t, hq, d = q.shape
    hkv = k.shape[1]
    g = hq // hkv
    c = keys.shape[1]
    if n_old >= 0:
        idx = np.arange(n_old)
    else:
        idx = np.nonzero(mask[:c])[0]
    n = idx.shape[0]
    s = np.empty((g, n + t), np.float32)
    acc = np.empty((g, d), np.float32)
    for h in range(hkv):
        kh = keys[h]
        vh = values[h]
        for i in range(t):
            qi = q[i, h * g:(h + 1) * g]  # (G, D)
            m = np.full(g, -np.inf, np.float32)
            for j in range(n):
                kr = kh[idx[j]]
                for gg in range(g):
                    a = np.float32(0.0)
                    for x in range(d):
                        a += qi[gg, x] * kr[x]
                    a *= scale
                    s[gg, j] = a
                    if a > m[gg]:
                        m[gg] = a
            for j in range(i + 1):
                kr = k[j, h]
                for gg in range(g):
                    a = np.float32(0.0)
                    for x in range(d):
                        a += qi[gg, x] * kr[x]
                    a *= scale
                    s[gg, n + j] = a
                    if a > m[gg]:
                        m[gg] = a
            acc[:] = 0.0
            den = np.zeros(g, np.float32)
            for j in range(n + i + 1):
                vr = vh[idx[j]] if j < n else v[j - n, h]
                for gg in range(g):
                    p = np.exp(s[gg, j] - m[gg])
                    den[gg] += p
                    for x in range(d):
                        acc[gg, x] += p * vr[x]
            for gg in range(g):
                inv = np.float32(1.0) / den[gg]
                for x in range(d):
                    out[i, h * g + gg, x] = acc[gg, x] * inv
    for i in range(t):
        sl = new_slots[i]
        for h in range(hkv):
            keys[h, sl] = k[i, h]
            values[h, sl] = v[i, h]


@njit(inline="always", **_OPTS)
def f32_to_f16(x):
    """float (any) → float16 bit pattern (uint16), round to nearest even, like NumPy's astype."""
    f = np.float64(x)
    sign = np.uint16(0x8000) if f < 0 or (f == 0 and np.copysign(1.0, f) < 0) else np.uint16(0)
    a = abs(f)
    if a != a:
        return np.uint16(0x7E00)
    if a >= 65520.0:  # rounds past the largest half (65504)
        return sign | np.uint16(0x7C00)
    if a < 2.0 ** -24 * 0.5:
        return sign
    e = np.int64(np.floor(np.log2(a)))
    if 2.0 ** e > a:  # log2 rounding at exact powers of two
        e -= 1
    elif 2.0 ** (e + 1) <= a:
        e += 1
    if e < -14:  # subnormal: units of 2^-24
        mant = np.rint(a * 2.0 ** 24)  # rint: round half to even
        return sign | np.uint16(mant)
    mant = np.rint((a / 2.0 ** e - 1.0) * 1024.0)
    if mant >= 1024:
        mant = 0
        e += 1
    if e > 15:
        return sign | np.uint16(0x7C00)
    return sign | np.uint16((e + 15) << 10) | np.uint16(mant)


@njit(inline="always", **_OPTS)
def f16_to_f32(h):
    """float16 bit pattern → float32."""
    h = np.int32(h)
    e = (h >> 10) & 0x1F
    m = h & 0x3FF
    if e == 0:
        v = np.float32(m) * np.float32(5.960464477539063e-08)
    elif e == 31:
        v = np.float32(np.inf) if m == 0 else np.float32(np.nan)
    else:
        v = np.float32((1024 + m) * 2.0 ** (e - 25))
    return -v if h & 0x8000 else v

"""The softmax's exponential as a loop LLVM vectorizes (pure Numba functions on arrays).

``np.exp`` inside a Numba loop compiles to one scalar call per element: in the attention op's
softmax (three queries per key and KV head with SmolLM2's GQA) it cost 18–30 ns per key and head,
as much as decoding and scoring the key. :func:`exp_sub` computes ``exp(x - m)`` with Cephes'
``expf`` (range reduction by ln 2 in two parts, a degree-5 polynomial, the power of two built in
the exponent bits), which AVX2 or NEON run 8 or 4 lanes at a time: 3.9 vs 18.2 ns per key and
head here, at float32 accuracy (relative error ≤ 3e-7 against float64; NumPy's float32 ``exp``:
1.8e-7).

Arguments below ``EXP_MIN`` (−87: ``exp`` is then below float32's smallest normal) give exactly
0, ``-inf`` included, so masked scores need no branch; the callers pass ``m`` ≥ every ``x``,
so arguments are ≤ 0 (they are clamped to ``EXP_MAX`` anyway).

It is inlined into its callers (Numba IR), so it has no machine-code symbol of its own: compiled
as a function, the copy linked into the native op's cfunc and the standalone copy (loaded once
Python had called it) shared one weak symbol, and the op ran whichever the process had loaded
first. Their float sums differ in the last bits, enough to flip a near-tie first token of the
README's prompt between a fresh and a warm install (measured; ``tests/test_warmup.py``).
"""

from __future__ import annotations

import numpy as np

from tqedge.codec.numba_runtime import njit

_OPTS = dict(warm=False, nogil=True, fastmath={"reassoc", "contract", "nsz", "arcp", "afn"})  # -inf kept

EXP_MIN = np.float32(-87.0)
EXP_MAX = np.float32(88.0)
_LOG2E = np.float32(1.4426950408889634)
_LN2_HI = np.float32(0.693359375)  # ln 2 = _LN2_HI + _LN2_LO; k·_LN2_HI is exact for |k| < 2^9
_LN2_LO = np.float32(-2.12194440e-4)
_P = tuple(np.float32(c) for c in (1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2,
                                    1.6666665459e-1, 5.0000001201e-1))


@njit(inline="always", **_OPTS)  # no symbol of its own: see the module docstring
def exp_sub(x, m, scratch):
    """``x[j] = exp(x[j] - m)`` in place over the 1-D float32 ``x``; returns the float32 sum.

    ``scratch``: int32 array with at least ``len(x)`` elements (the powers of two are built
    there and read back as float32: one vectorized pass each)."""
    n = x.shape[0]
    kb = scratch[:n]
    for j in range(n):
        v = x[j] - m
        keep = v >= EXP_MIN
        v = min(max(v, EXP_MIN), EXP_MAX)
        k = np.floor(v * _LOG2E + np.float32(0.5))
        r = v - k * _LN2_HI - k * _LN2_LO
        p = ((((_P[0] * r + _P[1]) * r + _P[2]) * r + _P[3]) * r + _P[4]) * r + _P[5]
        p = p * r * r + r + np.float32(1.0)
        x[j] = p if keep else np.float32(0.0)
        kb[j] = (np.int32(k) + np.int32(127)) << np.int32(23)
    two_k = kb.view(np.float32)
    total = np.float32(0.0)
    for j in range(n):
        e = x[j] * two_k[j]
        x[j] = e
        total += e
    return total

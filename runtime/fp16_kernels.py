"""Decode kernels over the cache's float16 buffers (sinks + recent window) without converting them.

NumPy's float16 → float32 conversion costs more than the attention itself at decode sizes, so
with Numba the fp16 bit patterns are decoded inline. Same backend choice as the codec kernels
(:mod:`tqedge.codec.kernels`: Numba unless absent or ``TQEDGE_KERNELS=numpy``); the NumPy path
converts and uses BLAS. Both give the same results up to float32 summation order.

- ``scores(qh (H, G, D) f32, k16 (H, N, D) f16, bias (N,) f32) -> (H, G, N)``: ``qh·k + bias``
- ``weighted_sum(p (H, G, N) f32, v16 (H, N, D) f16) -> (H, G, D)``: ``Σ_n p·v``
"""

from __future__ import annotations

import numpy as np

from tqedge.codec import kernels as _codec_kernels

BACKEND = _codec_kernels.BACKEND


def _scores_numpy(qh, k16, bias):
    s = np.matmul(qh, k16.astype(np.float32).transpose(0, 2, 1))  # (H, G, N)
    s += bias
    return s


def _weighted_sum_numpy(p, v16):
    return np.matmul(p, v16.astype(np.float32))  # (H, G, D)


if BACKEND == "numba":
    from tqedge.codec.kernels_fused import f16_rows_to_f32
    from tqedge.codec.numba_runtime import njit  # cached in the user's cache dir

    # no nnan/ninf: the bias holds -inf for slots not to read
    _FLAGS = {"reassoc", "contract", "nsz", "arcp", "afn"}
    ROWS = 8  # fp16 rows converted per pass (a multiple of 4: the dot products take 4 rows at a time)

    @njit(fastmath=_FLAGS, nogil=True)
    def _scores_numba(qh, k16u, bias):
        nh, ng, d = qh.shape
        n = k16u.shape[1]
        out = np.empty((nh, ng, n), dtype=np.float32)
        tile = np.zeros((ROWS, d), dtype=np.float32)
        skip = np.empty(n, dtype=np.bool_)
        for i in range(n):
            skip[i] = bias[i] == -np.inf
        for h in range(nh):
            for i0 in range(0, n, ROWS):
                nr = min(ROWS, n - i0)
                f16_rows_to_f32(k16u[h], i0, nr, skip, tile)
                for g in range(ng):
                    q = qh[h, g]
                    for r in range(0, nr, 4):  # four rows per pass: q is loaded once for four keys
                        t0, t1, t2, t3 = tile[r], tile[r + 1], tile[r + 2], tile[r + 3]
                        a0 = np.float32(0.0)
                        a1 = np.float32(0.0)
                        a2 = np.float32(0.0)
                        a3 = np.float32(0.0)
                        for j in range(d):
                            a0 += q[j] * t0[j]
                            a1 += q[j] * t1[j]
                            a2 += q[j] * t2[j]
                            a3 += q[j] * t3[j]
                        for k, a in enumerate((a0, a1, a2, a3)):
                            if r + k < nr:
                                i = i0 + r + k
                                out[h, g, i] = -np.inf if skip[i] else a + bias[i]
        return out

    @njit(fastmath=_FLAGS, nogil=True)
    def _weighted_sum_numba(p, v16u):
        nh, ng, n = p.shape
        d = v16u.shape[2]
        out = np.zeros((nh, ng, d), dtype=np.float32)
        tile = np.zeros((ROWS, d), dtype=np.float32)
        skip = np.empty(n, dtype=np.bool_)
        for h in range(nh):
            for i in range(n):  # a row no query weighs is not read (an unwritten slot may hold NaN)
                s = True
                for g in range(ng):
                    if p[h, g, i] != 0.0:
                        s = False
                skip[i] = s
            for i0 in range(0, n, ROWS):
                nr = min(ROWS, n - i0)
                f16_rows_to_f32(v16u[h], i0, nr, skip, tile)
                tile[nr:] = 0.0  # rows past nr are weighed 0: no stale inf may make a NaN
                for g in range(ng):
                    acc = out[h, g]
                    for r in range(0, nr, 4):  # four rows per pass: acc is loaded and stored once
                        t0, t1, t2, t3 = tile[r], tile[r + 1], tile[r + 2], tile[r + 3]
                        w0 = p[h, g, i0 + r]
                        w1 = p[h, g, i0 + r + 1] if r + 1 < nr else np.float32(0.0)
                        w2 = p[h, g, i0 + r + 2] if r + 2 < nr else np.float32(0.0)
                        w3 = p[h, g, i0 + r + 3] if r + 3 < nr else np.float32(0.0)
                        for j in range(d):
                            acc[j] += w0 * t0[j] + w1 * t1[j] + w2 * t2[j] + w3 * t3[j]
        return out

    # on the uint16 bit patterns, for nopython callers (the native op)
    scores_u16, weighted_sum_u16 = _scores_numba, _weighted_sum_numba

    def scores(qh: np.ndarray, k16: np.ndarray, bias: np.ndarray) -> np.ndarray:
        """Scores (H, G, N) of queries ``qh`` (H, G, D) against fp16 keys (H, N, D), plus ``bias`` (N,)."""
        return _scores_numba(qh, k16.view(np.uint16), bias)

    def weighted_sum(p: np.ndarray, v16: np.ndarray) -> np.ndarray:
        """Σ_n p[h, g, n] · v16[h, n]: (H, G, N) f32, (H, N, D) f16 → (H, G, D) float32."""
        return _weighted_sum_numba(p, v16.view(np.uint16))
else:
    scores = _scores_numpy
    weighted_sum = _weighted_sum_numpy

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
    from tqedge.codec.kernels_fused import f16_row_to_f32
    from tqedge.codec.numba_runtime import njit  # cached in the user's cache dir

    # no nnan/ninf: the bias holds -inf for slots not to read
    _FLAGS = {"reassoc", "contract", "nsz", "arcp", "afn"}

    @njit(fastmath=_FLAGS, nogil=True)
    def _scores_numba(qh, k16u, bias):
        nh, ng, d = qh.shape
        n = k16u.shape[1]
        out = np.empty((nh, ng, n), dtype=np.float32)
        buf = np.empty(d, dtype=np.float32)
        for h in range(nh):
            for i in range(n):
                if bias[i] == -np.inf:
                    for g in range(ng):
                        out[h, g, i] = -np.inf
                    continue
                f16_row_to_f32(k16u[h, i], buf)
                for g in range(ng):
                    acc = np.float32(0.0)
                    for j in range(d):
                        acc += qh[h, g, j] * buf[j]
                    out[h, g, i] = acc + bias[i]
        return out

    @njit(fastmath=_FLAGS, nogil=True)
    def _weighted_sum_numba(p, v16u):
        nh, ng, n = p.shape
        d = v16u.shape[2]
        out = np.zeros((nh, ng, d), dtype=np.float32)
        buf = np.empty(d, dtype=np.float32)
        for h in range(nh):
            for i in range(n):
                skip = True
                for g in range(ng):
                    if p[h, g, i] != 0.0:
                        skip = False
                if skip:
                    continue
                f16_row_to_f32(v16u[h, i], buf)
                for g in range(ng):
                    w = p[h, g, i]
                    for j in range(d):
                        out[h, g, j] += w * buf[j]
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

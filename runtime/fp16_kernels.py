"""Decode kernels over the cache's float16 buffers (sinks + recent window) without converting them.

NumPy's float16 → float32 conversion costs more than the attention itself at decode sizes, so
with Numba the fp16 bit patterns are decoded inline: by the LLVM IR block kernels of
:mod:`tqedge.codec.simd` (four rows widened by ``fpext`` and dotted in registers; any CPU)
when the shapes allow (at most 8 queries per KV head, head size a multiple of 16 up to 256),
else by Numba loops over a small tile. Same backend choice as the codec kernels
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
    from tqedge.codec import simd as P
    from tqedge.codec.kernels_fused import f16_rows_to_f32
    from tqedge.codec.numba_runtime import njit  # cached in the user's cache dir

    # no nnan/ninf: the bias holds -inf for slots not to read
    _FLAGS = {"reassoc", "contract", "nsz", "arcp", "afn"}
    ROWS = 8  # fp16 rows converted per pass (a multiple of 4: the dot products take 4 rows at a time)

    @njit(inline="always", fastmath=_FLAGS, nogil=True)
    def _blocks_ok(ng, d, rows16, vecs, per_row):
        """Whether the LLVM IR block kernels (:mod:`tqedge.codec.simd`, any CPU) take the call:
        unit strides where they read vectors, at most GMAX queries, 16 ≤ D ≤ 256 in steps of 16."""
        return ng <= P.GMAX and d % P.LANES == 0 and d <= P.LANES * P.NKMAX and rows16.strides[2] == 2 \
            and vecs.strides[vecs.ndim - 1] == 4 and per_row.strides[per_row.ndim - 1] == 4

    @njit(inline="always", fastmath=_FLAGS, nogil=True)
    def _scores4(nk, src, rs, qa, qs, ng, ba, oa, outs):  # the head sizes 64, 128, 256 unrolled
        if nk == 4:
            P.f16_scores_block(4, src, rs, qa, qs, ng, 4, ba, oa, outs)
        elif nk == 8:
            P.f16_scores_block(4, src, rs, qa, qs, ng, 8, ba, oa, outs)
        elif nk == 16:
            P.f16_scores_block(4, src, rs, qa, qs, ng, 16, ba, oa, outs)
        else:
            P.f16_scores_block(4, src, rs, qa, qs, ng, nk, ba, oa, outs)

    @njit(inline="always", fastmath=_FLAGS, nogil=True)
    def _values4(nk, src, rs, pa, ps, ng, aa, ast):
        if nk == 4:
            P.f16_values_block(4, src, rs, pa, ps, ng, 4, aa, ast)
        elif nk == 8:
            P.f16_values_block(4, src, rs, pa, ps, ng, 8, aa, ast)
        elif nk == 16:
            P.f16_values_block(4, src, rs, pa, ps, ng, 16, aa, ast)
        else:
            P.f16_values_block(4, src, rs, pa, ps, ng, nk, aa, ast)

    @njit(fastmath=_FLAGS, nogil=True)
    def _scores_blocks(qh, k16u, bias, out):
        nh, ng, d = qh.shape
        n, nk = k16u.shape[1], d // P.LANES
        rs, qs, outs = np.int64(k16u.strides[1]), np.int64(qh.strides[1]), np.int64(out.strides[1])
        ba = np.int64(bias.ctypes.data)
        for h in range(nh):
            src = np.int64(k16u.ctypes.data) + h * np.int64(k16u.strides[0])
            qa = np.int64(qh.ctypes.data) + h * np.int64(qh.strides[0])
            oa = np.int64(out.ctypes.data) + h * np.int64(out.strides[0])
            r = 0
            while r + P.ROWS <= n:
                _scores4(nk, src + r * rs, rs, qa, qs, ng, ba + 4 * r, oa + 4 * r, outs)
                r += P.ROWS
            while r < n:
                P.f16_scores_block(1, src + r * rs, rs, qa, qs, ng, nk, ba + 4 * r, oa + 4 * r, outs)
                r += 1

    @njit(fastmath=_FLAGS, nogil=True)
    def _values_blocks(p, v16u, out):
        nh, ng, n = p.shape
        nk = v16u.shape[2] // P.LANES
        rs, ps, ast = np.int64(v16u.strides[1]), np.int64(p.strides[1]), np.int64(out.strides[1])
        read = np.empty(n + P.ROWS, dtype=np.bool_)
        read[n:] = False
        for h in range(nh):
            for i in range(n):  # a row no query weighs is not read (an unwritten slot may hold NaN)
                read[i] = False
                for g in range(ng):
                    if p[h, g, i] != 0.0:
                        read[i] = True
            src = np.int64(v16u.ctypes.data) + h * np.int64(v16u.strides[0])
            pa = np.int64(p.ctypes.data) + h * np.int64(p.strides[0])
            aa = np.int64(out.ctypes.data) + h * np.int64(out.strides[0])
            r = 0
            while r < n:
                if not read[r]:
                    r += 1
                elif read[r + 1] and read[r + 2] and read[r + 3]:
                    _values4(nk, src + r * rs, rs, pa + 4 * r, ps, ng, aa, ast)
                    r += P.ROWS
                else:
                    P.f16_values_block(1, src + r * rs, rs, pa + 4 * r, ps, ng, nk, aa, ast)
                    r += 1

    @njit(fastmath=_FLAGS, nogil=True)
    def _scores_numba(qh, k16u, bias):
        nh, ng, d = qh.shape
        n = k16u.shape[1]
        out = np.empty((nh, ng, n), dtype=np.float32)
        if _blocks_ok(ng, d, k16u, qh, bias):
            _scores_blocks(qh, k16u, bias, out)
            return out
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
        if _blocks_ok(ng, d, v16u, out, p):
            _values_blocks(p, v16u, out)
            return out
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

"""Pure Numba functions of the int4 linears carried over from a GGUF Q4_1 file (``d*q + m`` per
block of 32 inputs, float16 ``d`` and ``m``).

**Block minimums** (:func:`add_block_offsets`, the ``AddBlockOffsets`` op of bundles before round
28): ``MatMulNBits`` takes the codes and scales as they are (zero
point 0: the ``d*q`` part, exporters/weights.py) and this adds the ``m`` part,

    out = y + blocksum(x) @ mins        x (T, K), y (T, N), mins (K / block, N)

with ``mins`` float16 as the GGUF stores it (a decode step reads 6.6 MB of minimums instead of
13.3, SmolLM2-135M).

**The whole linear** (:func:`q4_1_gemm`, :func:`q4_1_gemv`, the ``LinearQ4_1`` op): the file's own
blocks, 16 rows at a time as group blocks (:func:`group_q4_1`), against inputs quantized to int8
per block (:func:`quantize_rows_q8`), through the vector kernel of :mod:`tqedge.codec.simd_linear`.

Same contract as :mod:`tqedge.codec.kernels_fused`: serial, no raise (the ops validate shapes
first), writes only ``out``; results are the NumPy formulas' up to float32 summation order.
"""
from __future__ import annotations

import numpy as np

from tqedge.codec import simd_linear as L
from tqedge.codec.kernels_fused import f16_rows_to_f32, half_to_float
from tqedge.codec.numba_runtime import njit

_OPTS = dict(warm=False, nogil=True, fastmath={"reassoc", "contract", "nsz", "arcp", "afn"})


@njit(inline="always", **_OPTS)
def _block_sums(xr, nb, s):
    bs = xr.shape[0] // nb
    for b in range(nb):
        a = np.float32(0.0)
        for i in range(b * bs, b * bs + bs):
            a += xr[i]
        s[b] = a


@njit(**_OPTS)
def add_block_offsets(x, y, mins, out):
    """``out = y + blocksum(x) @ mins``: ``x`` (T, K) and ``y``, ``out`` (T, N) float32, ``mins``
    (nb, N) float16 bit patterns (uint16) with ``K = nb * block``. One row (a decode step) widens
    each half as it reads it, with no scratch; several rows widen the minimums once (nb × N
    float32, 110 KB at most for SmolLM2), then every row reads them."""
    t = x.shape[0]
    nb, n = mins.shape
    s = np.empty(nb, np.float32)
    acc = np.empty(n, np.float32)
    if t == 1:
        _block_sums(x[0], nb, s)
        acc[:] = 0.0
        for b in range(nb):
            sb, mb = s[b], mins[b]
            for j in range(n):
                acc[j] += sb * half_to_float(mb[j])
        for j in range(n):
            out[0, j] = y[0, j] + acc[j]
        return
    m = np.empty((nb, n), np.float32)
    f16_rows_to_f32(mins, 0, nb, np.zeros(nb, np.bool_), m)
    for r in range(t):
        _block_sums(x[r], nb, s)
        acc[:] = 0.0
        for b in range(nb):
            sb, mb = s[b], m[b]
            for j in range(n):
                acc[j] += sb * mb[j]
        yr, o = y[r], out[r]
        for j in range(n):
            o[j] = yr[j] + acc[j]


# -- a GGUF Q4_1 linear (the vector kernel of tqedge.codec.simd_linear) --------------------------
@njit(warm=False, nogil=True)
def quantize_row_q8(x, xq, dx, sx):
    """``x`` (nb·32 float32, contiguous) → int8 codes ``xq`` (nb·32) with one scale per block of 32 (``dx =
    max|x| / 127``, code ``rint(x · (127 / max|x|))``, 0 for an all-zero block: MLAS's rule for
    ``MatMulNBits``, so both give the same codes) and each block's float32 sum ``sx``, summed
    pairwise (:func:`tqedge.codec.simd_linear.quantize_block`, a block in registers)."""
    xa, qa, da, sa = x.ctypes.data, xq.ctypes.data, dx.ctypes.data, sx.ctypes.data
    for b in range(dx.shape[0]):
        L.quantize_block(xa + 4 * L.Q4_1_BLOCK * b, qa + L.XQ_BYTES * b, da + 4 * b, sa + 4 * b)


@njit(warm=False, nogil=True)
def quantize_rows_q8(x, xq, dx, sx):
    """:func:`quantize_row_q8` of every row of ``x`` (T, nb·32) into ``xq`` (T, nb·32), ``dx``, ``sx`` (T, nb)."""
    for t in range(x.shape[0]):
        quantize_row_q8(x[t], xq[t], dx[t], sx[t])


@njit(warm=False, nogil=True)
def q4_1_gemm(w16, xq, dx, sx, out, lo, hi):
    """``out[:, lo:hi] = X @ W[lo:hi].T`` for input rows quantized by :func:`quantize_rows_q8`
    (``xq`` (T, nb·32) int8, ``dx``, ``sx`` (T, nb)) and a Q4_1 weight in group blocks ``w16``
    (N / 16, nb·320: :func:`group_q4_1`; ``lo``, ``hi`` multiples of 16). A group (16 rows) stays in
    registers while the inputs pass it :data:`~tqedge.codec.simd_linear.NXMAX` at a time; each
    input row's outputs have the same bits whatever the number of rows."""
    t, nb = xq.shape[0], dx.shape[1]
    gs, xs, fs, os = w16.strides[0], xq.strides[0], dx.strides[0], out.strides[0]
    wa, qa, da, sa, oa = w16.ctypes.data, xq.ctypes.data, dx.ctypes.data, sx.ctypes.data, out.ctypes.data
    for g in range(lo // L.ROWS, hi // L.ROWS):
        wg, og = wa + g * gs, oa + 4 * L.ROWS * g
        j = 0
        while j + L.NXMAX <= t:
            L.q4_1_tile(0, wg, nb, qa + j * xs, xs, da + j * fs, sa + j * fs, fs, og + j * os, os)
            j += L.NXMAX
        while j < t:
            L.q4_1_tile(1, wg, nb, qa + j * xs, xs, da + j * fs, sa + j * fs, fs, og + j * os, os)
            j += 1


@njit(warm=False, nogil=True)
def q4_1_gemv(w16, x, out, lo, hi):
    """``out[lo:hi] = W[lo:hi] @ x`` for one input row ``x`` (nb·32 float32) and a Q4_1 weight in
    group blocks ``w16`` (:func:`q4_1_gemm`)."""
    nb = x.shape[0] // 32
    xq = np.empty((1, nb * L.XQ_BYTES), np.int8)
    dx = np.empty((1, nb), np.float32)
    sx = np.empty((1, nb), np.float32)
    quantize_row_q8(x, xq[0], dx[0], sx[0])
    q4_1_gemm(w16, xq, dx, sx, out.reshape((1, out.shape[0])), lo, hi)


def group_q4_1(w: np.ndarray) -> np.ndarray:
    """(N, nb·20) GGUF Q4_1 rows (N a multiple of 16) → (N / 16, nb·320) group blocks: for each
    group of 16 rows and block, the 16 ``d``, the 16 ``m``, then for each code dword ``p`` (bytes
    ``4p … 4p + 3``) the 16 rows' four bytes (:mod:`tqedge.codec.simd_linear`)."""
    n = w.shape[0]
    b = w.reshape(n // L.ROWS, L.ROWS, -1, L.Q4_1_BYTES).transpose(0, 2, 1, 3)  # (G, nb, 16, 20)
    g, nb = b.shape[:2]
    codes = b[..., 4:].reshape(g, nb, L.ROWS, 4, 4).transpose(0, 1, 3, 2, 4)  # (G, nb, p, row, byte)
    out = np.concatenate([b[..., 0:2].reshape(g, nb, 2 * L.ROWS), b[..., 2:4].reshape(g, nb, 2 * L.ROWS),
                          codes.reshape(g, nb, 16 * L.ROWS)], axis=2)
    return np.ascontiguousarray(out).reshape(n // L.ROWS, -1)

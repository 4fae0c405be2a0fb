"""The block minimums of a GGUF Q4_1 linear, for the native op ``AddBlockOffsets``: a pure Numba function.

A Q4_1 weight row is ``d*q + m`` per block of 32 inputs (float16 ``d`` and ``m`` in the GGUF).
An int4 bundle carries the codes and scales into ``MatMulNBits`` as they are (zero point 0: the
``d*q`` part, exporters/weights.py) and adds the ``m`` part, ``Σ_b (Σ_{k in block b} x_k) m_b``:

    out = y + blocksum(x) @ mins        x (T, K), y (T, N), mins (K / block, N)

``mins`` stays float16 as the GGUF stores it (exact, half the bytes of the float32 MatMul the
cut segments run): a decode step reads 6.6 MB of minimums instead of 13.3 (SmolLM2-135M).
Same contract as :mod:`tqedge.codec.kernels_fused`: serial, no raise (the op validates shapes
first), writes only ``out``; the result is the NumPy formula's up to float32 summation order.
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


# -- a GGUF Q4_1 linear at one input row (the vector kernel of tqedge.codec.simd_linear) ----------
@njit(warm=False, nogil=True)
def quantize_row_q8(x, xq, dx, sx):
    """``x`` (nb·32 float32) → int8 codes ``xq`` with one scale per block of 32 (``dx = max|x| / 127``,
    ``xq = rint(x / dx)``, 0 for an all-zero block) and each block's exact float32 sum ``sx``."""
    nb = dx.shape[0]
    for b in range(nb):
        a = np.float32(0.0)
        s = np.float32(0.0)
        for i in range(b * 32, b * 32 + 32):
            a = max(a, abs(x[i]))
            s += x[i]
        d = a / np.float32(127.0)
        for i in range(b * 32, b * 32 + 32):
            xq[i] = np.int8(np.rint(x[i] / d)) if a > 0 else np.int8(0)
        dx[b] = d
        sx[b] = s


@njit(warm=False, nogil=True)
def q4_1_gemv(w, x, out, lo, hi):
    """``out[lo:hi] = W[lo:hi] @ x`` for a GGUF Q4_1 weight ``w`` (N, nb·20) uint8 (its blocks as
    the file stores them) and ``x`` (nb·32,) float32 quantized per block to int8
    (:func:`quantize_row_q8`)."""
    nb = x.shape[0] // 32
    xq = np.empty(nb * 32, np.int8)
    dx = np.empty(nb, np.float32)
    sx = np.empty(nb, np.float32)
    quantize_row_q8(x, xq, dx, sx)
    ws = w.strides[0]
    wa, qa, da, sa, oa = w.ctypes.data, xq.ctypes.data, dx.ctypes.data, sx.ctypes.data, out.ctypes.data
    r = lo
    while r + L.ROWS <= hi:
        L.q4_1_rows(4, wa + r * ws, ws, 20, nb, qa, da, sa, oa + 4 * r)
        r += L.ROWS
    while r < hi:
        L.q4_1_rows(1, wa + r * ws, ws, 20, nb, qa, da, sa, oa + 4 * r)
        r += 1


@njit(warm=False, nogil=True)
def q4_1_gemv_x4(w4, x, out, lo, hi):
    """As :func:`q4_1_gemv` for a weight with four rows' blocks interleaved: ``w4`` (N / 4, nb·80),
    group ``g``'s bytes being rows 4g … 4g+3's block 0, then their block 1, …; ``lo``, ``hi``
    multiples of 4. One sequential stream of bytes, where 4 rows of a short input (576: 360 bytes
    each) are 4 streams of 6 cache lines that a hardware prefetcher hardly sees."""
    nb = x.shape[0] // 32
    xq = np.empty(nb * 32, np.int8)
    dx = np.empty(nb, np.float32)
    sx = np.empty(nb, np.float32)
    quantize_row_q8(x, xq, dx, sx)
    gs = w4.strides[0]
    wa, qa, da, sa, oa = w4.ctypes.data, xq.ctypes.data, dx.ctypes.data, sx.ctypes.data, out.ctypes.data
    for g in range(lo // 4, hi // 4):
        L.q4_1_rows(4, wa + g * gs, 20, 80, nb, qa, da, sa, oa + 16 * g)


def interleave_q4_1(w):
    """(N, nb·20) GGUF Q4_1 rows → (N / 4, nb·80), four rows' blocks interleaved (:func:`q4_1_gemv_x4`)."""
    n = w.shape[0]
    return np.ascontiguousarray(w.reshape(n // 4, 4, -1, 20).transpose(0, 2, 1, 3)).reshape(n // 4, -1)

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

"""Pure-NumPy kernels: the reference twin of :mod:`tqedge.codec.kernels_numba`.

Same signatures and results (codes identical, floats within 1e-5 relative). Used when Numba is
not importable or ``TQEDGE_KERNELS=numpy``. These materialize a dequantized block per call, so
they are simple rather than fast. Shapes: ``H`` KV heads, ``G`` query heads per KV head,
``N`` keys, ``B`` code bytes, ``P`` scales, ``Dp`` projected dimension. ``scales`` are float16
viewed as uint16 (the kernels convert them themselves).
"""

from __future__ import annotations

import numpy as np

from tqedge.codec.packing import pack, unpack
from tqedge.codec.segments import BITS, BYTE_OFF, CB_OFF, DIM_OFF, NDIM, SCALE_IDX

BACKEND = "numpy"


def quantize(vals: np.ndarray, boundaries: np.ndarray) -> np.ndarray:
    """Codes (N, n) uint8: number of boundaries ≤ each value (= nearest centroid)."""
    return np.searchsorted(boundaries, vals, side="right").astype(np.uint8)  # (N, n)


def pack_into(codes: np.ndarray, bits: int, out: np.ndarray, byte_off: int) -> None:
    """Pack codes (N, n) of ``bits`` bits into ``out[:, byte_off:byte_off + ceil(n·bits/8)]``."""
    packed = pack(codes, bits)  # (N, nb)
    out[:, byte_off : byte_off + packed.shape[1]] = packed


def dequantize(codes: np.ndarray, scales16: np.ndarray, table: np.ndarray, cb: np.ndarray, lut: np.ndarray,
               dp: int) -> np.ndarray:
    """Decoded rows in the projected domain: (H, N, B), (H, N, P) → (H, N, Dp) float32."""
    h, n = codes.shape[:2]
    scales = scales16.view(np.float16).astype(np.float32)  # (H, N, P)
    out = np.empty((h, n, dp), dtype=np.float32)
    for s in table:
        bits, off, do, nd = int(s[BITS]), int(s[BYTE_OFF]), int(s[DIM_OFF]), int(s[NDIM])
        c = unpack(codes[:, :, off:], bits, nd)  # (H, N, nd)
        centroids = cb[s[CB_OFF] : s[CB_OFF] + (1 << bits)]
        out[:, :, do : do + nd] = centroids[c] * scales[:, :, s[SCALE_IDX], None]
    return out


def scores(qp: np.ndarray, codes: np.ndarray, scales16: np.ndarray, table: np.ndarray, cb: np.ndarray,
           lut: np.ndarray) -> np.ndarray:
    """<qp[h, g], decoded[h, n]>: (H, G, Dp), (H, N, B), (H, N, P) → (H, G, N) float32."""
    x = dequantize(codes, scales16, table, cb, lut, qp.shape[-1])  # (H, N, Dp)
    return np.matmul(qp.astype(np.float32, copy=False), x.transpose(0, 2, 1))  # (H, G, N)


def value_sum(p: np.ndarray, codes: np.ndarray, scales16: np.ndarray, table: np.ndarray, cb: np.ndarray,
              lut: np.ndarray, dp: int) -> np.ndarray:
    """sum_n p[h, g, n] · decoded[h, n]: (H, G, N), (H, N, B), (H, N, P) → (H, G, Dp) float32."""
    x = dequantize(codes, scales16, table, cb, lut, dp)  # (H, N, Dp)
    return np.matmul(p.astype(np.float32, copy=False), x)  # (H, G, Dp)

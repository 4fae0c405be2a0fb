"""Numba kernels over packed TurboQuant codes (never a dequantized cache).

Every kernel walks the rows of a ``(H, N, B)`` code array; for each row it decodes all segments
(see :mod:`tqedge.codec.segments`) into a small per-thread buffer of ``Dp`` floats, with the
segment scale folded in, and then

- ``scores``: dots the buffer with the ``G`` projected queries of that KV head (GQA: each code
  row is read once for all G query heads);
- ``value_sum``: adds ``p[h, g, n] · buffer`` into ``G`` accumulators of the projected domain
  (the caller unprojects once);
- ``dequantize``: stores the buffer (blocked prefill, then a BLAS matmul).

Decoding is specialised per width: b = 1, 2, 4 look up all codes of a byte at once in a byte
table of centroids (8, 4 or 2 floats per byte), b = 8 indexes the codebook with the byte, b = 3
unpacks 8 codes from a 24-bit window of 3 bytes, other widths read a 16-bit window per code.

Work is split over ``heads × key blocks`` with ``prange`` when the call is large enough to pay
for the thread pool; small calls (a decode step at short context) run a serial twin compiled
from the same source. ``scales`` arrive as float16 bit patterns (uint16): Numba has no float16,
so :func:`_half` converts them. Nothing compiles at import; ``cache=True`` keeps the machine code
on disk after the first call.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from tqedge.codec.segments import BITS, BYTE_OFF, CB_OFF, DIM_OFF, LUT_OFF, NDIM, SCALE_IDX

BACKEND = "numba"
BLOCK = 256  # keys per parallel work item
PARALLEL_MIN = 4096  # H·N below which the serial kernels are used

_OPTS = dict(cache=True, fastmath=True, nogil=True)


@njit(inline="always", **_OPTS)
def _half(h):
    """float16 bit pattern (uint16) → float32."""
    h = np.int32(h)
    e = (h >> 10) & 0x1F
    m = h & 0x3FF
    if e == 0:
        v = np.float32(m) * np.float32(5.960464477539063e-08)  # subnormal: m · 2^-24
    elif e == 31:
        v = np.float32(np.inf) if m == 0 else np.float32(np.nan)
    else:
        v = np.float32(1024 + m) * np.float32(2.0 ** (e - 25))
    return -v if h & 0x8000 else v


@njit(inline="always", **_OPTS)
def _decode_row(row, srow, table, cb, lut, buf):
    """Decode one packed row (B,) with its scales (P,) into buf[:Dp] (float32, scaled)."""
    for s in range(table.shape[0]):
        bits = table[s, BITS]
        bo = table[s, BYTE_OFF]
        do = table[s, DIM_OFF]
        nd = table[s, NDIM]
        co = table[s, CB_OFF]
        lo = table[s, LUT_OFF]
        sc = _half(srow[table[s, SCALE_IDX]])
        if bits == 4:
            for i in range((nd + 1) >> 1):
                k = lo + 2 * np.int64(row[bo + i])
                buf[do + 2 * i] = lut[k] * sc
                buf[do + 2 * i + 1] = lut[k + 1] * sc
        elif bits == 2:
            for i in range((nd + 3) >> 2):
                k = lo + 4 * np.int64(row[bo + i])
                for t in range(4):
                    buf[do + 4 * i + t] = lut[k + t] * sc
        elif bits == 8:
            for i in range(nd):
                buf[do + i] = cb[co + np.int64(row[bo + i])] * sc
        elif bits == 1:
            for i in range((nd + 7) >> 3):
                k = lo + 8 * np.int64(row[bo + i])
                for t in range(8):
                    buf[do + 8 * i + t] = lut[k + t] * sc
        else:
            start = 0
            if bits == 3:
                for gi in range(nd >> 3):
                    b3 = bo + 3 * gi
                    w = np.int64(row[b3]) | (np.int64(row[b3 + 1]) << 8) | (np.int64(row[b3 + 2]) << 16)
                    for t in range(8):
                        buf[do + 8 * gi + t] = cb[co + ((w >> (3 * t)) & 7)] * sc
                start = (nd >> 3) << 3
            mask = (1 << bits) - 1
            nbytes = (nd * bits + 7) >> 3
            for j in range(start, nd):
                bit = j * bits
                byte = bit >> 3
                sh = bit & 7
                w = np.int64(row[bo + byte])
                if sh + bits > 8 and byte + 1 < nbytes:
                    w |= np.int64(row[bo + byte + 1]) << 8
                buf[do + j] = cb[co + ((w >> sh) & mask)] * sc


def _scores_impl(qp, codes, scales, table, cb, lut):
    nh, ng, dp = qp.shape
    n = codes.shape[1]
    out = np.empty((nh, ng, n), dtype=np.float32)
    nblk = (n + BLOCK - 1) // BLOCK
    for task in prange(nh * nblk):
        h = task // nblk
        n0 = (task % nblk) * BLOCK
        n1 = min(n, n0 + BLOCK)
        buf = np.zeros(dp + 8, dtype=np.float32)
        q = qp[h]  # (G, Dp)
        for i in range(n0, n1):
            _decode_row(codes[h, i], scales[h, i], table, cb, lut, buf)
            for g in range(ng):
                acc = np.float32(0.0)
                for j in range(dp):
                    acc += q[g, j] * buf[j]
                out[h, g, i] = acc
    return out


def _value_sum_impl(p, codes, scales, table, cb, lut, dp):
    nh, ng, n = p.shape
    nblk = (n + BLOCK - 1) // BLOCK
    part = np.zeros((nh * nblk, ng, dp), dtype=np.float32)
    for task in prange(nh * nblk):
        h = task // nblk
        n0 = (task % nblk) * BLOCK
        n1 = min(n, n0 + BLOCK)
        buf = np.zeros(dp + 8, dtype=np.float32)
        acc = np.zeros((ng, dp), dtype=np.float32)
        for i in range(n0, n1):
            _decode_row(codes[h, i], scales[h, i], table, cb, lut, buf)
            for g in range(ng):
                w = p[h, g, i]
                for j in range(dp):
                    acc[g, j] += w * buf[j]
        part[task] = acc
    out = np.zeros((nh, ng, dp), dtype=np.float32)
    for task in range(nh * nblk):
        out[task // nblk] += part[task]
    return out


def _dequantize_impl(codes, scales, table, cb, lut, dp):
    nh, n = codes.shape[:2]
    out = np.empty((nh, n, dp), dtype=np.float32)
    nblk = (n + BLOCK - 1) // BLOCK
    for task in prange(nh * nblk):
        h = task // nblk
        n0 = (task % nblk) * BLOCK
        buf = np.zeros(dp + 8, dtype=np.float32)
        for i in range(n0, min(n, n0 + BLOCK)):
            _decode_row(codes[h, i], scales[h, i], table, cb, lut, buf)
            out[h, i, :] = buf[:dp]
    return out


@njit(**_OPTS)
def quantize(vals, boundaries):
    """Codes (N, n) uint8: number of boundaries ≤ each value (= nearest centroid)."""
    n, d = vals.shape
    out = np.empty((n, d), dtype=np.uint8)
    for i in range(n):
        for j in range(d):
            out[i, j] = np.searchsorted(boundaries, np.float64(vals[i, j]), side="right")
    return out


@njit(**_OPTS)
def pack_into(codes, bits, out, byte_off):
    """Pack codes (N, n) of ``bits`` bits into ``out[:, byte_off:]`` (little-endian bit stream)."""
    n, d = codes.shape
    nbytes = (d * bits + 7) >> 3
    for i in range(n):
        for k in range(nbytes):
            out[i, byte_off + k] = 0
        for j in range(d):
            bit = j * bits
            byte = bit >> 3
            sh = bit & 7
            v = np.int64(codes[i, j]) << sh
            out[i, byte_off + byte] |= np.uint8(v & 0xFF)
            if sh + bits > 8:
                out[i, byte_off + byte + 1] |= np.uint8(v >> 8)


_scores_par = njit(parallel=True, **_OPTS)(_scores_impl)
_scores_ser = njit(**_OPTS)(_scores_impl)
_value_sum_par = njit(parallel=True, **_OPTS)(_value_sum_impl)
_value_sum_ser = njit(**_OPTS)(_value_sum_impl)
_dequantize_par = njit(parallel=True, **_OPTS)(_dequantize_impl)
_dequantize_ser = njit(**_OPTS)(_dequantize_impl)


def _big(codes) -> bool:
    return codes.shape[0] * codes.shape[1] >= PARALLEL_MIN


def scores(qp, codes, scales16, table, cb, lut):
    """<qp[h, g], decoded[h, n]>: (H, G, Dp) f32, (H, N, B) u8, (H, N, P) u16 → (H, G, N) float32."""
    return (_scores_par if _big(codes) else _scores_ser)(qp, codes, scales16, table, cb, lut)


def value_sum(p, codes, scales16, table, cb, lut, dp):
    """sum_n p[h, g, n] · decoded[h, n]: (H, G, N) f32, (H, N, B), (H, N, P) → (H, G, Dp) float32."""
    return (_value_sum_par if _big(codes) else _value_sum_ser)(p, codes, scales16, table, cb, lut, dp)


def dequantize(codes, scales16, table, cb, lut, dp):
    """Decoded rows in the projected domain: (H, N, B), (H, N, P) → (H, N, Dp) float32."""
    return (_dequantize_par if _big(codes) else _dequantize_ser)(codes, scales16, table, cb, lut, dp)


@njit(**_OPTS)
def half_to_float(h):
    """float16 bit patterns (n,) uint16 → float32 (n,) with the kernels' converter (for tests)."""
    out = np.empty(h.shape[0], dtype=np.float32)
    for i in range(h.shape[0]):
        out[i] = _half(h[i])
    return out

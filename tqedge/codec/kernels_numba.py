"""Numba kernels over packed TurboQuant codes (never a dequantized cache).

Every kernel walks the rows of a ``(H, N, B)`` code array; for each row it decodes all segments
(see :mod:`tqedge.codec.segments`) into a small per-thread buffer of ``Dp`` floats, with the
segment scale folded in, and then

- ``scores``: dots the buffer with the ``G`` projected queries of that KV head (GQA: each code
  row is read once for all G query heads);
- ``value_sum``: adds ``p[h, g, n] · buffer`` into ``G`` accumulators of the projected domain
  (the caller unprojects once);
- ``dequantize``: stores the buffer (blocked prefill, then a BLAS matmul).

Decoding is specialised per width: on x86 with AVX2 or AVX-512, segments of b ≤ 4 bits and a
multiple of 16 codes decode 16 codes per register permute (:mod:`tqedge.codec.simd`, same
floats), fused into the scores and value sums (:mod:`tqedge.codec.kernels_blocks`: no tile).
Elsewhere b = 1, 2, 4 look up all codes of a byte at once in a byte table of centroids
(8, 4 or 2 floats per byte), b = 3 unpacks 8 codes from a 24-bit window of 3 bytes; b = 8
indexes the codebook with the byte, other widths read a 16-bit window per code.

Work is split over ``heads × key blocks`` with ``prange`` when the call is large enough to pay
for the thread pool; small calls (a decode step at short context) run a serial twin compiled
from the same source, and so does any call while another thread's parallel kernel runs or when
the calling thread's thread count is 1 (:func:`tqedge.codec.numba_runtime.launch`). ``scales``
arrive as float16 bit patterns (uint16): Numba has no float16, so
:func:`~tqedge.codec.kernels_fused.half_to_float` (the CPU's conversion) widens them.
Nothing compiles at import; the machine code is cached on disk in the user's cache directory
after the first call (:mod:`tqedge.codec.numba_runtime`).
"""

from __future__ import annotations

import numpy as np
from numba import prange

from tqedge.codec.kernels_blocks import decode_rows, fused_ok, fused_scores, fused_values
from tqedge.codec.kernels_fused import half_to_float
from tqedge.codec.numba_runtime import launch, njit, serial_twin
from tqedge.codec.simd import LANES, PERMUTE
from tqedge.codec.segments import BITS, BYTE_OFF, CB_OFF, DIM_OFF, LUT_OFF, NDIM, SCALE_IDX

BACKEND = "numba"
BLOCK = 256  # keys per parallel work item
TILE = 64  # keys decoded at a time into a small L1-resident tile
# H·N below which the serial kernels are used. Numba's workqueue wakes its sleeping threads per
# launch (~0.5 ms here): measured on 2 cores (3 KV heads, 3 bits) the parallel twins were slower
# than the serial ones up to 3×16K head·keys and 1.2–1.5× faster at 3×64K
PARALLEL_MIN = 1 << 16

_OPTS = dict(fastmath=True, nogil=True)

@njit(**_OPTS)
def _decode_tile(ch, n0, nr, table, cb, lut64, tile, tile64, cb16):
    """Decode rows ``n0 .. n0+nr`` of one head's codes ``ch`` (N, B) into ``tile[:nr, :Dp]``,
    unscaled (centroid values). Segment by segment, so the width branch is taken once per tile;
    the loops work on slices (simple strides, no aliasing doubts for LLVM)."""
    for s in range(table.shape[0]):
        bits = table[s, BITS]
        bo = table[s, BYTE_OFF]
        do = table[s, DIM_OFF]
        nd = table[s, NDIM]
        co = table[s, CB_OFF]
        lb = table[s, LUT_OFF] >> 1  # index into the uint64 (float pair) view of the byte tables
        o = do >> 1
        even = (do & 1) == 0
        if PERMUTE and bits <= 4 and nd % LANES == 0 and ch.strides[1] == 1:
            decode_rows(ch, n0, nr, bits, bo, nd, cb, co, tile, do, cb16)
        elif bits == 4 and even:  # one byte → 2 floats = one uint64
            nb = (nd + 1) >> 1
            lt = lut64[lb : lb + 256]
            for r in range(nr):
                row = ch[n0 + r, bo : bo + nb]
                t = tile64[r, o : o + nb]
                for k in range(nb):
                    t[k] = lt[row[k]]
        elif bits == 2 and even:  # one byte → 4 floats
            nb = (nd + 3) >> 2
            lt = lut64[lb : lb + 512]
            for r in range(nr):
                row = ch[n0 + r, bo : bo + nb]
                t = tile64[r, o : o + 2 * nb]
                for k in range(nb):
                    e = 2 * np.int64(row[k])
                    t[2 * k] = lt[e]
                    t[2 * k + 1] = lt[e + 1]
        elif bits == 1 and even:  # one byte → 8 floats
            nb = (nd + 7) >> 3
            lt = lut64[lb : lb + 1024]
            for r in range(nr):
                row = ch[n0 + r, bo : bo + nb]
                t = tile64[r, o : o + 4 * nb]
                for k in range(nb):
                    e = 4 * np.int64(row[k])
                    for i in range(4):
                        t[4 * k + i] = lt[e + i]
        elif bits == 3 and even:  # 3 bytes → 8 codes = 4 six-bit pairs
            ng = nd >> 3
            lt = lut64[lb : lb + 64]
            for r in range(nr):
                row = ch[n0 + r, bo : bo + 3 * ng]
                t = tile64[r, o : o + 4 * ng]
                for k in range(ng):
                    w = np.int64(row[3 * k]) | (np.int64(row[3 * k + 1]) << 8) | (np.int64(row[3 * k + 2]) << 16)
                    t[4 * k] = lt[w & 63]
                    t[4 * k + 1] = lt[(w >> 6) & 63]
                    t[4 * k + 2] = lt[(w >> 12) & 63]
                    t[4 * k + 3] = lt[(w >> 18) & 63]
                if ng << 3 < nd:
                    _decode_generic(ch[n0 + r], bo, bits, ng << 3, nd, cb, co, tile, r, do)
        elif bits == 8:
            c = cb[co : co + 256]
            for r in range(nr):
                row = ch[n0 + r, bo : bo + nd]
                t = tile[r, do : do + nd]
                for k in range(nd):
                    t[k] = c[row[k]]
        else:
            for r in range(nr):
                _decode_generic(ch[n0 + r], bo, bits, 0, nd, cb, co, tile, r, do)


@njit(inline="always", **_OPTS)
def _decode_generic(row, bo, bits, j0, nd, cb, co, tile, r, do):
    """Codes j0..nd of a segment, any width: a 16-bit window per code."""
    mask = (1 << bits) - 1
    nbytes = (nd * bits + 7) >> 3
    for j in range(j0, nd):
        bit = j * bits
        byte = bit >> 3
        sh = bit & 7
        w = np.int64(row[bo + byte])
        if sh + bits > 8 and byte + 1 < nbytes:
            w |= np.int64(row[bo + byte + 1]) << 8
        tile[r, do + j] = cb[co + ((w >> sh) & mask)]


@njit(inline="always", **_OPTS)
def _new_tile(dp, fused=False):
    """A work item's decode tile (zeroed), its uint64 view and the 16-float codebook register;
    the fused path decodes in registers and gets a one-row tile (a full one, zeroed per item,
    was 20 KB: 0.1 GB of memset per decode step at 8K keys)."""
    width = 16 if fused else (dp + 8 + 15) & ~15  # overhang room for a partial last byte; 64-byte rows
    tile = np.zeros((1 if fused else TILE, width), dtype=np.float32)
    tile64 = tile.reshape(-1).view(np.uint64).reshape(tile.shape[0], width >> 1)
    return tile, tile64, np.zeros(LANES, np.float32)


@njit(**_OPTS)
def _tile_scores(q, tile, nr, table, sh, n0, out_h):
    """out_h[g, n0 + r] = sum over segments of scale · <q[g, seg], tile[r, seg]>.

    Four rows at a time, so each query vector is loaded once per four keys."""
    ng = q.shape[0]
    for s in range(table.shape[0]):
        do = table[s, DIM_OFF]
        nd = table[s, NDIM]
        si = table[s, SCALE_IDX]
        first = s == 0
        r = 0
        while r < nr:
            m = min(4, nr - r)
            t0 = tile[r, do : do + nd]
            t1 = tile[r + 1, do : do + nd]  # rows past nr are stale but in bounds (TILE rows)
            t2 = tile[r + 2, do : do + nd]
            t3 = tile[r + 3, do : do + nd]
            c0 = half_to_float(sh[n0 + r, si])  # the rows' scales, once for all G queries
            c1 = half_to_float(sh[n0 + r + 1, si]) if m > 1 else np.float32(0.0)
            c2 = half_to_float(sh[n0 + r + 2, si]) if m > 2 else np.float32(0.0)
            c3 = half_to_float(sh[n0 + r + 3, si]) if m > 3 else np.float32(0.0)
            for g in range(ng):
                qg = q[g, do : do + nd]
                a0 = np.float32(0.0)
                a1 = np.float32(0.0)
                a2 = np.float32(0.0)
                a3 = np.float32(0.0)
                for j in range(nd):
                    a0 += qg[j] * t0[j]
                    a1 += qg[j] * t1[j]
                    a2 += qg[j] * t2[j]
                    a3 += qg[j] * t3[j]
                for i, a in enumerate((a0 * c0, a1 * c1, a2 * c2, a3 * c3)):
                    if i < m:
                        if first:
                            out_h[g, n0 + r + i] = a
                        else:
                            out_h[g, n0 + r + i] += a
            r += 4


@njit(**_OPTS)
def _tile_values(p_h, tile, nr, table, sh, n0, acc):
    """acc[g, seg] += p_h[g, n0 + r] · scale · tile[r, seg] for each row and segment.

    Four rows at a time, so each accumulator vector is loaded and stored once per four keys."""
    ng = acc.shape[0]
    for s in range(table.shape[0]):
        do = table[s, DIM_OFF]
        nd = table[s, NDIM]
        si = table[s, SCALE_IDX]
        r = 0
        while r < nr:
            m = min(4, nr - r)
            t0 = tile[r, do : do + nd]
            t1 = tile[r + 1, do : do + nd]
            t2 = tile[r + 2, do : do + nd]
            t3 = tile[r + 3, do : do + nd]
            c0 = half_to_float(sh[n0 + r, si])
            c1 = half_to_float(sh[n0 + r + 1, si]) if m > 1 else np.float32(0.0)
            c2 = half_to_float(sh[n0 + r + 2, si]) if m > 2 else np.float32(0.0)
            c3 = half_to_float(sh[n0 + r + 3, si]) if m > 3 else np.float32(0.0)
            for g in range(ng):
                w0 = p_h[g, n0 + r] * c0
                w1 = p_h[g, n0 + r + 1] * c1 if m > 1 else np.float32(0.0)
                w2 = p_h[g, n0 + r + 2] * c2 if m > 2 else np.float32(0.0)
                w3 = p_h[g, n0 + r + 3] * c3 if m > 3 else np.float32(0.0)
                a = acc[g, do : do + nd]
                for j in range(nd):
                    a[j] += w0 * t0[j] + w1 * t1[j] + w2 * t2[j] + w3 * t3[j]
            r += 4


def _scores_impl(qp, codes, scales, table, cb, lut64):
    nh, ng, dp = qp.shape
    n = codes.shape[1]
    out = np.empty((nh, ng, n), dtype=np.float32)
    nblk = (n + BLOCK - 1) // BLOCK
    fused = fused_ok(table, ng, codes, qp, out)
    for task in prange(nh * nblk):
        h = task // nblk
        b0 = (task % nblk) * BLOCK
        b1 = min(n, b0 + BLOCK)
        tile, tile64, cb16 = _new_tile(dp, fused)
        for n0 in range(b0, b1, TILE):
            nr = min(TILE, b1 - n0)
            if fused:
                fused_scores(qp[h], codes[h], n0, nr, table, cb, scales[h], out[h], cb16)
            else:
                _decode_tile(codes[h], n0, nr, table, cb, lut64, tile, tile64, cb16)
                _tile_scores(qp[h], tile, nr, table, scales[h], n0, out[h])
    return out


def _value_sum_impl(p, codes, scales, table, cb, lut64, dp):
    nh, ng, n = p.shape
    nblk = (n + BLOCK - 1) // BLOCK
    sums = np.zeros((nh * nblk, ng, dp), dtype=np.float32)
    for task in prange(nh * nblk):
        h = task // nblk
        b0 = (task % nblk) * BLOCK
        b1 = min(n, b0 + BLOCK)
        acc = np.zeros((ng, dp), dtype=np.float32)
        fused = fused_ok(table, ng, codes, acc, p)
        tile, tile64, cb16 = _new_tile(dp, fused)
        for n0 in range(b0, b1, TILE):
            nr = min(TILE, b1 - n0)
            if fused:
                fused_values(p[h], codes[h], n0, nr, table, cb, scales[h], acc, cb16)
            else:
                _decode_tile(codes[h], n0, nr, table, cb, lut64, tile, tile64, cb16)
                _tile_values(p[h], tile, nr, table, scales[h], n0, acc)
        sums[task] = acc
    # the reduction as scalar loops: under parallel=True an array expression here would be a
    # parallel region of its own, one pool launch per task (20 ms at 8K keys instead of 1)
    out = np.empty((nh, ng, dp), dtype=np.float32)
    for h in range(nh):
        for g in range(ng):
            for j in range(dp):
                a = np.float32(0.0)
                for b in range(nblk):
                    a += sums[h * nblk + b, g, j]
                out[h, g, j] = a
    return out


def _dequantize_impl(codes, scales, table, cb, lut64, dp):
    nh, n = codes.shape[:2]
    nseg = table.shape[0]
    out = np.empty((nh, n, dp), dtype=np.float32)
    nblk = (n + BLOCK - 1) // BLOCK
    for task in prange(nh * nblk):
        h = task // nblk
        b0 = (task % nblk) * BLOCK
        b1 = min(n, b0 + BLOCK)
        tile, tile64, cb16 = _new_tile(dp)
        for n0 in range(b0, b1, TILE):
            nr = min(TILE, b1 - n0)
            _decode_tile(codes[h], n0, nr, table, cb, lut64, tile, tile64, cb16)
            for s in range(nseg):
                do = table[s, DIM_OFF]
                nd = table[s, NDIM]
                si = table[s, SCALE_IDX]
                for r in range(nr):
                    sc = half_to_float(scales[h, n0 + r, si])
                    o = out[h, n0 + r, do : do + nd]
                    t = tile[r, do : do + nd]
                    for j in range(nd):
                        o[j] = t[j] * sc
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
_scores_ser = njit(**_OPTS)(serial_twin(_scores_impl))
_value_sum_par = njit(parallel=True, **_OPTS)(_value_sum_impl)
_value_sum_ser = njit(**_OPTS)(serial_twin(_value_sum_impl))
_dequantize_par = njit(parallel=True, **_OPTS)(_dequantize_impl)
_dequantize_ser = njit(**_OPTS)(serial_twin(_dequantize_impl))
# the serial twins, for callers that must not start Numba's thread pool (the native op)
scores_serial, value_sum_serial, dequantize_serial = _scores_ser, _value_sum_ser, _dequantize_ser


def _big(codes) -> bool:
    return codes.shape[0] * codes.shape[1] >= PARALLEL_MIN


def scores(qp, codes, scales16, table, cb, lut):
    """<qp[h, g], decoded[h, n]>: (H, G, Dp) f32, (H, N, B) u8, (H, N, P) u16 → (H, G, N) float32."""
    args = (qp, codes, scales16, table, cb, lut.view(np.uint64))
    return launch(_scores_par, _scores_ser, *args) if _big(codes) else _scores_ser(*args)


def value_sum(p, codes, scales16, table, cb, lut, dp):
    """sum_n p[h, g, n] · decoded[h, n]: (H, G, N) f32, (H, N, B), (H, N, P) → (H, G, Dp) float32."""
    args = (p, codes, scales16, table, cb, lut.view(np.uint64), dp)
    return launch(_value_sum_par, _value_sum_ser, *args) if _big(codes) else _value_sum_ser(*args)


def dequantize(codes, scales16, table, cb, lut, dp):
    """Decoded rows in the projected domain: (H, N, B), (H, N, P) → (H, N, Dp) float32."""
    args = (codes, scales16, table, cb, lut.view(np.uint64), dp)
    return launch(_dequantize_par, _dequantize_ser, *args) if _big(codes) else _dequantize_ser(*args)


@njit(**_OPTS)
def halves_to_float(h):
    """float16 bit patterns (n,) uint16 → float32 (n,) with the kernels' converter (for tests)."""
    out = np.empty(h.shape[0], dtype=np.float32)
    for i in range(h.shape[0]):
        out[i] = half_to_float(h[i])
    return out

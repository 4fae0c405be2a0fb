"""The block paths of :mod:`tqedge.codec.kernels_numba` (x86, the permute decode of
:mod:`tqedge.codec.simd`): scores and value sums with the decode fused into the arithmetic (no
decoded tile in memory), and rows decoded into a tile.

:func:`fused_ok` says whether a call can take them: :data:`~tqedge.codec.simd.PERMUTE`, every
segment of 1–4 bits and a multiple of 16 codes, at most :data:`~tqedge.codec.simd.GMAX`
queries per KV head, unit strides where the intrinsics read vectors. Rows go four at a time
(:data:`~tqedge.codec.simd.ROWS`), the last ones one at a time; bits, rows and the usual
group counts (head sizes 64, 128, 256) are compile-time constants of the machine code. Results
equal the tile path's up to float32 summation order.
"""

from __future__ import annotations

import numpy as np

from tqedge.codec import simd as P
from tqedge.codec.kernels_fused import half_to_float
from tqedge.codec.numba_runtime import njit
from tqedge.codec.segments import BITS, BYTE_OFF, CB_OFF, DIM_OFF, NDIM, SCALE_IDX

_OPTS = dict(fastmath=True, nogil=True)


@njit(inline="always", **_OPTS)
def fused_ok(table, ng, codes, vecs, rows_of):
    """Whether the fused path takes codes (H, N, B) with query / accumulator rows ``vecs``
    (…, Dp) and per-key rows ``rows_of`` (…, N) (scores out, weights in)."""
    if not P.PERMUTE or ng > P.GMAX or codes.strides[2] != 1 or vecs.strides[vecs.ndim - 1] != 4 \
            or rows_of.strides[rows_of.ndim - 1] != 4:
        return False
    for s in range(table.shape[0]):
        if table[s, BITS] > 4 or table[s, NDIM] % P.LANES != 0 or table[s, NDIM] > P.LANES * P.NKMAX:
            return False
    return True


@njit(inline="always", **_OPTS)
def _fill16(cb16, cb, co, bits):
    cb16[:] = 0.0
    for i in range(1 << bits):
        cb16[i] = cb[co + i]
    return np.int64(cb16.ctypes.data)


@njit(inline="always", **_OPTS)
def _scores4(bits, nk, src, rs, ta, qa, qs, ng, sa, shs, oa, outs, first):
    """Four rows; the group count a constant where it is one of the usual head sizes' (64, 128, 256)."""
    if nk == 4:
        _scores(bits, 4, 4, src, rs, ta, qa, qs, ng, sa, shs, oa, outs, first)
    elif nk == 8:
        _scores(bits, 4, 8, src, rs, ta, qa, qs, ng, sa, shs, oa, outs, first)
    elif nk == 16:
        _scores(bits, 4, 16, src, rs, ta, qa, qs, ng, sa, shs, oa, outs, first)
    else:
        _scores(bits, 4, nk, src, rs, ta, qa, qs, ng, sa, shs, oa, outs, first)


@njit(inline="always", **_OPTS)
def _scores(bits, rows, nk, src, rs, ta, qa, qs, ng, sa, shs, oa, outs, first):
    """``rows`` (a constant) rows of ``bits`` bits, the width made a constant here."""
    if bits == 4:
        P.scores_block(4, rows, src, rs, ta, qa, qs, ng, nk, sa, shs, oa, outs, first)
    elif bits == 3:
        P.scores_block(3, rows, src, rs, ta, qa, qs, ng, nk, sa, shs, oa, outs, first)
    elif bits == 2:
        P.scores_block(2, rows, src, rs, ta, qa, qs, ng, nk, sa, shs, oa, outs, first)
    else:
        P.scores_block(1, rows, src, rs, ta, qa, qs, ng, nk, sa, shs, oa, outs, first)


@njit(inline="always", **_OPTS)
def _values4(bits, nk, src, rs, ta, pa, ps, ng, sa, shs, aa, ast):
    if nk == 4:
        _values(bits, 4, 4, src, rs, ta, pa, ps, ng, sa, shs, aa, ast)
    elif nk == 8:
        _values(bits, 4, 8, src, rs, ta, pa, ps, ng, sa, shs, aa, ast)
    elif nk == 16:
        _values(bits, 4, 16, src, rs, ta, pa, ps, ng, sa, shs, aa, ast)
    else:
        _values(bits, 4, nk, src, rs, ta, pa, ps, ng, sa, shs, aa, ast)


@njit(inline="always", **_OPTS)
def _values(bits, rows, nk, src, rs, ta, pa, ps, ng, sa, shs, aa, ast):
    if bits == 4:
        P.values_block(4, rows, src, rs, ta, pa, ps, ng, nk, sa, shs, aa, ast)
    elif bits == 3:
        P.values_block(3, rows, src, rs, ta, pa, ps, ng, nk, sa, shs, aa, ast)
    elif bits == 2:
        P.values_block(2, rows, src, rs, ta, pa, ps, ng, nk, sa, shs, aa, ast)
    else:
        P.values_block(1, rows, src, rs, ta, pa, ps, ng, nk, sa, shs, aa, ast)


@njit(inline="always", **_OPTS)
def _segment(table, s, cb16, cb, ch, n0, rs, sh, shs):
    """Code segment ``s`` of the rows from ``n0``: its width, 16-lane groups, the centroids'
    register table (in ``cb16``), and the addresses of row ``n0``'s codes and scale."""
    bits, nk = table[s, BITS], table[s, NDIM] // P.LANES
    ta = _fill16(cb16, cb, table[s, CB_OFF], bits)
    src = np.int64(ch.ctypes.data) + n0 * rs + table[s, BYTE_OFF]
    sa = np.int64(sh.ctypes.data) + n0 * shs + table[s, SCALE_IDX] * np.int64(sh.strides[1])
    return bits, nk, ta, src, sa


@njit(**_OPTS)
def fused_scores(q, ch, n0, nr, table, cb, sh, out_h, cb16):
    """out_h[g, n0 + r] = Σ over segments of scale · <q[g, seg], centroids of row n0 + r>
    (``q`` (G, Dp), ``ch`` (N, B) one head's codes, ``sh`` (N, P) its float16 scales, ``cb16``
    (16,) float32 scratch)."""
    ng = q.shape[0]
    rs, qs, shs, outs = np.int64(ch.strides[0]), np.int64(q.strides[0]), np.int64(sh.strides[0]), \
        np.int64(out_h.strides[0])
    for s in range(table.shape[0]):
        bits, nk, ta, src, sa = _segment(table, s, cb16, cb, ch, n0, rs, sh, shs)
        qa = np.int64(q.ctypes.data) + table[s, DIM_OFF] * 4
        oa = np.int64(out_h.ctypes.data) + n0 * 4
        first = np.int64(s == 0)
        r = 0
        while r + P.ROWS <= nr:
            _scores4(bits, nk, src + r * rs, rs, ta, qa, qs, ng, sa + r * shs, shs, oa + 4 * r, outs, first)
            r += P.ROWS
        while r < nr:
            _scores(bits, 1, nk, src + r * rs, rs, ta, qa, qs, ng, sa + r * shs, shs, oa + 4 * r, outs, first)
            r += 1


@njit(**_OPTS)
def fused_values(p_h, ch, n0, nr, table, cb, sh, acc, cb16):
    """acc[g, seg] += Σ_r p_h[g, n0 + r] · scale · centroids of row n0 + r (``acc`` (G, Dp))."""
    ng = p_h.shape[0]
    rs, ps, shs, ast = np.int64(ch.strides[0]), np.int64(p_h.strides[0]), np.int64(sh.strides[0]), \
        np.int64(acc.strides[0])
    for s in range(table.shape[0]):
        bits, nk, ta, src, sa = _segment(table, s, cb16, cb, ch, n0, rs, sh, shs)
        pa = np.int64(p_h.ctypes.data) + n0 * 4
        aa = np.int64(acc.ctypes.data) + table[s, DIM_OFF] * 4
        r = 0
        while r + P.ROWS <= nr:
            _values4(bits, nk, src + r * rs, rs, ta, pa + 4 * r, ps, ng, sa + r * shs, shs, aa, ast)
            r += P.ROWS
        while r < nr:
            _values(bits, 1, nk, src + r * rs, rs, ta, pa + 4 * r, ps, ng, sa + r * shs, shs, aa, ast)
            r += 1


@njit(inline="always", **_OPTS)
def decode_rows(ch, n0, nr, bits, bo, nd, cb, co, tile, do, cb16):
    """Rows ``n0 .. n0+nr`` of one segment (``bits`` ≤ 4, ``nd`` a multiple of 16) into
    ``tile[:nr, do:do+nd]``, 16 codes per permute; ``cb16`` receives the padded codebook (an
    argument: it must outlive the calls that read its address)."""
    ta = _fill16(cb16, cb, co, bits)
    rs, ts = np.int64(ch.strides[0]), np.int64(tile.strides[0])
    src = np.int64(ch.ctypes.data) + n0 * rs + bo
    dst = np.int64(tile.ctypes.data) + do * 4
    step = 2 * bits  # bytes per 16 codes
    for r in range(nr):
        s, d = src + r * rs, dst + r * ts
        for k in range(nd // P.LANES):
            if bits == 4:
                P.decode16_b4(s + k * step, ta, d + 4 * P.LANES * k)
            elif bits == 3:
                P.decode16_b3(s + k * step, ta, d + 4 * P.LANES * k)
            elif bits == 2:
                P.decode16_b2(s + k * step, ta, d + 4 * P.LANES * k)
            else:
                P.decode16_b1(s + k * step, ta, d + 4 * P.LANES * k)

"""Fused attention kernels for the native onnxruntime op: pure Numba functions on arrays.

Called from the ``TurboQuantAttention`` cfunc (:mod:`tqedge.runtime.native_op`) on the thread
that called ``Run``, without the GIL: they are serial (no ``prange``: Numba's workqueue layer
aborts when two threads launch parallel regions), allocate only small scratch arrays, never
raise (callers validate shapes first) and write only into the arrays they are given.

- :func:`exact_attend`: causal GQA softmax attention over an fp32 slot cache (old slots a
  prefix or a mask, new tokens causal among themselves), then stores the new keys/values.
- :func:`f32_to_f16` (one value) and :func:`f32_row_to_f16` (rows, on the bits): float32 →
  IEEE half, round to nearest even like NumPy's ``astype(np.float16)``, without Numba float16
  support; :func:`half_to_float` / :func:`f16_row_to_f32` the other way, by the CPU's own
  conversion instruction.

Every function gives the results of its NumPy counterpart (``runtime/cache.py``'s
``exact_attention``) up to float32 summation order.
"""

from __future__ import annotations

import llvmlite.ir as ir
import numpy as np
from numba import types
from numba.extending import intrinsic

from tqedge.codec.fastexp import exp_sub
from tqedge.codec.numba_runtime import njit
from tqedge.codec.simd_attend import KEYS, tile_pv, tile_scores
from tqedge.codec.simd_attend import ROWS as ATT_ROWS

_OPTS = dict(warm=False, nogil=True, fastmath={"reassoc", "contract", "nsz", "arcp", "afn"})  # -inf kept


@njit(**_OPTS)
def exact_attend(q, k, v, keys, values, n_old, mask, new_slots, scale, out):
    """Attention of T new tokens over an fp32 slot cache, then store their keys/values.

    Args:
        q: (T, Hq, D) float32 queries (RoPE applied).
        k, v: (T, Hkv, D) float32 new keys / values.
        keys, values: (Hkv, C, D) float32 the layer's slots.
        n_old: slots ``[0, n_old)`` are visible; -1: the slots where ``mask`` (C,) is non-zero.
        mask: (C,) uint8 (read only when ``n_old == -1``).
        new_slots: (T,) int64 slots the new tokens go to (in [0, C)).
        scale: softmax scale.
        out: (T, Hq, D) float32 result.
    """
    t, hq, d = q.shape
    hkv = k.shape[1]
    g = hq // hkv
    c = keys.shape[1]
    if n_old >= 0:
        idx = np.arange(n_old)
    else:
        idx = np.nonzero(mask[:c])[0]
    n = idx.shape[0]
    s = np.empty((g, n + t), np.float32)
    acc = np.empty((g, d), np.float32)
    for h in range(hkv):
        kh = keys[h]
        vh = values[h]
        for i in range(t):
            qi = q[i, h * g:(h + 1) * g]  # (G, D)
            m = np.full(g, -np.inf, np.float32)
            for j in range(n):
                kr = kh[idx[j]]
                for gg in range(g):
                    a = np.float32(0.0)
                    for x in range(d):
                        a += qi[gg, x] * kr[x]
                    a *= scale
                    s[gg, j] = a
                    if a > m[gg]:
                        m[gg] = a
            for j in range(i + 1):
                kr = k[j, h]
                for gg in range(g):
                    a = np.float32(0.0)
                    for x in range(d):
                        a += qi[gg, x] * kr[x]
                    a *= scale
                    s[gg, n + j] = a
                    if a > m[gg]:
                        m[gg] = a
            acc[:] = 0.0
            den = np.zeros(g, np.float32)
            for j in range(n + i + 1):
                vr = vh[idx[j]] if j < n else v[j - n, h]
                for gg in range(g):
                    p = np.exp(s[gg, j] - m[gg])
                    den[gg] += p
                    for x in range(d):
                        acc[gg, x] += p * vr[x]
            for gg in range(g):
                inv = np.float32(1.0) / den[gg]
                for x in range(d):
                    out[i, h * g + gg, x] = acc[gg, x] * inv
    for i in range(t):
        sl = new_slots[i]
        for h in range(hkv):
            keys[h, sl] = k[i, h]
            values[h, sl] = v[i, h]


@njit(inline="always", **_OPTS)
def f32_to_f16(x):
    """float (any) → float16 bit pattern (uint16), round to nearest even, like NumPy's astype."""
    f = np.float64(x)
    sign = np.uint16(0x8000) if f < 0 or (f == 0 and np.copysign(1.0, f) < 0) else np.uint16(0)
    a = abs(f)
    if a != a:
        return np.uint16(0x7E00)
    if a >= 65520.0:  # rounds past the largest half (65504)
        return sign | np.uint16(0x7C00)
    if a < 2.0 ** -24 * 0.5:
        return sign
    e = np.int64(np.floor(np.log2(a)))
    if 2.0 ** e > a:  # log2 rounding at exact powers of two
        e -= 1
    elif 2.0 ** (e + 1) <= a:
        e += 1
    if e < -14:  # subnormal: units of 2^-24
        mant = np.rint(a * 2.0 ** 24)  # rint: round half to even
        return sign | np.uint16(mant)
    mant = np.rint((a / 2.0 ** e - 1.0) * 1024.0)
    if mant >= 1024:
        mant = 0
        e += 1
    if e > 15:
        return sign | np.uint16(0x7C00)
    return sign | np.uint16((e + 15) << 10) | np.uint16(mant)


@intrinsic
def half_to_float(typingctx, bits):
    """float16 bit pattern (uint16) → float32, exact for every half (±0, subnormals, inf, NaN
    payloads): LLVM's ``fpext half to float``, one ``vcvtph2ps`` (x86 F16C) or ``fcvt`` (AArch64)
    per 8–16 values once vectorized. Numba has no float16 type on the CPU; this is the one place
    a half is widened."""
    sig = types.float32(types.uint16)

    def codegen(context, builder, sig, args):
        return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())

    return sig, codegen


@njit(inline="always", **_OPTS)
def f16_row_to_f32(src, dst):
    """float16 bit patterns (uint16, C-contiguous) → float32 ``dst`` (:func:`half_to_float`)."""
    for j in range(src.shape[0]):
        dst[j] = half_to_float(src[j])


@njit(inline="always", **_OPTS)
def f16_rows_to_f32(src, i0, nr, skip, tile):
    """Rows ``i0 .. i0+nr`` of ``src`` (N, D) float16 bits → ``tile[:nr]`` (float32, C-contiguous
    rows), as :func:`f16_row_to_f32`; rows with ``skip[i]`` become zeros (unwritten slots may hold
    any bits, NaN included)."""
    d = src.shape[1]
    for r in range(nr):
        s, t = src[i0 + r], tile[r]
        if skip[i0 + r]:
            t[:] = 0.0
        else:
            for j in range(d):
                t[j] = half_to_float(s[j])


@njit(inline="always", **_OPTS)
def f32_row_to_f16(src, dst):
    """float32 ``src`` (C-contiguous) → float16 bit patterns ``dst`` (uint16), round to
    nearest even like NumPy's ``astype(np.float16)``, on the bits (no log/pow per value)."""
    bits = src.view(np.uint32)
    for j in range(src.shape[0]):
        x = bits[j]
        sign = (x >> np.uint32(16)) & np.uint32(0x8000)
        a = x & np.uint32(0x7FFFFFFF)
        if a >= np.uint32(0x7F800000):  # inf, NaN
            h = np.uint32(0x7E00) if a > np.uint32(0x7F800000) else np.uint32(0x7C00)
        elif a >= np.uint32(0x477FF000):  # rounds past 65504
            h = np.uint32(0x7C00)
        elif a < np.uint32(0x38800000):  # below 2^-14: a subnormal half (units of 2^-24) or zero
            h = np.uint32(np.rint(np.float64(abs(src[j])) * 16777216.0))
        else:  # normal: drop 13 mantissa bits rounding half to even, re-bias the exponent
            h = ((a + np.uint32(0x0FFF) + ((a >> np.uint32(13)) & np.uint32(1))) >> np.uint32(13)) \
                - np.uint32(0x1C000)
        dst[j] = np.uint16(sign | h)


TQ_ROWS = 16  # query tokens per prefill tile (× the GQA group: one K/V tile read serves them all)
TK_KEYS = KEYS  # keys per prefill tile (one accumulator vector of the tile kernels)


@njit(**_OPTS)
def _visible(tp, p, fp, sinks, window, ring, fp_lo, t0, exact):
    """The read rule of ``runtime/attention.py`` for query position ``tp`` and key position ``p``
    held in the fp16 slots (``fp``) or the compressed ring."""
    dist = tp - p
    if dist < 0:
        return False
    if fp:
        return p < sinks or dist < window or (exact and p >= t0)
    return dist < ring and p >= sinks and (dist >= window or p < fp_lo) and (not exact or p < t0)


@njit(**_OPTS)
def _tile_seen(pos, j0, n, fp, rule, t0, first, last):
    """Whether some query position in ``[first, last]`` sees some key ``pos[j0:j0+n]`` under the
    read rule: each key is seen from an interval of query positions (``_visible``), so this is an
    interval overlap per key — a tile wholly in the rows' future, or wholly older than their window
    (fp keys) or ring (compressed), is skipped unscored."""
    sinks, window, ring, fp_lo, exact = rule[0], rule[1], rule[2], rule[3], rule[4] != 0
    for j in range(n):
        p = pos[j0 + j]
        forever = p < sinks or (exact and p >= t0)
        if fp:
            lo, hi = p, (last if forever else p + window - 1)
        else:
            if forever:
                continue
            lo, hi = (p if p < fp_lo else p + window), p + ring - 1
        if max(lo, first) <= min(hi, last):
            return True
    return False


@njit(**_OPTS)
def _tile_update(s, n, rows, g, i0, t0, pos, fp, rule, m, den, acc, vals, j0):
    """Online-softmax update of query rows ``rows`` with the score tile ``s`` (rows, n) of keys
    ``j0 … j0+n`` (positions ``pos``): mask by the read rule, rescale, accumulate ``p · vals``.

    The rule's visible set is an interval in the query position for every key, so a key
    visible to the tile's first and last query rows is visible to all of them: such tiles
    (most of a long prefill) skip the per-element mask."""
    sinks, window, ring, fp_lo, exact = rule[0], rule[1], rule[2], rule[3], rule[4] != 0
    dv = vals.shape[1]
    first, last = t0 + i0, t0 + i0 + (rows - 1) // g
    full = True
    for j in range(n):
        p = pos[j0 + j]
        if not (_visible(first, p, fp, sinks, window, ring, fp_lo, t0, exact)
                and _visible(last, p, fp, sinks, window, ring, fp_lo, t0, exact)):
            full = False
            break
    scratch = np.empty(n, np.int32)
    for r in range(rows):
        srow = s[r]
        mx = m[r]
        if full:
            for j in range(n):
                mx = max(mx, srow[j])
        else:
            tp = t0 + i0 + r // g
            for j in range(n):
                if _visible(tp, pos[j0 + j], fp, sinks, window, ring, fp_lo, t0, exact):
                    mx = max(mx, srow[j])
                else:
                    srow[j] = -np.inf
            if mx == -np.inf:  # nothing visible in this tile: no weight
                for j in range(n):
                    srow[j] = 0.0
                continue
        if mx > m[r]:
            alpha = np.exp(m[r] - mx)  # 0 when m[r] is -inf
            den[r] *= alpha
            for x in range(acc.shape[2]):
                acc[0, r, x] *= alpha
                acc[1, r, x] *= alpha
            m[r] = mx
        den[r] += exp_sub(srow[:n], mx, scratch)  # masked scores are -inf: exp gives 0
    _pv_tile(s, n, rows, acc[0 if fp else 1], vals, j0)


@njit(**_OPTS)
def _pv_tile(s, n, rows, acc, vals, j0):
    """acc[:rows, :Dv] += s[:rows, :n] @ vals[j0:j0+n]: the columns in chunks of ``KEYS`` by
    :data:`~tqedge.codec.simd_attend.tile_pv` (:data:`~tqedge.codec.simd_attend.ROWS` rows
    per call), the rest (Dv not a multiple of ``KEYS``) by the loop below."""
    dv = vals.shape[1]
    nc = dv // TK_KEYS
    if nc > 0:
        ss, accs, vs = s.strides[0], acc.strides[0], vals.strides[0]
        sa, aa, va = s.ctypes.data, acc.ctypes.data, vals.ctypes.data + j0 * vs
        r = 0
        while r + ATT_ROWS <= rows:
            tile_pv(0, sa + r * ss, ss, n, va, vs, aa + r * accs, accs, nc)
            r += ATT_ROWS
        while r < rows:
            tile_pv(1, sa + r * ss, ss, n, va, vs, aa + r * accs, accs, nc)
            r += 1
    if nc * TK_KEYS == dv:
        return
    for r in range(rows):
        a, pa = acc[r], s[r]
        for j in range(n):
            vr = vals[j0 + j]
            for x in range(nc * TK_KEYS, dv):
                a[x] += pa[j] * vr[x]


@njit(**_OPTS)
def key_tiles(k, out):
    """The keys ``k`` (N, D) as transposed tiles ``out`` (ceil(N / KEYS), D, KEYS), zeros past N:
    the layout :data:`~tqedge.codec.simd_attend.tile_scores` reads. Made once per call and KV
    head, so every query tile reads the same tiles (a transpose per query and key tile was ~20 %
    of the kernel at 8K keys)."""
    n, d = k.shape
    for t in range(out.shape[0]):
        j0 = t * TK_KEYS
        m = min(TK_KEYS, n - j0)
        o = out[t]
        for j in range(m):
            kr = k[j0 + j]
            for x in range(d):
                o[x, j] = kr[x]
        for x in range(d):
            for j in range(m, TK_KEYS):
                o[x, j] = 0.0


@njit(**_OPTS)
def _scores_tile(q, r0, rows, kt, s):
    """s[:rows, :KEYS] = q[r0:r0+rows] @ kt for a transposed key tile ``kt`` (D, ``KEYS``;
    :func:`key_tiles`): :data:`~tqedge.codec.simd_attend.tile_scores`,
    :data:`~tqedge.codec.simd_attend.ROWS` query rows per call."""
    d = q.shape[1]
    qst, sst = q.strides[0], s.strides[0]
    qa, sa, ka = q.ctypes.data + r0 * qst, s.ctypes.data, kt.ctypes.data
    r = 0
    while r + ATT_ROWS <= rows:
        tile_scores(0, qa + r * qst, qst, ka, d, sa + r * sst, sst)
        r += ATT_ROWS
    while r < rows:
        tile_scores(1, qa + r * qst, qst, ka, d, sa + r * sst, sst)
        r += 1


@njit(**_OPTS)
def prefill_attend(qs, qp, g, kft, vf, pf, kdt, vd, pc, um, t0, i_first, rule, out):
    """Causal prefill attention of one KV head's query rows over fp16-slot keys (float32 here)
    and compressed keys (dequantized, projected domain), flash-style: tiles of
    :data:`TQ_ROWS` tokens × the GQA group against :data:`TK_KEYS` keys, online softmax, memory
    bounded by the tiles. Key tiles no row of a query tile sees (its future, or older than its
    window or ring) are skipped.

    Args:
        qs: (T·G, D) scaled queries, row ``i·G + g``; qp: (T·G, Dpk) the same, projected.
        g: query heads per KV head (G).
        kft: the fp keys (Nf, D) as :func:`key_tiles`; vf: (Nf, D) fp values; pf: (Nf,) their positions.
        kdt: the compressed keys (Nc, Dpk) as :func:`key_tiles`; vd: (Nc, Dpv) values; pc: (Nc,) positions.
        um: (Dpv, D) back-projection of compressed value sums.
        t0: position of the step's first token (the read rule's ``exact`` reads depend on it).
        i_first: index in the step of the token of row 0 (its position is ``t0 + i_first``).
        rule: int64 (sinks, window, ring, fp_lo, exact) — the read rule.
        out: (T·G, D) results.
    """
    tg, d = qs.shape
    nf, nc = pf.shape[0], pc.shape[0]
    dv = max(d, vd.shape[1])
    s = np.empty((TQ_ROWS * g, TK_KEYS), np.float32)
    m = np.empty(TQ_ROWS * g, np.float32)
    den = np.empty(TQ_ROWS * g, np.float32)
    acc = np.empty((2, TQ_ROWS * g, dv), np.float32)
    tmp = np.empty(d, np.float32)
    nt = tg // g
    for i0 in range(0, nt, TQ_ROWS):
        ti = min(TQ_ROWS, nt - i0)
        rows = ti * g
        r0 = i0 * g
        last = t0 + i_first + i0 + ti - 1
        m[:rows] = -np.inf
        den[:rows] = 0.0
        acc[:, :rows] = 0.0
        for fp in (True, False):
            npos = nf if fp else nc
            for j0 in range(0, npos, TK_KEYS):
                n = min(TK_KEYS, npos - j0)
                if not _tile_seen(pf if fp else pc, j0, n, fp, rule, t0, last - ti + 1, last):
                    continue  # no query row sees any key of the tile (its future, or out of window/ring)
                if fp:
                    _scores_tile(qs, r0, rows, kft[j0 // TK_KEYS], s)
                    _tile_update(s, n, rows, g, i_first + i0, t0, pf, True, rule, m, den, acc, vf, j0)
                else:
                    _scores_tile(qp, r0, rows, kdt[j0 // TK_KEYS], s)
                    _tile_update(s, n, rows, g, i_first + i0, t0, pc, False, rule, m, den, acc, vd, j0)
        for r in range(rows):
            matvec(acc[1, r, :um.shape[0]], um, tmp)
            inv = np.float32(1.0) / den[r]
            orow = out[r0 + r]
            for x in range(d):
                orow[x] = (acc[0, r, x] + tmp[x]) * inv


@njit(**_OPTS)
def matvec(x, m, out):
    """out (N,) = x (K,) @ m (K, N)."""
    out[:] = 0.0
    for i in range(x.shape[0]):
        xi = x[i]
        for j in range(m.shape[1]):
            out[j] += xi * m[i, j]

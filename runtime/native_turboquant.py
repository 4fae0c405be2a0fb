"""The compressed-cache branch of the native TurboQuantAttention op (nopython, serial, no GIL).

Reads a TurboQuant descriptor (:mod:`tqedge.runtime.kv_descriptor`) and does, inside the graph,
what ``CompressedKVCache._attend_decode`` / ``_attend_prefill`` do between segments: store the
step's keys/values (fp16 sinks and window ring; TurboQuant codes of the new tokens a prefill
step holds) and attend under the same :class:`~tqedge.runtime.attention.ReadRule` — fp16 keys
where the rule says so, compressed keys from the packed codes elsewhere. The window backlog is
encoded by the cache in ``prepare`` (once per ``W`` decode steps, all layers), not here.

:func:`compute` returns 0, 1 (descriptor out of range) or 2 (unsupported codec); it checks every
count and index against the descriptor's geometry before touching a buffer.
"""

from __future__ import annotations

import numpy as np
from numba import carray, types

from tqedge.codec.kernels_fused import (TQ_ROWS, f16_row_to_f32, f32_row_to_f16, f32_to_f16, matvec,
                                        prefill_attend)
from tqedge.codec.kernels_numba import dequantize_serial, scores_serial, value_sum_serial
from tqedge.codec.numba_runtime import cfunc, njit, release, try_acquire
from tqedge.runtime import kv_descriptor as KD
from tqedge.runtime.coop_pool import run as coop_run
from tqedge.runtime.fp16_kernels import scores_u16, weighted_sum_u16
from tqedge.runtime.ort_numba import as_ptr, ccall

_OPTS = dict(warm=False, nogil=True, fastmath={"reassoc", "contract", "nsz", "arcp", "afn"})
F16_MAX = 65504.0


@njit(**_OPTS)
def _codec(row, hkv, ring, d, keys):
    codes = carray(as_ptr(row[KD.C_CODES], np.uint8), (hkv, ring, row[KD.C_B]))
    scales = carray(as_ptr(row[KD.C_SCALES], np.uint16), (hkv, ring, row[KD.C_P]))
    table = carray(as_ptr(row[KD.C_TABLE], np.int64), (row[KD.C_NSEG], 7))
    cb = carray(as_ptr(row[KD.C_CB], np.float32), (row[KD.C_NCB],))
    lut = carray(as_ptr(row[KD.C_LUT], np.uint64), (row[KD.C_NLUT] // 2,))
    dp = row[KD.C_DP]
    proj = carray(as_ptr(row[KD.C_PROJ], np.float32), (d, dp) if keys else (dp, d))
    rot = carray(as_ptr(row[KD.C_ROT], np.float32), (d, d))
    bounds = carray(as_ptr(row[KD.C_BOUNDS], np.float64), (row[KD.C_NB],))
    cent = carray(as_ptr(row[KD.C_CENT], np.float64), (row[KD.C_NB] + 1,))
    return codes, scales, table, cb, lut, dp, proj, rot, bounds, cent, row[KD.C_BITS], row[KD.C_CORR]


@njit(**_OPTS)
def encode_row(x, rot, bounds, cent, bits, corrected, codes_out, scales_out):
    """TurboQuant (one part, MSE) of one float16-valued vector ``x`` (D,) f32 into a code row
    and its float16 scale (bit pattern), as ``TurboQuant.encode``."""
    d = x.shape[0]
    y = np.zeros(d, np.float32)
    for i in range(d):
        xi = x[i]
        for j in range(d):
            y[j] += xi * rot[i, j]
    norm = 0.0
    for j in range(d):
        norm += np.float64(y[j]) * np.float64(y[j])
    norm = np.sqrt(norm)
    den = norm if norm > 0 else 1.0
    for b in range(codes_out.shape[0]):
        codes_out[b] = 0
    cn = 0.0
    mask = (1 << bits) - 1
    for j in range(d):
        u = np.float64(np.float32(np.float64(y[j]) / den))
        idx = np.searchsorted(bounds, u, side="right")
        cn += cent[idx] * cent[idx]
        bit = j * bits
        byte = bit >> 3
        sh = bit & 7
        val = (np.int64(idx) & mask) << sh
        codes_out[byte] |= np.uint8(val & 0xFF)
        if sh + bits > 8:
            codes_out[byte + 1] |= np.uint8(val >> 8)
    scale = norm / np.sqrt(cn) if corrected else norm
    scales_out[0] = f32_to_f16(min(scale, F16_MAX))


DECODE_CHUNK = 512  # compressed keys per decode work item (all KV heads)
# the argument block of one decode step's work items (int64 words; addresses marked *)
DB_QP, DB_KROW, DB_VROW, DB_HKV, DB_RING, DB_D, DB_G, DB_CHUNKS, DB_MO, DB_DNO, DB_ACCO, DB_NCH = range(12)
DB_WORDS = 12


@njit(**_OPTS)
def decode_item(block_addr, c):
    """Work item ``c`` of a decode step: over the compressed ring rows ``[chunks[c, 0],
    chunks[c, 1])``, for every head and query, the scores' max ``mo[c]``, the sum of
    ``exp(score - max)`` ``dno[c]`` and the projected value sum ``acco[c]`` relative to that max."""
    b = carray(as_ptr(block_addr, np.int64), (DB_WORDS,))
    hkv, ring, d, g, nch = b[DB_HKV], b[DB_RING], b[DB_D], b[DB_G], b[DB_NCH]
    kc = _codec(carray(as_ptr(b[DB_KROW], np.int64), (KD.CODEC_WORDS,)), hkv, ring, d, True)
    vc = _codec(carray(as_ptr(b[DB_VROW], np.int64), (KD.CODEC_WORDS,)), hkv, ring, d, False)
    dpk, dpv = kc[5], vc[5]
    qp = carray(as_ptr(b[DB_QP], np.float32), (hkv, g, dpk))
    chunks = carray(as_ptr(b[DB_CHUNKS], np.int64), (nch, 2))
    mo = carray(as_ptr(b[DB_MO], np.float32), (nch, hkv, g))[c]
    dno = carray(as_ptr(b[DB_DNO], np.float32), (nch, hkv, g))[c]
    acco = carray(as_ptr(b[DB_ACCO], np.float32), (nch, hkv, g, dpv))[c]
    a, e = chunks[c, 0], chunks[c, 1]
    sc = scores_serial(qp, kc[0][:, a:e], kc[1][:, a:e], kc[2], kc[3], kc[4])  # (Hkv, G, n)
    for h in range(hkv):
        for gg in range(g):
            mx = -np.inf
            for n in range(e - a):
                mx = max(mx, sc[h, gg, n])
            tot = np.float32(0.0)
            for n in range(e - a):
                p = np.exp(sc[h, gg, n] - mx)
                sc[h, gg, n] = p
                tot += p
            mo[h, gg] = mx
            dno[h, gg] = tot
    acco[:] = value_sum_serial(sc, vc[0][:, a:e], vc[1][:, a:e], vc[2], vc[3], vc[4], dpv)
    return 0


@cfunc(types.int64(types.int64, types.int64), nogil=True)
def _decode_item_entry(block_addr, c):
    return decode_item(block_addr, c)


DECODE_ITEM_ENTRY = _decode_item_entry.address  # what the descriptor hands the op (word TQ_DECODE_ITEM)


@njit(**_OPTS)
def _run_decode_items(qp, krow, vrow, ring, d, chunks, mo, dno, acco, threads, lock, pool, item_fn):
    """Every :func:`decode_item` of a step, serially or on the cooperative pool. The arrays are
    arguments so they outlive the items (Numba frees a local after its last use in the code)."""
    hkv, g, _ = qp.shape
    nch = chunks.shape[0]
    block = np.empty(DB_WORDS, np.int64)
    block[DB_QP], block[DB_KROW], block[DB_VROW], block[DB_HKV] = qp.ctypes.data, krow.ctypes.data, \
        vrow.ctypes.data, hkv
    block[DB_RING], block[DB_D], block[DB_G], block[DB_CHUNKS] = ring, d, g, chunks.ctypes.data
    block[DB_MO], block[DB_DNO], block[DB_ACCO], block[DB_NCH] = mo.ctypes.data, dno.ctypes.data, \
        acco.ctypes.data, nch
    if nch > 1 and threads > 1 and pool != 0 and item_fn != 0 and try_acquire(lock):
        coop_run(pool, item_fn, block.ctypes.data, nch)
        release(lock)
    else:
        for c in range(nch):
            decode_item(block.ctypes.data, c)
    return block[DB_NCH]  # a read after the items: ``block`` must not be freed while they run


@njit(**_OPTS)
def _decode(q, scale, fpk, fpv, bias, kc, vc, krow, vrow, ring, ranges, nr, threads, lock, pool, item_fn, out):
    """One token (q (Hq, D)) over fp16 slots (bias -inf = unread) and ring index ranges, as
    ``attention.decode``: the fp16 part, then the compressed ring in chunks of
    :data:`DECODE_CHUNK` keys (:func:`decode_item`), each with its own softmax max, merged in
    chunk order. The chunks run on this thread alone, or with the cooperative pool's workers
    (:mod:`tqedge.runtime.coop_pool`) when ``threads`` > 1, there are two chunks or more and the
    launch ``lock`` is free: same items, same merge, the same result either way."""
    hkv, nf, d = fpk.shape
    hq = q.shape[0]
    g = hq // hkv
    dpk, pq, dpv, um = kc[5], kc[6], vc[5], vc[6]
    qh = np.empty((hkv, g, d), np.float32)
    for h in range(hkv):
        for gg in range(g):
            for x in range(d):
                qh[h, gg, x] = q[h * g + gg, x] * scale
    s_fp = scores_u16(qh, fpk, bias)  # (Hkv, G, Nf)
    m_fp = np.full((hkv, g), -np.inf, np.float32)
    den = np.zeros((hkv, g), np.float32)
    for h in range(hkv):
        for gg in range(g):
            for n in range(nf):
                m_fp[h, gg] = max(m_fp[h, gg], s_fp[h, gg, n])
            for n in range(nf):
                p = np.exp(s_fp[h, gg, n] - m_fp[h, gg]) if m_fp[h, gg] != -np.inf else np.float32(0.0)
                s_fp[h, gg, n] = p
                den[h, gg] += p
    acc = weighted_sum_u16(s_fp, fpv)  # (Hkv, G, D), relative to m_fp
    qp = np.empty((hkv, g, dpk), np.float32)
    for h in range(hkv):
        for gg in range(g):
            matvec(qh[h, gg], pq, qp[h, gg])
    nch = 0
    for r in range(nr):
        nch += (ranges[2 * r + 1] - ranges[2 * r] + DECODE_CHUNK - 1) // DECODE_CHUNK
    chunks = np.empty((nch, 2), np.int64)
    c = 0
    for r in range(nr):
        for a in range(ranges[2 * r], ranges[2 * r + 1], DECODE_CHUNK):
            chunks[c, 0], chunks[c, 1] = a, min(a + DECODE_CHUNK, ranges[2 * r + 1])
            c += 1
    mo = np.empty((nch, hkv, g), np.float32)
    dno = np.empty((nch, hkv, g), np.float32)
    acco = np.empty((nch, hkv, g, dpv), np.float32)
    _run_decode_items(qp, krow, vrow, ring, d, chunks, mo, dno, acco, threads, lock, pool, item_fn)
    accp = np.empty(dpv, np.float32)
    tmp = np.empty(d, np.float32)
    for h in range(hkv):
        for gg in range(g):
            m = m_fp[h, gg]
            for c in range(nch):
                m = max(m, mo[c, h, gg])
            f = np.exp(m_fp[h, gg] - m) if m_fp[h, gg] != -np.inf else np.float32(0.0)
            tot = den[h, gg] * f
            accp[:] = 0.0
            for c in range(nch):
                fc = np.exp(mo[c, h, gg] - m) if mo[c, h, gg] != -np.inf else np.float32(0.0)
                tot += dno[c, h, gg] * fc
                for x in range(dpv):
                    accp[x] += acco[c, h, gg, x] * fc
            matvec(accp, um, tmp)
            inv = np.float32(1.0) / tot
            for x in range(d):
                out[h * g + gg, x] = (acc[h, gg, x] * f + tmp[x]) * inv


@njit(**_OPTS)
def _gather_deq(codec, idx, extra_c, extra_s, n_extra):
    """Dequantized (projected domain) rows: ring rows ``idx`` then the first ``n_extra`` of
    ``extra_c``/``extra_s`` (the step's new codes): (Hkv, len(idx) + n_extra, Dp) float32."""
    codes, scales, tab, cb, lut, dp = codec[0], codec[1], codec[2], codec[3], codec[4], codec[5]
    hkv, _, nb = codes.shape
    npar = scales.shape[2]
    n_old = idx.shape[0]
    c = np.empty((hkv, n_old + n_extra, nb), np.uint8)
    s = np.empty((hkv, n_old + n_extra, npar), np.uint16)
    for h in range(hkv):
        for j in range(n_old):
            c[h, j] = codes[h, idx[j]]
            s[h, j] = scales[h, idx[j]]
        for j in range(n_extra):
            c[h, n_old + j] = extra_c[h, j]
            s[h, n_old + j] = extra_s[h, j]
    return dequantize_serial(c, s, tab, cb, lut, dp)


# the argument block of one prefill step's work items (int64 words)
(PB_QS, PB_QP, PB_KF, PB_VF, PB_PF, PB_KD, PB_VD, PB_PC, PB_UM, PB_RULE, PB_RES, PB_HKV, PB_T, PB_G, PB_D,
 PB_DPK, PB_DPV, PB_NF, PB_NC, PB_T0) = range(20)
PB_WORDS = 20


@njit(**_OPTS)
def prefill_item(block_addr, w):
    """Work item ``w`` of a prefill step (argument block ``PB_*``): :func:`~tqedge.codec.kernels_fused.prefill_attend`
    for KV head ``w // tiles`` and query tile ``w % tiles`` (:data:`TQ_ROWS` tokens)."""
    b = carray(as_ptr(block_addr, np.int64), (PB_WORDS,))
    hkv, t, g, d = b[PB_HKV], b[PB_T], b[PB_G], b[PB_D]
    dpk, dpv, nf, nc = b[PB_DPK], b[PB_DPV], b[PB_NF], b[PB_NC]
    f32 = np.float32
    qs = carray(as_ptr(b[PB_QS], f32), (hkv, t * g, d))
    qp = carray(as_ptr(b[PB_QP], f32), (hkv, t * g, dpk))
    kf = carray(as_ptr(b[PB_KF], f32), (hkv, nf, d))
    vf = carray(as_ptr(b[PB_VF], f32), (hkv, nf, d))
    pf = carray(as_ptr(b[PB_PF], np.int64), (nf,))
    kd = carray(as_ptr(b[PB_KD], f32), (hkv, nc, dpk))
    vd = carray(as_ptr(b[PB_VD], f32), (hkv, nc, dpv))
    pc = carray(as_ptr(b[PB_PC], np.int64), (nc,))
    um = carray(as_ptr(b[PB_UM], f32), (dpv, d))
    rule = carray(as_ptr(b[PB_RULE], np.int64), (5,))
    res = carray(as_ptr(b[PB_RES], f32), (hkv, t * g, d))
    ntile = (t + TQ_ROWS - 1) // TQ_ROWS
    h = w // ntile
    i0 = (w % ntile) * TQ_ROWS
    i1 = min(t, i0 + TQ_ROWS)
    prefill_attend(qs[h, i0 * g:i1 * g], qp[h, i0 * g:i1 * g], g, kf[h], vf[h], pf, kd[h], vd[h], pc, um,
                   b[PB_T0], i0, rule, res[h, i0 * g:i1 * g])
    return 0


@cfunc(types.int64(types.int64, types.int64), nogil=True)
def _prefill_item_entry(block_addr, w):
    return prefill_item(block_addr, w)


PREFILL_ITEM_ENTRY = _prefill_item_entry.address  # descriptor words TQ_PAR_PREFILL / LY_PAR_PREFILL


@njit(**_OPTS)
def run_items(qs, qp, g, kf, vf, pf, kd, vd, pc, um, t0, rule, res, threads, lock, pool, item_fn):
    """Every :func:`prefill_item` of a prefill step (arrays C-contiguous): on the cooperative
    pool when ``threads`` > 1 and the launch ``lock`` is free, else on this thread (same bits)."""
    hkv, tg, d = qs.shape
    block = np.empty(PB_WORDS, np.int64)
    block[PB_QS], block[PB_QP], block[PB_KF], block[PB_VF] = qs.ctypes.data, qp.ctypes.data, kf.ctypes.data, \
        vf.ctypes.data
    block[PB_PF], block[PB_KD], block[PB_VD], block[PB_PC] = pf.ctypes.data, kd.ctypes.data, vd.ctypes.data, \
        pc.ctypes.data
    block[PB_UM], block[PB_RULE], block[PB_RES] = um.ctypes.data, rule.ctypes.data, res.ctypes.data
    block[PB_HKV], block[PB_T], block[PB_G], block[PB_D] = hkv, tg // g, g, d
    block[PB_DPK], block[PB_DPV], block[PB_NF], block[PB_NC], block[PB_T0] = qp.shape[2], vd.shape[2], \
        kf.shape[1], kd.shape[1], t0
    n = hkv * ((tg // g + TQ_ROWS - 1) // TQ_ROWS)
    if n > 1 and threads > 1 and pool != 0 and item_fn != 0 and try_acquire(lock):
        coop_run(pool, item_fn, block.ctypes.data, n)
        release(lock)
    else:
        for w in range(n):
            prefill_item(block.ctypes.data, w)
    return block[PB_T]  # a read after the items: ``block`` must not be freed while they run


@njit(**_OPTS)
def _prefill(q, k, v, scale, t0, sinks, window, ring, fp_lo, exact, fpk, fpv, kc, vc,
             fp_slots, pf, old_idx, pc, new_c, n_new_read, threads, lock, pool, item_fn, out):
    t, hq, d = q.shape
    hkv, nfs, _ = fpk.shape
    g = hq // hkv
    nfo = fp_slots.shape[0]
    nf = nfo + t
    n_new = new_c.shape[0]
    n_sink_new = t - n_new
    k16 = np.empty((t, hkv, d), np.uint16)
    v16 = np.empty((t, hkv, d), np.uint16)
    kf = np.empty((hkv, nf, d), np.float32)
    vf = np.empty((hkv, nf, d), np.float32)
    for h in range(hkv):
        for j in range(nfo):
            f16_row_to_f32(fpk[h, fp_slots[j]], kf[h, j])
            f16_row_to_f32(fpv[h, fp_slots[j]], vf[h, j])
        for i in range(t):
            f32_row_to_f16(k[i, h], k16[i, h])
            f32_row_to_f16(v[i, h], v16[i, h])
            f16_row_to_f32(k16[i, h], kf[h, nfo + i])
            f16_row_to_f32(v16[i, h], vf[h, nfo + i])
    # codes of the new non-sink tokens
    kcn = np.empty((hkv, n_new, kc[0].shape[2]), np.uint8)
    ksn = np.empty((hkv, n_new, kc[1].shape[2]), np.uint16)
    vcn = np.empty((hkv, n_new, vc[0].shape[2]), np.uint8)
    vsn = np.empty((hkv, n_new, vc[1].shape[2]), np.uint16)
    for j in range(n_new):
        for h in range(hkv):
            encode_row(kf[h, nfo + n_sink_new + j], kc[7], kc[8], kc[9], kc[10], kc[11], kcn[h, j], ksn[h, j])
            encode_row(vf[h, nfo + n_sink_new + j], vc[7], vc[8], vc[9], vc[10], vc[11], vcn[h, j], vsn[h, j])
    kd = _gather_deq(kc, old_idx, kcn, ksn, n_new_read)  # (Hkv, Nc, Dpk)
    vd = _gather_deq(vc, old_idx, vcn, vsn, n_new_read)  # (Hkv, Nc, Dpv)
    dpk = kc[5]
    pq, um = kc[6], vc[6]
    rule = np.array([sinks, window, ring, fp_lo, 1 if exact else 0], np.int64)
    qs = np.empty((hkv, t * g, d), np.float32)
    qp = np.empty((hkv, t * g, dpk), np.float32)
    res = np.empty((hkv, t * g, d), np.float32)
    for h in range(hkv):
        for i in range(t):
            for gg in range(g):
                r = i * g + gg
                for x in range(d):
                    qs[h, r, x] = q[i, h * g + gg, x] * scale
                matvec(qs[h, r], pq, qp[h, r])
    run_items(qs, qp, g, kf, vf, pf, kd, vd, pc, np.ascontiguousarray(um), t0, rule, res, threads, lock, pool,
              item_fn)
    for h in range(hkv):
        for i in range(t):
            for gg in range(g):
                out[i, h * g + gg] = res[h, i * g + gg]
    # store after attending: the new tokens overwrite slots earlier rows of this step read
    for i in range(t):
        p = t0 + i
        if p < sinks:
            for h in range(hkv):
                fpk[h, p] = k16[i, h]
                fpv[h, p] = v16[i, h]
    if window > 0:
        for j in range(max(0, n_new - window), n_new):
            slot = sinks + new_c[j] % window
            for h in range(hkv):
                fpk[h, slot] = k16[n_sink_new + j, h]
                fpv[h, slot] = v16[n_sink_new + j, h]
    for j in range(n_new):
        r = (new_c[j] - sinks) % ring
        for h in range(hkv):
            kc[0][h, r] = kcn[h, j]
            kc[1][h, r] = ksn[h, j]
            vc[0][h, r] = vcn[h, j]
            vc[1][h, r] = vsn[h, j]


@njit(**_OPTS)
def _in_range(a, lo, hi):
    for i in range(a.shape[0]):
        if a[i] < lo or a[i] >= hi:
            return False
    return True


@njit(**_OPTS)
def compute(desc, nd, layer, q, k, v, scale, out):
    """The compressed-cache op for one layer: 0 ok, 1 descriptor out of range, 2 unsupported."""
    if nd < KD.TQ_WORDS:
        return 1
    nl, hkv, d, t, t0 = desc[KD.LAYERS], desc[KD.HKV], desc[KD.DIM], desc[KD.T], desc[KD.T0]
    sinks, window, ring = desc[KD.TQ_S], desc[KD.TQ_W], desc[KD.TQ_R]
    if sinks < 0 or window < 0 or ring < max(1, window) or t0 < 0 or desc[KD.TQ_LW] != KD.LAYER_WORDS \
            or desc[KD.TQ_FP_K] == 0 or desc[KD.TQ_FP_V] == 0 or desc[KD.TQ_LAYERS] == 0:
        return 1
    nfs = sinks + window
    fpk = carray(as_ptr(desc[KD.TQ_FP_K], np.uint16), (nl, hkv, nfs, d))[layer]
    fpv = carray(as_ptr(desc[KD.TQ_FP_V], np.uint16), (nl, hkv, nfs, d))[layer]
    lt = carray(as_ptr(desc[KD.TQ_LAYERS], np.int64), (nl, KD.LAYER_WORDS))[layer]
    krow, vrow = lt[:KD.CODEC_WORDS], lt[KD.CODEC_WORDS:]
    if krow[KD.C_OK] == 0 or vrow[KD.C_OK] == 0:
        return 2
    kc = _codec(krow, hkv, ring, d, True)
    vc = _codec(vrow, hkv, ring, d, False)
    mode = desc[KD.TQ_MODE]
    if mode == KD.MODE_DECODE:
        nr = desc[KD.TQ_NR]
        if t != 1 or nr < 0 or nr > 2:
            return 1
        ranges = desc[KD.TQ_RANGES:KD.TQ_RANGES + 4]
        for r in range(nr):
            if ranges[2 * r] < 0 or ranges[2 * r] > ranges[2 * r + 1] or ranges[2 * r + 1] > ring:
                return 1
        bias = carray(as_ptr(desc[KD.TQ_BIAS], np.float32), (nfs,))
        k16 = np.empty((hkv, d), np.uint16)
        v16 = np.empty((hkv, d), np.uint16)
        for h in range(hkv):
            f32_row_to_f16(k[0, h], k16[h])
            f32_row_to_f16(v[0, h], v16[h])
        if t0 < sinks or window > 0:
            slot = t0 if t0 < sinks else sinks + t0 % window
            for h in range(hkv):
                fpk[h, slot] = k16[h]
                fpv[h, slot] = v16[h]
        if t0 >= sinks and window == 0:  # no window: codes at once
            r = (t0 - sinks) % ring
            row = np.empty(d, np.float32)
            for h in range(hkv):
                f16_row_to_f32(k16[h], row)
                encode_row(row, kc[7], kc[8], kc[9], kc[10], kc[11], kc[0][h, r], kc[1][h, r])
                f16_row_to_f32(v16[h], row)
                encode_row(row, vc[7], vc[8], vc[9], vc[10], vc[11], vc[0][h, r], vc[1][h, r])
        _decode(q[0], scale, fpk, fpv, bias, kc, vc, krow, vrow, ring, ranges, nr, desc[KD.THREADS],
                desc[KD.TQ_LOCK], desc[KD.TQ_POOL], desc[KD.TQ_DECODE_ITEM], out[0])
        return 0
    if mode != KD.MODE_PREFILL:
        return 1
    n_fs, n_pf = desc[KD.TQ_FP_SLOTS + 1], desc[KD.TQ_PF + 1]
    n_old, n_pc, n_new = desc[KD.TQ_OLD_IDX + 1], desc[KD.TQ_PC + 1], desc[KD.TQ_NEW_C + 1]
    n_read = desc[KD.TQ_N_NEW_READ]
    if n_fs < 0 or n_fs > nfs or n_pf != n_fs + t or n_old < 0 or n_old > ring or n_pc != n_old + n_read \
            or n_read < 0 or n_read > n_new or n_new > t or n_new < 0:
        return 1
    fp_slots = carray(as_ptr(desc[KD.TQ_FP_SLOTS], np.int64), (n_fs,))
    old_idx = carray(as_ptr(desc[KD.TQ_OLD_IDX], np.int64), (n_old,))
    new_c = carray(as_ptr(desc[KD.TQ_NEW_C], np.int64), (n_new,))
    if not (_in_range(fp_slots, 0, nfs) and _in_range(old_idx, 0, ring) and _in_range(new_c, sinks, t0 + t)):
        return 1
    pf = carray(as_ptr(desc[KD.TQ_PF], np.int64), (n_pf,))
    pc = carray(as_ptr(desc[KD.TQ_PC], np.int64), (n_pc,))
    _prefill(q, k, v, scale, t0, sinks, window, ring, desc[KD.TQ_FP_LO], desc[KD.TQ_EXACT_PREFILL] != 0,
             fpk, fpv, kc, vc, fp_slots, pf, old_idx, pc, new_c, n_read, desc[KD.THREADS], desc[KD.TQ_LOCK],
             desc[KD.TQ_POOL], desc[KD.TQ_PAR_PREFILL], out)
    return 0

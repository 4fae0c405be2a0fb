"""The compressed-cache branch of the native TurboQuantAttention op (nopython, no GIL): the
descriptor checks, decode, and the dispatch to the prefill branch (:mod:`tqedge.runtime.native_prefill`).

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

from tqedge.codec.fastexp import exp_sub
from tqedge.codec.kernels_fused import f16_row_to_f32, f32_row_to_f16, matvec
from tqedge.codec.kernels_numba import scores_serial, value_sum_serial
from tqedge.codec.numba_runtime import cfunc, njit
from tqedge.runtime import kv_descriptor as KD
from tqedge.runtime.coop_pool import run_items as coop_run_items
from tqedge.runtime.fp16_kernels import scores_u16, weighted_sum_u16
from tqedge.runtime.native_prefill import _prefill, codec, encode_row
from tqedge.runtime.ort_numba import as_ptr

_OPTS = dict(warm=False, nogil=True, fastmath={"reassoc", "contract", "nsz", "arcp", "afn"})


DECODE_CHUNK = 512  # compressed keys per decode work item (all KV heads)
# work items from which a decode step uses the cooperative pool. Round 20 (SmolLM2 int4, 2 threads,
# AVX-512 machine, benchmarks/ab_step.py, 3 rounds, medians; docs/RESULTS.md): from 2 items instead of
# 8, a step at 2K took 19.7 instead of 24.7 ms (23.9 → 20.2 beside a busy process), at 1K 17.2
# instead of 18.3, at 4K 24.9 instead of 27.2; chunks of 256 keys gained nothing more. (Round 12,
# AVX2: at 2K the pool was slower, 29.5 vs 32.4 tok/s, a worker woken per call finishing after the caller.)
DECODE_POOL_MIN_ITEMS = 2
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
    kc = codec(carray(as_ptr(b[DB_KROW], np.int64), (KD.CODEC_WORDS,)), hkv, ring, d, True)
    vc = codec(carray(as_ptr(b[DB_VROW], np.int64), (KD.CODEC_WORDS,)), hkv, ring, d, False)
    dpk, dpv = kc[5], vc[5]
    qp = carray(as_ptr(b[DB_QP], np.float32), (hkv, g, dpk))
    chunks = carray(as_ptr(b[DB_CHUNKS], np.int64), (nch, 2))
    mo = carray(as_ptr(b[DB_MO], np.float32), (nch, hkv, g))[c]
    dno = carray(as_ptr(b[DB_DNO], np.float32), (nch, hkv, g))[c]
    acco = carray(as_ptr(b[DB_ACCO], np.float32), (nch, hkv, g, dpv))[c]
    a, e = chunks[c, 0], chunks[c, 1]
    sc = scores_serial(qp, kc[0][:, a:e], kc[1][:, a:e], kc[2], kc[3], kc[4])  # (Hkv, G, n)
    scratch = np.empty(e - a, np.int32)
    for h in range(hkv):
        for gg in range(g):
            mx = -np.inf
            for n in range(e - a):
                mx = max(mx, sc[h, gg, n])
            mo[h, gg] = mx
            dno[h, gg] = exp_sub(sc[h, gg], mx, scratch)
    acco[:] = value_sum_serial(sc, vc[0][:, a:e], vc[1][:, a:e], vc[2], vc[3], vc[4], dpv)
    return 0


@cfunc(types.int64(types.int64, types.int64), nogil=True)
def _decode_item_entry(block_addr, c):
    return decode_item(block_addr, c)


DECODE_ITEM_ENTRY = _decode_item_entry.address  # what the descriptor hands the op (word TQ_DECODE_ITEM)


@njit(**_OPTS)
def _run_decode_items(qp, krow, vrow, ring, d, chunks, mo, dno, acco, threads, lock, pool, item_fn, ort_pool):
    """Every :func:`decode_item` of a step, through :func:`tqedge.runtime.coop_pool.run_items`
    (onnxruntime's pool, the cooperative pool or this thread). The arrays are arguments so they
    outlive the items (Numba frees a local after its last use in the code)."""
    hkv, g, _ = qp.shape
    nch = chunks.shape[0]
    block = np.empty(DB_WORDS, np.int64)
    block[DB_QP], block[DB_KROW], block[DB_VROW], block[DB_HKV] = qp.ctypes.data, krow.ctypes.data, \
        vrow.ctypes.data, hkv
    block[DB_RING], block[DB_D], block[DB_G], block[DB_CHUNKS] = ring, d, g, chunks.ctypes.data
    block[DB_MO], block[DB_DNO], block[DB_ACCO], block[DB_NCH] = mo.ctypes.data, dno.ctypes.data, \
        acco.ctypes.data, nch
    coop_run_items(ort_pool, pool, lock, threads, item_fn, block.ctypes.data, nch, DECODE_POOL_MIN_ITEMS)
    return block[DB_NCH]  # a read after the items: ``block`` must not be freed while they run


@njit(**_OPTS)
def _decode(q, scale, fpk, fpv, bias, kc, vc, krow, vrow, ring, ranges, nr, threads, lock, pool, item_fn, ort_pool,
            out):
    """One token (q (Hq, D)) over fp16 slots (bias -inf = unread) and ring index ranges, as
    ``attention.decode``: the fp16 part, then the compressed ring in chunks of
    :data:`DECODE_CHUNK` keys (:func:`decode_item`), each with its own softmax max, merged in
    chunk order. The chunks run on this thread alone, or with the cooperative pool's workers
    (:mod:`tqedge.runtime.coop_pool`) when ``threads`` > 1, there are :data:`DECODE_POOL_MIN_ITEMS`
    chunks or more and the launch ``lock`` is free: same items, same merge, the same result."""
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
    scratch = np.empty(nf, np.int32)
    for h in range(hkv):
        for gg in range(g):
            for n in range(nf):
                m_fp[h, gg] = max(m_fp[h, gg], s_fp[h, gg, n])
            if m_fp[h, gg] == -np.inf:  # no fp16 key is read: no weight
                s_fp[h, gg, :] = 0.0
            else:
                den[h, gg] = exp_sub(s_fp[h, gg], m_fp[h, gg], scratch)
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
    _run_decode_items(qp, krow, vrow, ring, d, chunks, mo, dno, acco, threads, lock, pool, item_fn, ort_pool)
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
def _in_range(a, lo, hi):
    for i in range(a.shape[0]):
        if a[i] < lo or a[i] >= hi:
            return False
    return True


@njit(**_OPTS)
def compute(desc, nd, layer, q, k, v, scale, out, ort_pool):
    """The compressed-cache op for one layer: 0 ok, 1 descriptor out of range, 2 unsupported.
    ``ort_pool``: the op's parallel-for record or 0 (:func:`tqedge.runtime.coop_pool.run_items`)."""
    if nd < KD.TQ_WORDS:
        return 1
    nl, hkv, d, t, t0 = desc[KD.LAYERS], desc[KD.HKV], desc[KD.DIM], desc[KD.T], desc[KD.T0]
    sinks, window, ring = desc[KD.TQ_S], desc[KD.TQ_W], desc[KD.TQ_R]
    if sinks < 0 or window < 0 or ring < max(1, window) or t0 < 0 or desc[KD.TQ_LW] != KD.LAYER_WORDS \
            or desc[KD.TQ_FP_K] == 0 or desc[KD.TQ_FP_V] == 0 or desc[KD.TQ_LAYERS] == 0 \
            or desc[KD.TQ_PAR_PREFILL] == 0 or desc[KD.TQ_DECODE_ITEM] == 0:
        return 1
    nfs = sinks + window
    fpk = carray(as_ptr(desc[KD.TQ_FP_K], np.uint16), (nl, hkv, nfs, d))[layer]
    fpv = carray(as_ptr(desc[KD.TQ_FP_V], np.uint16), (nl, hkv, nfs, d))[layer]
    lt = carray(as_ptr(desc[KD.TQ_LAYERS], np.int64), (nl, KD.LAYER_WORDS))[layer]
    krow, vrow = lt[:KD.CODEC_WORDS], lt[KD.CODEC_WORDS:]
    if krow[KD.C_OK] == 0 or vrow[KD.C_OK] == 0:
        return 2
    mode = desc[KD.TQ_MODE]
    if mode == KD.MODE_DECODE:
        kc = codec(krow, hkv, ring, d, True)
        vc = codec(vrow, hkv, ring, d, False)
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
        p = desc[KD.TQ_ENCODE_OLD]
        if p >= 0:  # the token leaving the window gets its codes from its fp16 copy, before the new
            if window == 0 or p < sinks or p != t0 - window:  # token takes that slot
                return 1
            slot, r = sinks + p % window, (p - sinks) % ring
            row = np.empty(d, np.float32)
            for h in range(hkv):
                f16_row_to_f32(fpk[h, slot], row)
                encode_row(row, kc[7], kc[8], kc[9], kc[10], kc[11], kc[0][h, r], kc[1][h, r])
                f16_row_to_f32(fpv[h, slot], row)
                encode_row(row, vc[7], vc[8], vc[9], vc[10], vc[11], vc[0][h, r], vc[1][h, r])
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
                desc[KD.TQ_LOCK], desc[KD.TQ_POOL], desc[KD.TQ_DECODE_ITEM], ort_pool, out[0])
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
             fpk, fpv, krow, vrow, fp_slots, pf, old_idx, pc, new_c, n_read, desc[KD.THREADS], desc[KD.TQ_LOCK],
             desc[KD.TQ_POOL], desc[KD.TQ_PAR_PREFILL], ort_pool, out)
    return 0

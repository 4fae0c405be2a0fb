"""The prefill branch of the native TurboQuantAttention op (nopython, no GIL), and the encoder
of new tokens.

A prefill step attends ``T`` new tokens over the fp16 sinks/window, the compressed ring (decoded
for the step, :func:`_gather_deq`) and the step's own tokens, under the cache's
:class:`~tqedge.runtime.attention.ReadRule`: the work is split into (KV head, 16-token query tile)
items (:func:`prefill_item`, flash-style tiles of :func:`~tqedge.codec.kernels_fused.prefill_attend`)
that :func:`run_items` runs on the calling thread or on the cooperative pool
(:mod:`tqedge.runtime.coop_pool`) — the same items either way. Then the new tokens are stored:
sinks and window in fp16, TurboQuant codes of every token past the sinks (:func:`encode_row`).
The sliding-window branch (:mod:`tqedge.runtime.native_sliding`) reuses :func:`run_items`.
"""

from __future__ import annotations

import numpy as np
from numba import carray, types

from tqedge.codec.kernels_fused import (TK_KEYS, TQ_ROWS, f16_row_to_f32, f32_row_to_f16, f32_to_f16, key_tiles, matvec,
                                        prefill_attend)
from tqedge.codec.kernels_numba import dequantize_serial
from tqedge.codec.numba_runtime import cfunc, njit
from tqedge.runtime.coop_pool import run_items as coop_run_items
from tqedge.runtime.ort_numba import as_ptr

_OPTS = dict(warm=False, nogil=True, fastmath={"reassoc", "contract", "nsz", "arcp", "afn"})
F16_MAX = 65504.0


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
    # the code of each value: how many boundaries are ≤ it (``searchsorted`` side right, NaN
    # last), counted boundary by boundary so the loop over values vectorizes
    nb = bounds.shape[0]
    u = np.empty(d, np.float64)
    idx = np.zeros(d, np.int64)
    for j in range(d):
        u[j] = np.float64(np.float32(np.float64(y[j]) / den))
    for b in range(nb):
        bb = bounds[b]
        for j in range(d):
            idx[j] += 1 if bb <= u[j] else 0
    for b in range(codes_out.shape[0]):
        codes_out[b] = 0
    cn = 0.0
    mask = (1 << bits) - 1
    for j in range(d):
        i = nb if u[j] != u[j] else idx[j]
        cn += cent[i] * cent[i]
        bit = j * bits
        byte = bit >> 3
        sh = bit & 7
        val = (i & mask) << sh
        codes_out[byte] |= np.uint8(val & 0xFF)
        if sh + bits > 8:
            codes_out[byte + 1] |= np.uint8(val >> 8)
    scale = norm / np.sqrt(cn) if corrected else norm
    scales_out[0] = f32_to_f16(min(scale, F16_MAX))


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
    kft = carray(as_ptr(b[PB_KF], f32), (hkv, (nf + TK_KEYS - 1) // TK_KEYS, d, TK_KEYS))
    vf = carray(as_ptr(b[PB_VF], f32), (hkv, nf, d))
    pf = carray(as_ptr(b[PB_PF], np.int64), (nf,))
    kdt = carray(as_ptr(b[PB_KD], f32), (hkv, (nc + TK_KEYS - 1) // TK_KEYS, dpk, TK_KEYS))
    vd = carray(as_ptr(b[PB_VD], f32), (hkv, nc, dpv))
    pc = carray(as_ptr(b[PB_PC], np.int64), (nc,))
    um = carray(as_ptr(b[PB_UM], f32), (dpv, d))
    rule = carray(as_ptr(b[PB_RULE], np.int64), (5,))
    res = carray(as_ptr(b[PB_RES], f32), (hkv, t * g, d))
    ntile = (t + TQ_ROWS - 1) // TQ_ROWS
    h = w // ntile
    i0 = (w % ntile) * TQ_ROWS
    i1 = min(t, i0 + TQ_ROWS)
    prefill_attend(qs[h, i0 * g:i1 * g], qp[h, i0 * g:i1 * g], g, kft[h], vf[h], pf, kdt[h], vd[h], pc, um,
                   b[PB_T0], i0, rule, res[h, i0 * g:i1 * g])
    return 0


@cfunc(types.int64(types.int64, types.int64), nogil=True)
def _prefill_item_entry(block_addr, w):
    return prefill_item(block_addr, w)


PREFILL_ITEM_ENTRY = _prefill_item_entry.address  # descriptor words TQ_PAR_PREFILL / LY_PAR_PREFILL


@njit(**_OPTS)
def run_items(qs, qp, g, kf, vf, pf, kd, vd, pc, um, t0, rule, res, threads, lock, pool, item_fn, ort_pool):
    """Every :func:`prefill_item` of a prefill step (arrays C-contiguous; the keys ``kf`` (Hkv,
    Nf, D) and ``kd`` (Hkv, Nc, Dpk) are handed to the items as :func:`~tqedge.codec.kernels_fused.key_tiles`), through
    :func:`tqedge.runtime.coop_pool.run_items`: on onnxruntime's pool (``ort_pool``), on the
    cooperative pool, or on this thread (same bits)."""
    hkv, tg, d = qs.shape
    kft = np.empty((hkv, (kf.shape[1] + TK_KEYS - 1) // TK_KEYS, d, TK_KEYS), np.float32)
    kdt = np.empty((hkv, (kd.shape[1] + TK_KEYS - 1) // TK_KEYS, kd.shape[2], TK_KEYS), np.float32)
    for h in range(hkv):
        key_tiles(kf[h], kft[h])
        key_tiles(kd[h], kdt[h])
    block = np.empty(PB_WORDS, np.int64)
    block[PB_QS], block[PB_QP], block[PB_KF], block[PB_VF] = qs.ctypes.data, qp.ctypes.data, kft.ctypes.data, \
        vf.ctypes.data
    block[PB_PF], block[PB_KD], block[PB_VD], block[PB_PC] = pf.ctypes.data, kdt.ctypes.data, vd.ctypes.data, \
        pc.ctypes.data
    block[PB_UM], block[PB_RULE], block[PB_RES] = um.ctypes.data, rule.ctypes.data, res.ctypes.data
    block[PB_HKV], block[PB_T], block[PB_G], block[PB_D] = hkv, tg // g, g, d
    block[PB_DPK], block[PB_DPV], block[PB_NF], block[PB_NC], block[PB_T0] = qp.shape[2], vd.shape[2], \
        kf.shape[1], kd.shape[1], t0
    n = hkv * ((tg // g + TQ_ROWS - 1) // TQ_ROWS)
    coop_run_items(ort_pool, pool, lock, threads, item_fn, block.ctypes.data, n, 2)
    return block[PB_T] + kft.shape[0] + kdt.shape[0]  # reads after the items: nothing they use is freed before


@njit(**_OPTS)
def _prefill(q, k, v, scale, t0, sinks, window, ring, fp_lo, exact, fpk, fpv, kc, vc,
             fp_slots, pf, old_idx, pc, new_c, n_new_read, threads, lock, pool, item_fn, ort_pool, out):
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
              item_fn, ort_pool)
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

"""The prefill branch of the native TurboQuantAttention op (nopython, no GIL), and the encoder
of new tokens.

A prefill step attends ``T`` new tokens over the fp16 sinks/window, the compressed ring (decoded
for the step) and the step's own tokens, under the cache's :class:`~tqedge.runtime.attention.ReadRule`,
in two phases of work items that run on the calling thread or on the cooperative pool
(:mod:`tqedge.runtime.coop_pool`) — the same items either way: first an item per KV head and
keys / values (:func:`prepare_item`: the new tokens' TurboQuant codes by :func:`encode_row`, the
compressed rows the step reads decoded, the keys as transposed tiles), then (KV head, 16-token
query tile) items (:func:`prefill_item`, flash-style tiles of
:func:`~tqedge.codec.kernels_fused.prefill_attend`). Then the new tokens are stored: sinks and
window in fp16, codes of every token past the sinks.
The sliding-window branch (:mod:`tqedge.runtime.native_sliding`) reuses :func:`run_items`.
"""

from __future__ import annotations

import numpy as np
from numba import carray, types

from tqedge.codec.kernels_fused import (TK_KEYS, TQ_ROWS, f16_row_to_f32, f32_row_to_f16, f32_to_f16, key_tiles, matvec,
                                        prefill_attend)
from tqedge.codec.kernels_numba import dequantize_serial
from tqedge.codec.numba_runtime import cfunc, njit
from tqedge.runtime import kv_descriptor as KD
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
def codec(row, hkv, ring, d, keys):
    """The arrays and numbers of one layer's key (``keys``) or value codec from its descriptor
    row (:mod:`tqedge.runtime.kv_descriptor`, ``C_*`` words): codes, scales, segment table,
    codebook, LUT, projected width, projection, rotation, boundaries, centroids, bits, corrected."""
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


# the argument block of one prefill step's work items (int64 words): the attention items' words,
# then the words only the preparing items (phase 0) read
(PB_QS, PB_QP, PB_KF, PB_VF, PB_PF, PB_KD, PB_VD, PB_PC, PB_UM, PB_RULE, PB_RES, PB_HKV, PB_T, PB_G, PB_D,
 PB_DPK, PB_DPV, PB_NF, PB_NC, PB_T0, PB_PHASE, PB_KFLAT, PB_KROW, PB_VROW, PB_RING, PB_OLD, PB_NOLD, PB_ROW0,
 PB_NNEW, PB_KCN, PB_KSN, PB_VCN, PB_VSN) = range(33)
PB_WORDS = 33


@njit(**_OPTS)
def prepare_item(b, w):
    """Phase-0 item ``w`` of a compressed prefill step (argument block ``b``): KV head ``w // 2``,
    its keys (``w`` even) or values. The codes of the step's new tokens (:func:`encode_row`), then
    the compressed rows the step reads — ring rows ``old``, then the first new ones — dequantized:
    values into ``vd``, keys straight into transposed tiles (``kd``), and the head's float keys
    into theirs (``kf``)."""
    hkv, d, nf, nc, ring = b[PB_HKV], b[PB_D], b[PB_NF], b[PB_NC], b[PB_RING]
    n_old, n_new, row0 = b[PB_NOLD], b[PB_NNEW], b[PB_ROW0]
    h, keys = w // 2, w % 2 == 0
    f32 = np.float32
    c = codec(carray(as_ptr(b[PB_KROW] if keys else b[PB_VROW], np.int64), (KD.CODEC_WORDS,)), hkv, ring, d, keys)
    nbytes, npar = c[0].shape[2], c[1].shape[2]
    src = carray(as_ptr(b[PB_KFLAT] if keys else b[PB_VF], f32), (hkv, nf, d))[h]
    cn = carray(as_ptr(b[PB_KCN] if keys else b[PB_VCN], np.uint8), (hkv, n_new, nbytes))[h]
    sn = carray(as_ptr(b[PB_KSN] if keys else b[PB_VSN], np.uint16), (hkv, n_new, npar))[h]
    for j in range(n_new):
        encode_row(src[row0 + j], c[7], c[8], c[9], c[10], c[11], cn[j], sn[j])
    old = carray(as_ptr(b[PB_OLD], np.int64), (n_old,))
    cc = np.empty((1, nc, nbytes), np.uint8)
    ss = np.empty((1, nc, npar), np.uint16)
    for j in range(n_old):
        cc[0, j] = c[0][h, old[j]]
        ss[0, j] = c[1][h, old[j]]
    for j in range(nc - n_old):
        cc[0, n_old + j] = cn[j]
        ss[0, n_old + j] = sn[j]
    deq = dequantize_serial(cc, ss, c[2], c[3], c[4], c[5])[0]  # (Nc, Dp)
    if keys:
        dpk = b[PB_DPK]
        key_tiles(deq, carray(as_ptr(b[PB_KD], f32), (hkv, (nc + TK_KEYS - 1) // TK_KEYS, dpk, TK_KEYS))[h])
        key_tiles(src, carray(as_ptr(b[PB_KF], f32), (hkv, (nf + TK_KEYS - 1) // TK_KEYS, d, TK_KEYS))[h])
    else:
        carray(as_ptr(b[PB_VD], f32), (hkv, nc, b[PB_DPV]))[h, :, :] = deq
    return 0


@njit(**_OPTS)
def prefill_item(block_addr, w):
    """Work item ``w`` of a prefill step (argument block ``PB_*``): :func:`~tqedge.codec.kernels_fused.prefill_attend`
    for KV head ``w // tiles`` and query tile ``w % tiles`` (:data:`TQ_ROWS` tokens); in phase 0,
    :func:`prepare_item`."""
    b = carray(as_ptr(block_addr, np.int64), (PB_WORDS,))
    if b[PB_PHASE] == 0:
        return prepare_item(b, w)
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
def _block(qs, qp, g, kft, vf, pf, kdt, vd, pc, um, t0, rule, res, nf, nc):
    """The attention items' argument block (phase 1) over keys already in transposed tiles."""
    hkv, tg, d = qs.shape
    block = np.zeros(PB_WORDS, np.int64)
    block[PB_QS], block[PB_QP], block[PB_KF], block[PB_VF] = qs.ctypes.data, qp.ctypes.data, kft.ctypes.data, \
        vf.ctypes.data
    block[PB_PF], block[PB_KD], block[PB_VD], block[PB_PC] = pf.ctypes.data, kdt.ctypes.data, vd.ctypes.data, \
        pc.ctypes.data
    block[PB_UM], block[PB_RULE], block[PB_RES] = um.ctypes.data, rule.ctypes.data, res.ctypes.data
    block[PB_HKV], block[PB_T], block[PB_G], block[PB_D] = hkv, tg // g, g, d
    block[PB_DPK], block[PB_DPV], block[PB_NF], block[PB_NC], block[PB_T0] = qp.shape[2], vd.shape[2], nf, nc, t0
    block[PB_PHASE] = 1
    return block


@njit(**_OPTS)
def _tiles(hkv, n, d):
    """Room for ``n`` keys of width ``d`` per KV head as transposed tiles (:func:`~tqedge.codec.kernels_fused.key_tiles`)."""
    return np.empty((hkv, (n + TK_KEYS - 1) // TK_KEYS, d, TK_KEYS), np.float32)


@njit(**_OPTS)
def run_items(qs, qp, g, kf, vf, pf, kd, vd, pc, um, t0, rule, res, threads, lock, pool, item_fn, ort_pool):
    """Every :func:`prefill_item` of a prefill step (arrays C-contiguous; the keys ``kf`` (Hkv,
    Nf, D) and ``kd`` (Hkv, Nc, Dpk) are handed to the items as :func:`~tqedge.codec.kernels_fused.key_tiles`), through
    :func:`tqedge.runtime.coop_pool.run_items`: on onnxruntime's pool (``ort_pool``), on the
    cooperative pool, or on this thread (same bits)."""
    hkv, tg, d = qs.shape
    kft, kdt = _tiles(hkv, kf.shape[1], d), _tiles(hkv, kd.shape[1], kd.shape[2])
    for h in range(hkv):
        key_tiles(kf[h], kft[h])
        key_tiles(kd[h], kdt[h])
    block = _block(qs, qp, g, kft, vf, pf, kdt, vd, pc, um, t0, rule, res, kf.shape[1], kd.shape[1])
    n = hkv * ((tg // g + TQ_ROWS - 1) // TQ_ROWS)
    coop_run_items(ort_pool, pool, lock, threads, item_fn, block.ctypes.data, n, 2)
    return block[PB_T] + kft.shape[0] + kdt.shape[0]  # reads after the items: nothing they use is freed before


@njit(**_OPTS)
def _prefill(q, k, v, scale, t0, sinks, window, ring, fp_lo, exact, fpk, fpv, krow, vrow, fp_slots, pf, old_idx,
             pc, new_c, n_new_read, threads, lock, pool, item_fn, ort_pool, out):
    t, hq, d = q.shape
    hkv, nfs, _ = fpk.shape
    g = hq // hkv
    nfo = fp_slots.shape[0]
    nf = nfo + t
    n_new = new_c.shape[0]
    n_sink_new = t - n_new
    kc = codec(krow, hkv, ring, d, True)
    vc = codec(vrow, hkv, ring, d, False)
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
    kcn = np.empty((hkv, n_new, kc[0].shape[2]), np.uint8)
    ksn = np.empty((hkv, n_new, kc[1].shape[2]), np.uint16)
    vcn = np.empty((hkv, n_new, vc[0].shape[2]), np.uint8)
    vsn = np.empty((hkv, n_new, vc[1].shape[2]), np.uint16)
    dpk, nc = kc[5], old_idx.shape[0] + n_new_read
    pq, um = kc[6], np.ascontiguousarray(vc[6])
    rule = np.array([sinks, window, ring, fp_lo, 1 if exact else 0], np.int64)
    qs = np.empty((hkv, t * g, d), np.float32)
    qp = np.empty((hkv, t * g, dpk), np.float32)
    res = np.empty((hkv, t * g, d), np.float32)
    kft, kdt, vd = _tiles(hkv, nf, d), _tiles(hkv, nc, dpk), np.empty((hkv, nc, vc[5]), np.float32)
    block = _block(qs, qp, g, kft, vf, pf, kdt, vd, pc, um, t0, rule, res, nf, nc)
    # phase 0, an item per KV head and keys / values: new codes, the compressed rows read, key tiles
    block[PB_PHASE], block[PB_KFLAT], block[PB_KROW], block[PB_VROW] = 0, kf.ctypes.data, krow.ctypes.data, \
        vrow.ctypes.data
    block[PB_RING], block[PB_OLD], block[PB_NOLD], block[PB_ROW0], block[PB_NNEW] = ring, old_idx.ctypes.data, \
        old_idx.shape[0], nfo + n_sink_new, n_new
    block[PB_KCN], block[PB_KSN], block[PB_VCN], block[PB_VSN] = kcn.ctypes.data, ksn.ctypes.data, \
        vcn.ctypes.data, vsn.ctypes.data
    coop_run_items(ort_pool, pool, lock, threads, item_fn, block.ctypes.data, 2 * hkv, 2)
    for h in range(hkv):  # the scaled queries, and projected for the compressed keys
        for i in range(t):
            for gg in range(g):
                r = i * g + gg
                for x in range(d):
                    qs[h, r, x] = q[i, h * g + gg, x] * scale
                matvec(qs[h, r], pq, qp[h, r])
    block[PB_PHASE] = 1
    coop_run_items(ort_pool, pool, lock, threads, item_fn, block.ctypes.data, hkv * ((t + TQ_ROWS - 1) // TQ_ROWS), 2)
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
    # reads after the items: nothing they use is freed before
    return kf.shape[0] + vf.shape[0] + kft.shape[0] + kdt.shape[0] + vd.shape[0] + qs.shape[0] + qp.shape[0] + \
        um.shape[0] + rule.shape[0] + block.shape[0]

"""The KV cache descriptor: how ``model.onnx``'s TurboQuantAttention nodes find the cache.

Every ``Run`` of the uncut graph takes one int64 vector ``kv_desc`` (graph input
:data:`tqedge.bundle.KV_DESC`), built ONCE per step by the cache (``cache.descriptor()``, after
``cache.prepare(T)``) and read by every attention node: buffer addresses, ring geometry and the
step's read plan. The op keeps no state of its own, so one session serves any number of caches
(chats, models) — the caller passes the one to use on each call. Layout version
:data:`tqedge.bundle.DESCRIPTOR_VERSION` (word offsets below; docs/ARCHITECTURE.md):

    header   0 version  1 kind (1 exact, 2 turboquant)  2 T  3 layers  4 Hkv  5 D  6 t0  7 -
    exact    8 capacity C  9 keys* (L,Hkv,C,D) f32  10 values*  11 n_old (visible slot prefix,
             -1: mask)  12 mask* (C,) u8  13 new_slots* (T,) i64
    turboquant  8 sinks S  9 window W  10 ring R  11 fp_lo  12 exact_prefill  13 fp_k* (L,Hkv,S+W,D) f16
             14 fp_v*  15 layer table* (L, LAYER_WORDS) i64  16 LAYER_WORDS  17 mode (1 decode, 2 prefill)
      decode   18 fp_bias* (S+W,) f32  19 ranges n (≤ 2)  20..23 ring index ranges [a0, b0), [a1, b1)
      prefill  24 fp_slots* 25 n   26 pf* 27 n   28 old_idx* 29 n   30 pc* 31 n   32 new_c* 33 n
               34 n_new_read   (the arrays of CompressedKVCache._plan_prefill, int64)
    layer table row: a key block then a value block of CODEC_WORDS words each (codes*, scales*,
    code bytes B, scales P, projected dim Dp, segment table*, segments, codebook*, n, byte LUT*, n,
    rotation^T* (D,D) f32, boundaries* f64, n, centroids* f64, bits, corrected norm, encodable,
    projection* (keys: project_query (D,Dp); values: unproject (Dp,D)) f32)

Addresses (``*``) point into arrays owned by the cache; the arrays a step's plan adds are kept on
the cache until its next ``prepare``. The op checks every count against its tensors' shapes before
touching memory. A batch of sequences will carry one such row per sequence (a (B, n) tensor).
"""

from __future__ import annotations

import numpy as np

from tqedge.bundle import DESCRIPTOR_VERSION
from tqedge.errors import TqedgeError

VERSION, KIND, T, LAYERS, HKV, DIM, T0 = range(7)
HEADER = 8
KIND_EXACT, KIND_TURBOQUANT = 1, 2
X_CAP, X_KEYS, X_VALUES, X_N_OLD, X_MASK, X_NEW_SLOTS = range(8, 14)
EXACT_WORDS = 14


def header(out: np.ndarray, kind: int, t: int, layers: int, hkv: int, d: int, t0: int) -> None:
    out[VERSION], out[KIND], out[T], out[LAYERS], out[HKV], out[DIM], out[T0] = (
        DESCRIPTOR_VERSION, kind, t, layers, hkv, d, t0)


def exact(cache) -> np.ndarray:
    """Descriptor of an :class:`~tqedge.runtime.cache.ExactKVCache` for the prepared step."""
    s = cache.slots
    if s.new_slots is None:
        raise TqedgeError("cache.descriptor() called outside prepare()/commit()")
    if cache.dtype != np.float32:
        raise TqedgeError(f"the native backend needs a float32 exact cache, not {cache.dtype}")
    new = np.ascontiguousarray(s.new_slots, dtype=np.int64)
    d = np.zeros(EXACT_WORDS, np.int64)
    header(d, KIND_EXACT, len(new), cache.num_layers, cache.num_kv_heads, cache.head_dim, s.offset)
    d[X_CAP] = s.capacity
    d[X_KEYS], d[X_VALUES], d[X_NEW_SLOTS] = cache.keys.ctypes.data, cache.values.ctypes.data, new.ctypes.data
    if isinstance(s.old_valid, (int, np.integer)):
        d[X_N_OLD], mask = int(s.old_valid), None
    else:
        mask = np.ascontiguousarray(s.old_valid, dtype=np.uint8)
        d[X_N_OLD], d[X_MASK] = -1, mask.ctypes.data
    cache._native_keep = (d, new, mask)  # alive until the next step
    return d


TQ_S, TQ_W, TQ_R, TQ_FP_LO, TQ_EXACT_PREFILL, TQ_FP_K, TQ_FP_V, TQ_LAYERS, TQ_LW, TQ_MODE = range(8, 18)
MODE_DECODE, MODE_PREFILL = 1, 2
TQ_BIAS, TQ_NR, TQ_RANGES = 18, 19, 20
TQ_FP_SLOTS, TQ_PF, TQ_OLD_IDX, TQ_PC, TQ_NEW_C, TQ_N_NEW_READ = 24, 26, 28, 30, 32, 34
TQ_WORDS = 35
(C_CODES, C_SCALES, C_B, C_P, C_DP, C_TABLE, C_NSEG, C_CB, C_NCB, C_LUT, C_NLUT, C_ROT, C_BOUNDS, C_NB,
 C_CENT, C_BITS, C_CORR, C_OK, C_PROJ) = range(19)
CODEC_WORDS = 20
LAYER_WORDS = 2 * CODEC_WORDS


def _codec_words(row: np.ndarray, tq, codes: np.ndarray, scales: np.ndarray, keys: bool, keep: list) -> None:
    t = tq.segments
    d = tq.dim
    part = tq.parts[0]
    ok = len(tq.parts) == 1 and part.qjl_seg is None and part.mse_seg is not None and tq._identity
    eye = np.eye(d, dtype=np.float32)
    proj = tq.project_query(eye) if keys else tq.unproject(np.eye(tq.projected_dim, dtype=np.float32))
    arrays = [np.ascontiguousarray(a) for a in (
        t.table.astype(np.int64), t.cb.astype(np.float32), t.lut.astype(np.float32),
        part.rotation.matrix32.T, part.codebook.boundaries.astype(np.float64) if ok else np.zeros(1),
        part.codebook.centroids.astype(np.float64) if ok else np.zeros(1), proj.astype(np.float32))]
    keep += arrays
    table, cb, lut, rot, bounds, cent, proj = arrays
    row[C_CODES], row[C_SCALES] = codes.ctypes.data, scales.ctypes.data
    row[C_B], row[C_P], row[C_DP] = tq.code_bytes, tq.num_scales, tq.projected_dim
    row[C_TABLE], row[C_NSEG], row[C_CB], row[C_NCB] = table.ctypes.data, len(table), cb.ctypes.data, cb.size
    row[C_LUT], row[C_NLUT], row[C_ROT] = lut.ctypes.data, lut.size, rot.ctypes.data
    row[C_BOUNDS], row[C_NB], row[C_CENT] = bounds.ctypes.data, bounds.size, cent.ctypes.data
    row[C_BITS] = part.mse_seg.bits if ok else 0
    row[C_CORR], row[C_OK], row[C_PROJ] = int(tq.config.norm == "corrected"), int(ok), proj.ctypes.data


def layer_table(cache) -> tuple[np.ndarray, list]:
    """The static per-layer table of a CompressedKVCache (its buffers and codec tables) and the
    arrays it points into (the caller keeps both as long as the cache lives)."""
    table = np.zeros((cache.num_layers, LAYER_WORDS), np.int64)
    keep: list = []
    for l_ in range(cache.num_layers):
        _codec_words(table[l_, :CODEC_WORDS], cache.tq_k[l_], cache.k_codes[l_], cache.k_scales[l_], True, keep)
        _codec_words(table[l_, CODEC_WORDS:], cache.tq_v[l_], cache.v_codes[l_], cache.v_scales[l_], False, keep)
    if not table[:, C_OK].all() or not table[:, CODEC_WORDS + C_OK].all():
        raise TqedgeError("the native backend encodes integer-bit TurboQuant without QJL only "
                          "(this cache has fractional bits or QJL keys); use --backend onnx")
    return table, keep


def turboquant(cache) -> np.ndarray:
    """Descriptor of a :class:`~tqedge.runtime.compressed_cache.CompressedKVCache` for the prepared step."""
    plan = cache._plan
    if plan is None:
        raise TqedgeError("cache.descriptor() called outside prepare()/commit()")
    if getattr(cache, "_native_layers", None) is None:
        cache._native_layers = layer_table(cache)
    rule, s = cache._rule, cache.slots
    d = np.zeros(TQ_WORDS, np.int64)
    keep: list = [d]
    t = 1 if plan[0] == "decode" else len(plan[3])
    header(d, KIND_TURBOQUANT, t, cache.num_layers, cache.num_kv_heads, cache.head_dim, s.offset)
    d[TQ_S], d[TQ_W], d[TQ_R], d[TQ_FP_LO] = cache.sinks, cache.window, cache.ring, rule.fp_lo
    d[TQ_EXACT_PREFILL] = int(rule.exact_prefill)
    d[TQ_FP_K], d[TQ_FP_V] = cache.fp_k.ctypes.data, cache.fp_v.ctypes.data
    d[TQ_LAYERS], d[TQ_LW] = cache._native_layers[0].ctypes.data, LAYER_WORDS
    if plan[0] == "decode":
        bias = np.ascontiguousarray(cache._fp_bias, dtype=np.float32)
        keep.append(bias)
        d[TQ_MODE], d[TQ_BIAS], d[TQ_NR] = MODE_DECODE, bias.ctypes.data, len(plan[1])
        for i, (a, b) in enumerate(plan[1]):
            d[TQ_RANGES + 2 * i], d[TQ_RANGES + 2 * i + 1] = a, b
    else:
        _, fp_slots, pf, _pos, old_idx, pc, new_c, n_new_read = plan
        d[TQ_MODE], d[TQ_N_NEW_READ] = MODE_PREFILL, n_new_read
        for word, arr in ((TQ_FP_SLOTS, fp_slots), (TQ_PF, pf), (TQ_OLD_IDX, old_idx), (TQ_PC, pc), (TQ_NEW_C, new_c)):
            a = np.ascontiguousarray(arr, dtype=np.int64)
            keep.append(a)
            d[word], d[word + 1] = a.ctypes.data, len(a)
    cache._native_keep = keep  # alive until the next step
    return d

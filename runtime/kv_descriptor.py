"""The KV cache descriptor: how ``model.onnx``'s TurboQuantAttention nodes find the cache.

Every ``Run`` of the uncut graph takes one int64 vector ``kv_desc`` (graph input
:data:`tqedge.bundle.KV_DESC`), built ONCE per step by the cache (``cache.descriptor()``, after
``cache.prepare(T)``) and read by every attention node: buffer addresses, ring geometry and the
step's read plan. The op keeps no state of its own, so one session serves any number of caches
(chats, models) — the caller passes the one to use on each call. Layout version
:data:`tqedge.bundle.DESCRIPTOR_VERSION` (word offsets below; docs/ARCHITECTURE.md):

    header   0 version  1 kind (1 exact, 2 turboquant, 3 layered, 4 batch)  2 T  3 layers  4 Hkv  5 D  6 t0
             7 threads
    exact    8 capacity C  9 keys* (L,Hkv,C,D) f32  10 values*  11 n_old (visible slot prefix,
             -1: mask)  12 mask* (C,) u8  13 new_slots* (T,) i64
    turboquant  8 sinks S  9 window W  10 ring R  11 fp_lo  12 exact_prefill  13 fp_k* (L,Hkv,S+W,D) f16
             14 fp_v*  15 layer table* (L, LAYER_WORDS) i64  16 LAYER_WORDS  17 mode (1 decode, 2 prefill)
      decode   18 fp_bias* (S+W,) f32  19 ranges n (≤ 2)  20..23 ring index ranges [a0, b0), [a1, b1)
      prefill  24 fp_slots* 25 n   26 pf* 27 n   28 old_idx* 29 n   30 pc* 31 n   32 new_c* 33 n
               34 n_new_read   (the arrays of CompressedKVCache._plan_prefill, int64)
             35 launch lock* (tqedge.codec.numba_runtime.LOCK_ADDRESS)  36 prefill work item entry*
                (a C function: native_prefill.prefill_item)  37 cooperative pool* (the control
                block of runtime/coop_pool.py; 0: one thread)  38 decode work item entry* (a C
                function: native_turboquant.decode_item)  39 decode: the position leaving the window
                whose codes this step writes from its fp16 copy first (t0 - W), or -1
    layered  (a model with sliding-window layers: runtime/sliding_cache.py's LayeredKVCache)
             8 window W  9 ring keys* (Ls, Hkv, W, D)  10 ring values*  11 ring element bytes (4: f32,
             2: f16)  12 sliding layers Ls  13 offset O of the full layers' descriptor  14 launch lock*
             15 prefill work item entry*  16 cooperative pool*  17..17+L route of layer i: its index among the full layers
             (≥ 0) or -1 - its index among the sliding layers (position p in ring slot p % W; a query
             at t reads p with 0 ≤ t - p < W, no sinks, nothing compressed)
             O..  the full layers' own descriptor (exact or turboquant above, its own header,
             ``layers`` = full layers)
    layer table row: a key block then a value block of CODEC_WORDS words each (codes*, scales*,
    code bytes B, scales P, projected dim Dp, segment table*, segments, codebook*, n, byte LUT*, n,
    rotation^T* (D,D) f32, boundaries* f64, n, centroids* f64, bits, corrected norm, encodable,
    projection* (keys: project_query (D,Dp); values: unproject (Dp,D)) f32)

Addresses (``*``) point into arrays owned by the cache; the arrays a step's plan adds are kept on
the cache until its next ``prepare``. The op checks every count against its tensors' shapes before
touching memory.

    batch    (several sequences in one step: runtime/batch.py's row-concatenation protocol)
             8 parts n  9.. per part 4 words: its rows [a, b) of the step, the word offset and the
             length of its own cache's descriptor (any kind but batch), which follow the part table
"""

from __future__ import annotations

import numpy as np

from tqedge.bundle import DESCRIPTOR_VERSION
from tqedge.errors import TqedgeError

VERSION, KIND, T, LAYERS, HKV, DIM, T0, THREADS = range(8)
HEADER = 8
KIND_EXACT, KIND_TURBOQUANT, KIND_LAYERED, KIND_BATCH = 1, 2, 3, 4
X_CAP, X_KEYS, X_VALUES, X_N_OLD, X_MASK, X_NEW_SLOTS = range(8, 14)
EXACT_WORDS = 14


def header(out: np.ndarray, kind: int, t: int, layers: int, hkv: int, d: int, t0: int) -> None:
    out[VERSION], out[KIND], out[T], out[LAYERS], out[HKV], out[DIM], out[T0] = (
        DESCRIPTOR_VERSION, kind, t, layers, hkv, d, t0)


def _addr(a: np.ndarray) -> int:
    return a.__array_interface__["data"][0]


_I64 = np.dtype(np.int64)

# The builders below run once per step: they fill a descriptor preallocated per cache
# (``cache._native_desc``) with item assignments and attribute reads only, so a decode step
# costs a handful of Python-level calls.


def exact(cache) -> np.ndarray:
    """Descriptor of an :class:`~tqedge.runtime.cache.ExactKVCache` for the prepared step."""
    s = cache.slots
    new = s.new_slots
    if new is None:
        raise TqedgeError("cache.descriptor() called outside prepare()/commit()")
    d = cache._native_desc
    if d is None:
        if cache.dtype != np.float32:
            raise TqedgeError(f"the native backend needs a float32 exact cache, not {cache.dtype}")
        d = cache._native_desc = np.zeros(EXACT_WORDS, np.int64)
        header(d, KIND_EXACT, 0, cache.num_layers, cache.num_kv_heads, cache.head_dim, 0)
        d[X_CAP], d[X_KEYS], d[X_VALUES] = s.capacity, _addr(cache.keys), _addr(cache.values)
    if new.dtype != _I64 or not new.flags.c_contiguous:
        new = s.new_slots = np.ascontiguousarray(new, dtype=np.int64)
    d[T], d[T0], d[X_NEW_SLOTS] = new.shape[0], s.offset, new.__array_interface__["data"][0]
    valid = s.old_valid  # a visible-slot count, or a bool mask (C,) the kernel reads as bytes
    if valid.__class__ is np.ndarray:
        d[X_N_OLD], d[X_MASK] = -1, valid.__array_interface__["data"][0]
    else:
        d[X_N_OLD], d[X_MASK] = valid, 0
    return d


TQ_S, TQ_W, TQ_R, TQ_FP_LO, TQ_EXACT_PREFILL, TQ_FP_K, TQ_FP_V, TQ_LAYERS, TQ_LW, TQ_MODE = range(8, 18)
MODE_DECODE, MODE_PREFILL = 1, 2
TQ_BIAS, TQ_NR, TQ_RANGES = 18, 19, 20
TQ_FP_SLOTS, TQ_PF, TQ_OLD_IDX, TQ_PC, TQ_NEW_C, TQ_N_NEW_READ = 24, 26, 28, 30, 32, 34
TQ_LOCK, TQ_PAR_PREFILL, TQ_POOL, TQ_DECODE_ITEM, TQ_ENCODE_OLD = 35, 36, 37, 38, 39
TQ_WORDS = 40
(C_CODES, C_SCALES, C_B, C_P, C_DP, C_TABLE, C_NSEG, C_CB, C_NCB, C_LUT, C_NLUT, C_ROT, C_BOUNDS, C_NB,
 C_CENT, C_BITS, C_CORR, C_OK, C_PROJ) = range(19)
CODEC_WORDS = 20
LAYER_WORDS = 2 * CODEC_WORDS


def supports(manifest, kv_bits=None, qjl=None) -> bool:
    """Whether the native op runs the caches these options make (checked on the codec configs:
    nothing built): the exact cache, and TurboQuant with whole bits and no QJL in every layer."""
    from tqedge.runtime.cache import codec_configs
    from tqedge.runtime.kv_spec import parse_kv_spec

    bits, layer_bits = (None, None) if kv_bits is None else parse_kv_spec(kv_bits)
    if kv_bits is not None and bits is None:
        return True  # the exact cache
    a = manifest.architecture
    keys, values = codec_configs(manifest.kv, a.num_layers, a.head_dim, bits, qjl=qjl, layer_bits=layer_bits)
    return all(float(c.bits).is_integer() and not c.qjl for c in (*keys, *values))


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


def _item_entries() -> tuple[int, int]:
    """(prefill item entry, decode item entry): the cfuncs every item of the op runs through,
    on the cooperative pool or on the calling thread (:func:`tqedge.runtime.coop_pool.run_items`)."""
    from tqedge.runtime.native_prefill import PREFILL_ITEM_ENTRY
    from tqedge.runtime.native_turboquant import DECODE_ITEM_ENTRY

    return PREFILL_ITEM_ENTRY, DECODE_ITEM_ENTRY


def _pool(threads: int) -> int:
    """The cooperative pool with ``threads - 1`` workers (its control block's address)."""
    from tqedge.runtime import coop_pool

    return coop_pool.pool(threads).address


def turboquant(cache) -> np.ndarray:
    """Descriptor of a :class:`~tqedge.runtime.compressed_cache.CompressedKVCache` for the prepared step."""
    plan = cache._plan
    if plan is None:
        raise TqedgeError("cache.descriptor() called outside prepare()/commit()")
    d = cache._native_desc
    if d is None:
        table, keep = layer_table(cache)
        d = np.zeros(TQ_WORDS, np.int64)
        header(d, KIND_TURBOQUANT, 0, cache.num_layers, cache.num_kv_heads, cache.head_dim, 0)
        d[TQ_S], d[TQ_W], d[TQ_R] = cache.sinks, cache.window, cache.ring
        d[TQ_FP_K], d[TQ_FP_V] = _addr(cache.fp_k), _addr(cache.fp_v)
        d[TQ_LAYERS], d[TQ_LW] = _addr(table), LAYER_WORDS
        d[TQ_PAR_PREFILL], d[TQ_DECODE_ITEM] = _item_entries()
        from tqedge.codec import numba_runtime  # the native op needs Numba anyway

        d[TQ_LOCK] = numba_runtime.LOCK_ADDRESS
        cache._native_threads, cache._native_pool_threads = numba_runtime.sync_pool_threads, 0
        cache._native_static, cache._native_desc = (table, keep), d
        cache._native_bias = np.zeros(cache.sinks + cache.window, np.float32)  # the decode fast path's
    rule = cache._rule
    d[T0], d[TQ_FP_LO], d[TQ_EXACT_PREFILL] = cache.slots.offset, rule.fp_lo, rule.exact_prefill
    d[THREADS] = cache._native_threads()  # the calling thread's (Model.forward sets it)
    if d[THREADS] > 1 and cache._native_pool_threads != d[THREADS]:
        d[TQ_POOL] = _pool(int(d[THREADS]))
        cache._native_pool_threads = d[THREADS]
    if plan[0] == "decode":
        ranges = plan[1]
        d[T], d[TQ_MODE], d[TQ_NR], d[TQ_ENCODE_OLD] = 1, MODE_DECODE, len(ranges), -1
        d[TQ_BIAS] = cache._fp_bias.__array_interface__["data"][0]
        if ranges:
            d[TQ_RANGES], d[TQ_RANGES + 1] = ranges[0]
        if len(ranges) > 1:
            d[TQ_RANGES + 2], d[TQ_RANGES + 3] = ranges[1]
        return d
    _, fp_slots, pf, pos, old_idx, pc, new_c, n_new_read = plan
    d[T], d[TQ_MODE], d[TQ_N_NEW_READ] = len(pos), MODE_PREFILL, n_new_read
    keep = []
    for word, arr in ((TQ_FP_SLOTS, fp_slots), (TQ_PF, pf), (TQ_OLD_IDX, old_idx), (TQ_PC, pc), (TQ_NEW_C, new_c)):
        a = np.ascontiguousarray(arr, dtype=np.int64)
        keep.append(a)
        d[word], d[word + 1] = _addr(a), len(a)
    cache._native_keep = keep  # alive until the next step
    return d


LY_W, LY_KEYS, LY_VALUES, LY_ESIZE, LY_NS, LY_SUB, LY_LOCK, LY_PAR_PREFILL, LY_POOL = range(8, 17)
LY_ROUTE = 17


def layered(cache) -> np.ndarray:
    """Descriptor of a :class:`~tqedge.runtime.sliding_cache.LayeredKVCache` for the prepared step:
    the sliding rings and the layer routes, then the full layers' descriptor copied in."""
    sub = cache.full.descriptor()
    d = cache._native_desc
    if d is None:
        rings = cache.rings
        if rings.dtype not in (np.float32, np.float16):
            raise TqedgeError(f"the native backend needs float32 or float16 window rings, not {rings.dtype}")
        n = len(cache.windows)
        d = np.zeros(LY_ROUTE + n + len(sub), np.int64)
        header(d, KIND_LAYERED, 0, n, sub[HKV], sub[DIM], 0)
        d[LY_W], d[LY_KEYS], d[LY_VALUES] = rings.window, _addr(rings.keys), _addr(rings.values)
        d[LY_ESIZE], d[LY_NS], d[LY_SUB] = rings.dtype.itemsize, rings.keys.shape[0], LY_ROUTE + n
        d[LY_ROUTE:LY_ROUTE + n] = [j if part is cache.full else -1 - j for part, j in cache._route]
        d[LY_PAR_PREFILL] = _item_entries()[0]
        from tqedge.codec import numba_runtime  # the native op needs Numba anyway

        d[LY_LOCK] = numba_runtime.LOCK_ADDRESS
        cache._native_threads, cache._native_desc = numba_runtime.sync_pool_threads, d
        cache._native_pool_threads = 0
    d[T], d[T0] = sub[T], sub[T0]
    d[THREADS] = cache._native_threads()  # the calling thread's (Model.forward sets it)
    if d[THREADS] > 1 and cache._native_pool_threads != d[THREADS]:
        d[LY_POOL] = _pool(int(d[THREADS]))
        cache._native_pool_threads = d[THREADS]
    d[d[LY_SUB]:] = sub
    return d


B_N, B_PARTS, B_PART_WORDS = 8, 9, 4


def batch(parts) -> np.ndarray:
    """Descriptor of a batched step: ``parts`` is ``(row_start, row_end, descriptor)`` per sequence
    (contiguous row ranges covering the step, each descriptor built by its own cache)."""
    if len(parts) == 1:
        return parts[0][2]
    n = len(parts)
    off = B_PARTS + B_PART_WORDS * n
    d = np.empty(off + sum(len(p[2]) for p in parts), np.int64)
    first = parts[0][2]
    header(d, KIND_BATCH, parts[-1][1], int(first[LAYERS]), int(first[HKV]), int(first[DIM]), 0)
    d[THREADS], d[B_N] = first[THREADS], n
    for i, (a, b, sub) in enumerate(parts):
        w = B_PARTS + B_PART_WORDS * i
        d[w], d[w + 1], d[w + 2], d[w + 3] = a, b, off, len(sub)
        d[off:off + len(sub)] = sub
        off += len(sub)
    return d

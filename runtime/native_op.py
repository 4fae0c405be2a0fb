"""The TurboQuantAttention op of ``model.onnx`` as a Numba cfunc (``KernelComputeV2``).

Inputs ``q (T, Hq, D)``, ``k``/``v (T, Hkv, D)`` float32 and the cache descriptor ``kv_desc``
int64 (:mod:`tqedge.runtime.kv_descriptor`; a batch descriptor hands each row range its own
cache's descriptor); output ``out (T, Hq, D)`` float32. The op validates
the descriptor against the tensors' shapes, then hands the cache's buffers (by address) to the
fused kernels (:mod:`tqedge.codec.kernels_fused`), which store the new keys/values and attend
under the same read rule as ``runtime/attention.py``. Errors come back as an ``OrtStatus*``
naming the problem (messages :data:`MESSAGES`); nothing raises across the C boundary.

:func:`make_op` builds the :class:`~tqedge.runtime.ort_numba.CustomOp` a backend owns; its
payload holds the per-layer softmax scales (float64, one per ``layer`` attribute value).
"""

from __future__ import annotations

import numpy as np
from numba import carray, types

from tqedge.bundle import ATTENTION_OP
from tqedge.codec.kernels_fused import exact_attend
from tqedge.codec.numba_runtime import cfunc, njit
from tqedge.runtime import kv_descriptor as KD
from tqedge.runtime import native_sliding as NS
from tqedge.runtime import native_turboquant as NT
from tqedge.runtime.ort_capi import FLOAT, INT64
from tqedge.runtime.ort_numba import (PAR_WORDS, PAYLOAD, CustomOp, as_ptr, fail, kernel_ext, parallel_record,
                                      tensor_in, tensor_out)

OP_NAME = ATTENTION_OP
MESSAGES = [
    "TurboQuantAttention: q, k, v must be 3-D (T, heads, head_dim)",  # 1
    "TurboQuantAttention: k and v shapes disagree with q",  # 2
    "TurboQuantAttention: kv_desc must be a 1-D int64 vector of a known layout version",  # 3
    "TurboQuantAttention: kv_desc does not match the tensors (T, KV heads, head_dim or layers)",  # 4
    "TurboQuantAttention: exact-cache descriptor out of range (capacity, visible slots or new slots)",  # 5
    "TurboQuantAttention: unknown cache kind in kv_desc",  # 6
    "TurboQuantAttention: turboquant descriptor out of range (ring, window or plan)",  # 7
    "TurboQuantAttention: this cache configuration is not supported by the native op",  # 8
    "TurboQuantAttention: layered descriptor out of range (layer route, window ring or full layers)",  # 9
    "TurboQuantAttention: batch descriptor out of range (row ranges or per-sequence descriptors)",  # 10
]
BAD_RANK, BAD_KV, BAD_DESC, DESC_SHAPE, BAD_EXACT, BAD_KIND, BAD_TQ, UNSUPPORTED, BAD_LAYERED, BAD_BATCH = range(1, 11)


@njit(warm=False, nogil=True)
def _attend(desc, nd, da, layer, q, k, v, scale, out, ort_pool):
    """One cache's rows (``desc`` at address ``da``, ``nd`` words): 0, or the message number.
    ``ort_pool``: the call's parallel-for record, or 0 (:func:`tqedge.runtime.coop_pool.run_items`)."""
    t, hkv, d = q.shape[0], k.shape[1], q.shape[2]
    nl = desc[KD.LAYERS]
    kind = desc[KD.KIND]
    if kind == KD.KIND_LAYERED:  # sliding layers here; a full layer reads the embedded descriptor
        if nd < KD.LY_ROUTE + nl:
            return BAD_LAYERED
        route = desc[KD.LY_ROUTE + layer]
        if route < 0:
            if NS.compute(desc, nd, -1 - route, q, k, v, scale, out, ort_pool) != 0:
                return BAD_LAYERED
            return 0
        off = desc[KD.LY_SUB]
        if off < KD.LY_ROUTE + nl or off + KD.HEADER > nd:
            return BAD_LAYERED
        t0 = desc[KD.T0]
        desc = carray(as_ptr(da + 8 * off, np.int64), (nd - off,))
        nd -= off
        layer = route
        nl = desc[KD.LAYERS]
        kind = desc[KD.KIND]
        if desc[KD.VERSION] != 1 or desc[KD.T] != t or desc[KD.HKV] != hkv or desc[KD.DIM] != d \
                or desc[KD.T0] != t0 or layer >= nl or kind == KD.KIND_LAYERED:
            return BAD_LAYERED
    if kind == KD.KIND_EXACT:
        if nd < KD.EXACT_WORDS:
            return BAD_DESC
        c = desc[KD.X_CAP]
        n_old = desc[KD.X_N_OLD]
        if c <= 0 or n_old < -1 or n_old > c or (n_old == -1 and desc[KD.X_MASK] == 0) \
                or desc[KD.X_KEYS] == 0 or desc[KD.X_VALUES] == 0 or desc[KD.X_NEW_SLOTS] == 0:
            return BAD_EXACT
        new = carray(as_ptr(desc[KD.X_NEW_SLOTS], np.int64), (t,))
        for i in range(t):
            if new[i] < 0 or new[i] >= c:
                return BAD_EXACT
        keys = carray(as_ptr(desc[KD.X_KEYS], np.float32), (nl, hkv, c, d))
        values = carray(as_ptr(desc[KD.X_VALUES], np.float32), (nl, hkv, c, d))
        mask = carray(as_ptr(desc[KD.X_MASK] if n_old == -1 else desc[KD.X_NEW_SLOTS], np.uint8),
                      (c if n_old == -1 else 1,))
        exact_attend(q, k, v, keys[layer], values[layer], n_old, mask, new, scale, out)
        return 0
    if kind == KD.KIND_TURBOQUANT:
        err = NT.compute(desc, nd, layer, q, k, v, scale, out, ort_pool)
        if err != 0:
            return BAD_TQ if err == 1 else UNSUPPORTED
        return 0
    return BAD_KIND


@cfunc(types.intp(types.intp, types.intp), nogil=True)
def attention_compute(kernel, ctx):
    """``KernelComputeV2(kernel, context) -> OrtStatus*`` of TurboQuantAttention."""
    ext, layer, table = kernel_ext(kernel)
    dims = np.zeros(4, np.int64)
    qa, qn, st = tensor_in(table, ctx, 0, dims)
    if st != 0:
        return st
    if qn != 3:
        return fail(ext, table, BAD_RANK)
    t, hq, d = dims[0], dims[1], dims[2]
    ka, kn, st = tensor_in(table, ctx, 1, dims)
    if st != 0:
        return st
    hkv = dims[1]
    if kn != 3 or dims[0] != t or dims[2] != d or hkv <= 0 or hq % hkv != 0:
        return fail(ext, table, BAD_KV)
    va, vn, st = tensor_in(table, ctx, 2, dims)
    if st != 0:
        return st
    if vn != 3 or dims[0] != t or dims[1] != hkv or dims[2] != d:
        return fail(ext, table, BAD_KV)
    da, dn, st = tensor_in(table, ctx, 3, dims)
    if st != 0:
        return st
    nd = dims[0]
    if dn != 1 or nd < KD.HEADER:
        return fail(ext, table, BAD_DESC)
    desc = carray(as_ptr(da, np.int64), (nd,))
    if desc[KD.VERSION] != 1:
        return fail(ext, table, BAD_DESC)
    nl = desc[KD.LAYERS]
    if desc[KD.T] != t or desc[KD.HKV] != hkv or desc[KD.DIM] != d or layer >= nl or t <= 0:
        return fail(ext, table, DESC_SHAPE)
    dims[0], dims[1], dims[2] = t, hq, d
    oa, st = tensor_out(table, ctx, 0, dims, 3)
    if st != 0:
        return st
    q = carray(as_ptr(qa, np.float32), (t, hq, d))
    k = carray(as_ptr(ka, np.float32), (t, hkv, d))
    v = carray(as_ptr(va, np.float32), (t, hkv, d))
    out = carray(as_ptr(oa, np.float32), (t, hq, d))
    scale = np.float32(carray(as_ptr(ext[PAYLOAD], np.float64), (layer + 1,))[layer])
    rec = np.zeros(PAR_WORDS, np.int64)
    ort_pool = parallel_record(ext, table, ctx, rec)
    if desc[KD.KIND] != KD.KIND_BATCH:
        err = _attend(desc, nd, da, layer, q, k, v, scale, out, ort_pool)
        return fail(ext, table, err) if err != 0 else rec[0] * 0  # read after the items: ``rec`` lives until then
    # a batch: row ranges [a, b) of the step, each with its own cache's descriptor (no nesting)
    n = desc[KD.B_N]
    if n < 1 or nd < KD.B_PARTS + KD.B_PART_WORDS * n:
        return fail(ext, table, BAD_BATCH)
    end = 0
    for i in range(n):  # the whole table first: a bad part fails the step before any cache is written
        w = KD.B_PARTS + KD.B_PART_WORDS * i
        a, b, off, ln = desc[w], desc[w + 1], desc[w + 2], desc[w + 3]
        if a != end or b <= a or b > t or off < KD.B_PARTS + KD.B_PART_WORDS * n or ln < KD.HEADER \
                or off + ln > nd:
            return fail(ext, table, BAD_BATCH)
        end = b
        sub = carray(as_ptr(da + 8 * off, np.int64), (ln,))
        if sub[KD.VERSION] != 1 or sub[KD.KIND] == KD.KIND_BATCH or sub[KD.T] != b - a or sub[KD.HKV] != hkv \
                or sub[KD.DIM] != d or layer >= sub[KD.LAYERS]:
            return fail(ext, table, BAD_BATCH)
    if end != t:
        return fail(ext, table, BAD_BATCH)
    for i in range(n):
        w = KD.B_PARTS + KD.B_PART_WORDS * i
        a, b, off, ln = desc[w], desc[w + 1], desc[w + 2], desc[w + 3]
        err = _attend(carray(as_ptr(da + 8 * off, np.int64), (ln,)), ln, da + 8 * off, layer,
                      carray(as_ptr(qa + 4 * a * hq * d, np.float32), (b - a, hq, d)),
                      carray(as_ptr(ka + 4 * a * hkv * d, np.float32), (b - a, hkv, d)),
                      carray(as_ptr(va + 4 * a * hkv * d, np.float32), (b - a, hkv, d)), scale,
                      carray(as_ptr(oa + 4 * a * hq * d, np.float32), (b - a, hq, d)), ort_pool)
        if err != 0:
            return fail(ext, table, err)
    return rec[0] * 0


def make_op(lib, scales, parallel: bool = False) -> CustomOp:
    """The TurboQuantAttention custom op with per-layer softmax ``scales`` (owned by the caller);
    ``parallel``: its sessions run several intra-op threads, and the op's work items go to them
    (else to the cooperative pool, :mod:`tqedge.runtime.coop_pool`)."""
    payload = np.ascontiguousarray(scales, dtype=np.float64)
    return CustomOp(lib, OP_NAME, [FLOAT, FLOAT, FLOAT, INT64], [FLOAT], attention_compute, attr="layer",
                    kernels=len(payload), messages=MESSAGES, payload=payload, parallel=parallel)

"""The AddBlockOffsets op of ``model.onnx`` as a Numba cfunc (``KernelComputeV2``).

Inputs ``y (T, N)`` float32 (a ``MatMulNBits`` output), ``x (T, K)`` float32 (its input) and
``mins (K / block, N)`` float16 (a GGUF Q4_1 weight's block minimums); output
``y + blocksum(x) @ mins`` (T, N) float32 (:func:`tqedge.codec.kernels_linear.add_block_offsets`).
The block is ``K / len(mins)``. A prompt chunk's rows (from :data:`MIN_ROWS`) are split into work
items of :data:`ROWS_PER_ITEM` rows for the cooperative pool (or onnxruntime's pool under
``spin``), like the attention op's; a row's result does not depend on the split. An int4 bundle exported from a Q4_1 GGUF has one such node per
linear in its uncut graph (the cut segments run the same sum as ReduceSum, Cast and MatMul):
onnxruntime's float32 ``MatMul`` with one row and 18 to 48 inner products per output was a
fifth of a decode step (round 22, docs/RESULTS.md). Bundles exported from round 28 on run such a
linear whole as one ``LinearQ4_1`` node (:mod:`tqedge.runtime.native_linear`); older ones keep this
op. Errors come back as an ``OrtStatus*``;
nothing raises across the C boundary.
"""

from __future__ import annotations

import numpy as np
from numba import carray, types

from tqedge.bundle import BLOCK_OFFSETS_OP
from tqedge.codec.kernels_linear import add_block_offsets
from tqedge.codec.numba_runtime import cfunc, njit
from tqedge.runtime.coop_pool import run_items
from tqedge.runtime.ort_capi import FLOAT, FLOAT16
from tqedge.runtime.ort_numba import (PAR_WORDS, PAYLOAD, CustomOp, as_ptr, fail, kernel_ext, parallel_record,
                                      tensor_in, tensor_out)

OP_NAME = BLOCK_OFFSETS_OP
MESSAGES = ["AddBlockOffsets: y (T, N), x (T, K) and mins (K / block, N) must be 2-D with agreeing shapes"]  # 1
BAD_SHAPE = 1
ROWS_PER_ITEM = 64  # rows of a prompt chunk per work item
MIN_ROWS = 2 * ROWS_PER_ITEM  # rows from which a call hands its items to a pool
# the op's payload (int64 words, set by the backend at load) and a call's item block
P_THREADS, P_POOL, P_LOCK, P_ITEM = range(4)
B_X, B_Y, B_MINS, B_OUT, B_T, B_K, B_N, B_NB = range(8)


@njit(warm=False, nogil=True)
def offsets_item(block_addr, i):
    """Rows ``[i * ROWS_PER_ITEM, …)`` of the call described by the item block at ``block_addr``."""
    b = carray(as_ptr(block_addr, np.int64), (8,))
    t, k, n, nb = b[B_T], b[B_K], b[B_N], b[B_NB]
    a = i * ROWS_PER_ITEM
    e = min(t, a + ROWS_PER_ITEM)
    add_block_offsets(carray(as_ptr(b[B_X] + 4 * a * k, np.float32), (e - a, k)),
                      carray(as_ptr(b[B_Y] + 4 * a * n, np.float32), (e - a, n)),
                      carray(as_ptr(b[B_MINS], np.uint16), (nb, n)),
                      carray(as_ptr(b[B_OUT] + 4 * a * n, np.float32), (e - a, n)))
    return 0


@cfunc(types.int64(types.int64, types.int64), nogil=True)
def _offsets_item_entry(block_addr, i):
    return offsets_item(block_addr, i)


ITEM_ENTRY = _offsets_item_entry.address  # handed to the op through its payload (P_ITEM)


@cfunc(types.intp(types.intp, types.intp), nogil=True)
def offsets_compute(kernel, ctx):
    """``KernelComputeV2(kernel, context) -> OrtStatus*`` of AddBlockOffsets."""
    ext, _, table = kernel_ext(kernel)
    dims = np.zeros(2, np.int64)
    ya, yn, st = tensor_in(table, ctx, 0, dims)
    if st != 0:
        return st
    t, n = dims[0], dims[1]
    xa, xn, st = tensor_in(table, ctx, 1, dims)
    if st != 0:
        return st
    k = dims[1]
    if yn != 2 or xn != 2 or dims[0] != t:
        return fail(ext, table, BAD_SHAPE)
    ma, mn, st = tensor_in(table, ctx, 2, dims)
    if st != 0:
        return st
    nb = dims[0]
    if mn != 2 or dims[1] != n or nb <= 0 or k % nb != 0:
        return fail(ext, table, BAD_SHAPE)
    dims[0], dims[1] = t, n
    oa, st = tensor_out(table, ctx, 0, dims, 2)
    if st != 0:
        return st
    if t < MIN_ROWS:
        add_block_offsets(carray(as_ptr(xa, np.float32), (t, k)), carray(as_ptr(ya, np.float32), (t, n)),
                          carray(as_ptr(ma, np.uint16), (nb, n)), carray(as_ptr(oa, np.float32), (t, n)))
        return 0
    p = carray(as_ptr(ext[PAYLOAD], np.int64), (4,))
    rec = np.zeros(PAR_WORDS, np.int64)
    ort_pool = parallel_record(ext, table, ctx, rec)
    block = np.empty(8, np.int64)
    block[B_X], block[B_Y], block[B_MINS], block[B_OUT] = xa, ya, ma, oa
    block[B_T], block[B_K], block[B_N], block[B_NB] = t, k, n, nb
    run_items(ort_pool, p[P_POOL], p[P_LOCK], p[P_THREADS], p[P_ITEM], block.ctypes.data,
              (t + ROWS_PER_ITEM - 1) // ROWS_PER_ITEM, 2)
    return (block[0] + rec[0]) * 0  # read after the items: ``block`` and ``rec`` live until then


def make_op(lib, threads: int = 1, pool: int = 0, lock: int = 0, parallel: bool = False) -> CustomOp:
    """The AddBlockOffsets custom op (one kernel, no attribute; owned by the caller). A prompt
    chunk's rows go to the cooperative pool at address ``pool`` (``threads`` threads, launch
    ``lock``: :func:`tqedge.runtime.coop_pool.run_items`), or with ``parallel`` to the session's
    own intra-op threads; with neither they run on the calling thread."""
    payload = np.array([threads, pool, lock, ITEM_ENTRY], np.int64)
    return CustomOp(lib, OP_NAME, [FLOAT, FLOAT, FLOAT16], [FLOAT], offsets_compute, attr=None,
                    messages=MESSAGES, payload=payload, parallel=parallel)

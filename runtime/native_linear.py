"""The LinearQ4_1 op of ``model.onnx`` as a Numba cfunc (``KernelComputeV2``).

Inputs ``x (T, K)`` float32 and ``w (N / 16, K / 32 · 320)`` uint8: a GGUF Q4_1 weight's own
blocks, 16 rows' blocks at a time as group blocks (:func:`tqedge.codec.kernels_linear.group_q4_1`);
output ``x @ W.T`` (T, N) float32 with ``W = d·q + m`` per block, the input quantized to int8 per
block of 32 (:mod:`tqedge.codec.simd_linear`: the ``MatMulNBits`` + ``AddBlockOffsets`` pair it
replaces quantizes the same way and reads 0.8125 bytes per weight where this reads the file's
0.625). The rows of the input are quantized once per call; the weight's row groups are split into
work items (:data:`GROUPS_PER_ITEM` groups of 16 rows) for the cooperative pool (or onnxruntime's
under ``spin``), one row or a prompt chunk alike; an output does not depend on the split. Errors
come back as an ``OrtStatus*``; nothing raises across the C boundary.
"""

from __future__ import annotations

import numpy as np
from numba import carray, types

from tqedge.bundle import LINEAR_Q4_1_OP
from tqedge.codec.kernels_linear import q4_1_gemm, quantize_rows_q8
from tqedge.codec.numba_runtime import cfunc, njit
from tqedge.codec.simd_linear import GROUP_BYTES, Q4_1_BLOCK, ROWS, XQ_BYTES
from tqedge.runtime.coop_pool import run_items
from tqedge.runtime.ort_capi import FLOAT, UINT8
from tqedge.runtime.ort_numba import (PAR_WORDS, PAYLOAD, CustomOp, as_ptr, fail, kernel_ext, parallel_record,
                                      tensor_in, tensor_out)

OP_NAME = LINEAR_Q4_1_OP
MESSAGES = ["LinearQ4_1: x (T, K) and w (N / 16, K / 32 * 320) must be 2-D with agreeing shapes"]  # 1
BAD_SHAPE = 1
GROUPS_PER_ITEM = 8  # 128 output rows per work item (SmolLM2: 8 for q/k/v, 24 for gate/up, 5 for o and down)
# the op's payload (int64 words, set by the backend at load) and a call's item block
P_THREADS, P_POOL, P_LOCK, P_ITEM = range(4)
B_XQ, B_DX, B_SX, B_W, B_OUT, B_T, B_NB, B_G = range(8)


@njit(warm=False, nogil=True)
def linear_item(block_addr, i):
    """Row groups ``[i * GROUPS_PER_ITEM, …)`` of the call described by the item block at ``block_addr``."""
    b = carray(as_ptr(block_addr, np.int64), (8,))
    t, nb, g = b[B_T], b[B_NB], b[B_G]
    lo = i * GROUPS_PER_ITEM
    hi = min(g, lo + GROUPS_PER_ITEM)
    q4_1_gemm(carray(as_ptr(b[B_W], np.uint8), (g, nb * GROUP_BYTES)),
              carray(as_ptr(b[B_XQ], np.int8), (t, nb * XQ_BYTES)),
              carray(as_ptr(b[B_DX], np.float32), (t, nb)), carray(as_ptr(b[B_SX], np.float32), (t, nb)),
              carray(as_ptr(b[B_OUT], np.float32), (t, g * ROWS)), lo * ROWS, hi * ROWS)
    return 0


@cfunc(types.int64(types.int64, types.int64), nogil=True)
def _linear_item_entry(block_addr, i):
    return linear_item(block_addr, i)


ITEM_ENTRY = _linear_item_entry.address  # handed to the op through its payload (P_ITEM)


@cfunc(types.intp(types.intp, types.intp), nogil=True)
def linear_compute(kernel, ctx):
    """``KernelComputeV2(kernel, context) -> OrtStatus*`` of LinearQ4_1."""
    ext, _, table = kernel_ext(kernel)
    dims = np.zeros(2, np.int64)
    xa, xn, st = tensor_in(table, ctx, 0, dims)
    if st != 0:
        return st
    t, k = dims[0], dims[1]
    wa, wn, st = tensor_in(table, ctx, 1, dims)
    if st != 0:
        return st
    g = dims[0]
    nb = k // Q4_1_BLOCK
    if xn != 2 or wn != 2 or k % Q4_1_BLOCK != 0 or dims[1] != nb * GROUP_BYTES or g <= 0:
        return fail(ext, table, BAD_SHAPE)
    dims[0], dims[1] = t, g * ROWS
    oa, st = tensor_out(table, ctx, 0, dims, 2)
    if st != 0:
        return st
    if t == 0:
        return 0
    xq = np.empty((t, nb * XQ_BYTES), np.int8)
    dx = np.empty((t, nb), np.float32)
    sx = np.empty((t, nb), np.float32)
    quantize_rows_q8(carray(as_ptr(xa, np.float32), (t, k)), xq, dx, sx)
    p = carray(as_ptr(ext[PAYLOAD], np.int64), (4,))
    rec = np.zeros(PAR_WORDS, np.int64)
    ort_pool = parallel_record(ext, table, ctx, rec)
    block = np.empty(8, np.int64)
    block[B_XQ], block[B_DX], block[B_SX], block[B_W], block[B_OUT] = (xq.ctypes.data, dx.ctypes.data,
                                                                       sx.ctypes.data, wa, oa)
    block[B_T], block[B_NB], block[B_G] = t, nb, g
    run_items(ort_pool, p[P_POOL], p[P_LOCK], p[P_THREADS], p[P_ITEM], block.ctypes.data,
              (g + GROUPS_PER_ITEM - 1) // GROUPS_PER_ITEM, 2)
    # read after the items: the scratch, ``block`` and ``rec`` live until then
    return (block[0] + rec[0] + xq.shape[0] + dx.shape[0] + sx.shape[0]) * 0


def make_op(lib, threads: int = 1, pool: int = 0, lock: int = 0, parallel: bool = False) -> CustomOp:
    """The LinearQ4_1 custom op (one kernel, no attribute; owned by the caller). Its row groups go
    to the cooperative pool at address ``pool`` (``threads`` threads, launch ``lock``:
    :func:`tqedge.runtime.coop_pool.run_items`), or with ``parallel`` to the session's own
    intra-op threads; with neither they run on the calling thread."""
    payload = np.array([threads, pool, lock, ITEM_ENTRY], np.int64)
    return CustomOp(lib, OP_NAME, [FLOAT, UINT8], [FLOAT], linear_compute, attr=None,
                    messages=MESSAGES, payload=payload, parallel=parallel)

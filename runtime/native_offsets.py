"""The AddBlockOffsets op of ``model.onnx`` as a Numba cfunc (``KernelComputeV2``).

Inputs ``y (T, N)`` float32 (a ``MatMulNBits`` output), ``x (T, K)`` float32 (its input) and
``mins (K / block, N)`` float16 (a GGUF Q4_1 weight's block minimums); output
``y + blocksum(x) @ mins`` (T, N) float32 (:func:`tqedge.codec.kernels_linear.add_block_offsets`).
The block is ``K / len(mins)``. An int4 bundle exported from a Q4_1 GGUF has one such node per
linear in its uncut graph (the cut segments run the same sum as ReduceSum, Cast and MatMul):
onnxruntime's float32 ``MatMul`` with one row and 18 to 48 inner products per output was a
fifth of a decode step (round 22, docs/RESULTS.md). Errors come back as an ``OrtStatus*``;
nothing raises across the C boundary.
"""

from __future__ import annotations

import numpy as np
from numba import carray, types

from tqedge.bundle import BLOCK_OFFSETS_OP
from tqedge.codec.kernels_linear import add_block_offsets
from tqedge.codec.numba_runtime import cfunc
from tqedge.runtime.ort_capi import FLOAT, FLOAT16
from tqedge.runtime.ort_numba import CustomOp, as_ptr, fail, kernel_ext, tensor_in, tensor_out

OP_NAME = BLOCK_OFFSETS_OP
MESSAGES = ["AddBlockOffsets: y (T, N), x (T, K) and mins (K / block, N) must be 2-D with agreeing shapes"]  # 1
BAD_SHAPE = 1


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
    add_block_offsets(carray(as_ptr(xa, np.float32), (t, k)), carray(as_ptr(ya, np.float32), (t, n)),
                      carray(as_ptr(ma, np.uint16), (nb, n)), carray(as_ptr(oa, np.float32), (t, n)))
    return 0


def make_op(lib) -> CustomOp:
    """The AddBlockOffsets custom op (one kernel, no attribute; owned by the caller)."""
    return CustomOp(lib, OP_NAME, [FLOAT, FLOAT, FLOAT16], [FLOAT], offsets_compute, attr=None,
                    messages=MESSAGES)

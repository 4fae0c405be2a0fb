"""The RotaryQKV op of ``model.onnx`` as a Numba cfunc (``KernelComputeV2``).

A decode step runs every node of the uncut graph once, and onnxruntime spends about a microsecond
on each however small it is: 480 extra ``Neg`` nodes on the 9 × 64 queries cost 0.45 ms per
SmolLM2 step at 512 tokens, ~4 % (round 26, docs/RESULTS.md). RotaryQKV stands for the 16 nodes
between a layer's fused q/k/v linear and its attention (kernel:
:func:`tqedge.codec.kernels_rope.rope_qkv`, the same bits); the cut segments keep them.

Attribute ``num_heads`` (Hq); inputs ``qkv (T, (Hq + 2·Hkv)·D)`` (the fused q/k/v projection),
``cos`` and ``sin`` ``(T, 1, D)``; outputs ``q (T, Hq, D)`` and ``k (T, Hkv, D)`` with RoPE, and
``v (T, Hkv, D)``. ``Hq`` names the kernel row (see :class:`~tqedge.runtime.ort_numba.CustomOp`),
``D`` is the tables' width, ``Hkv`` follows from the width of ``qkv``. Errors come back as an
``OrtStatus*``; nothing raises across the C boundary.
"""

from __future__ import annotations

import numpy as np
from numba import carray, types

from tqedge.bundle import ROTARY_QKV_OP
from tqedge.codec.kernels_rope import rope_qkv
from tqedge.codec.numba_runtime import cfunc
from tqedge.runtime.ort_capi import FLOAT
from tqedge.runtime.ort_numba import CustomOp, as_ptr, fail, kernel_ext, tensor_in, tensor_out

OP_NAME = ROTARY_QKV_OP
MAX_HEADS = 256  # the num_heads attribute is a kernel row: 1 … MAX_HEADS
MESSAGES = ["RotaryQKV: qkv (T, (Hq + 2 Hkv) D), cos and sin (T, 1, D) must agree with num_heads"]  # 1
BAD_SHAPE = 1


@cfunc(types.intp(types.intp, types.intp), nogil=True)
def rope_compute(kernel, ctx):
    """``KernelComputeV2(kernel, context) -> OrtStatus*`` of RotaryQKV."""
    ext, hq, table = kernel_ext(kernel)
    dims = np.zeros(3, np.int64)
    xa, xn, st = tensor_in(table, ctx, 0, dims)
    if st != 0:
        return st
    t, w = dims[0], dims[1]
    ca, cn, st = tensor_in(table, ctx, 1, dims)
    if st != 0:
        return st
    d = dims[2]
    if xn != 2 or cn != 3 or dims[0] != t or dims[1] != 1 or d <= 0 or d % 2 != 0 or hq < 1 or w % d != 0:
        return fail(ext, table, BAD_SHAPE)
    hkv2 = w // d - hq
    if hkv2 < 2 or hkv2 % 2 != 0:
        return fail(ext, table, BAD_SHAPE)
    sa, sn, st = tensor_in(table, ctx, 2, dims)
    if st != 0:
        return st
    if sn != 3 or dims[0] != t or dims[1] != 1 or dims[2] != d:
        return fail(ext, table, BAD_SHAPE)
    hkv = hkv2 // 2
    dims[0], dims[1], dims[2] = t, hq, d
    qa, st = tensor_out(table, ctx, 0, dims, 3)
    if st != 0:
        return st
    dims[1] = hkv
    ka, st = tensor_out(table, ctx, 1, dims, 3)
    if st != 0:
        return st
    va, st = tensor_out(table, ctx, 2, dims, 3)
    if st != 0:
        return st
    rope_qkv(carray(as_ptr(xa, np.float32), (t, w)), carray(as_ptr(ca, np.float32), (t, d)),
             carray(as_ptr(sa, np.float32), (t, d)), carray(as_ptr(qa, np.float32), (t, hq, d)),
             carray(as_ptr(ka, np.float32), (t, hkv, d)), carray(as_ptr(va, np.float32), (t, hkv, d)))
    return 0


def make_op(lib) -> CustomOp:
    """The RotaryQKV custom op (owned by the caller; serial: a row is ~1 µs of work)."""
    return CustomOp(lib, OP_NAME, [FLOAT, FLOAT, FLOAT], [FLOAT, FLOAT, FLOAT], rope_compute,
                    attr="num_heads", kernels=MAX_HEADS + 1, messages=MESSAGES)

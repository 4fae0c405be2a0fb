"""Custom onnxruntime ops whose callbacks are Numba ``@cfunc`` machine code.

Two intrinsics make the C API reachable from nopython code without baking any address into the
compiled code (so Numba's disk cache stays valid across processes): :func:`ccall` calls a C
function pointer given as an integer with integer arguments, :func:`as_ptr` turns an address
into a typed pointer for ``numba.carray``.

A :class:`CustomOp` owns one ``OrtCustomOp`` struct followed by an int64 block (the "ext"
block, layout :data:`EXT`) that the generic callbacks read: the API table, the op name, input
and output types, the attribute naming the kernel index (``layer``), error messages. ORT hands
every callback the struct's address, so the callbacks are compiled once and serve every op
object; nothing lives in module globals. ``CreateKernelV2`` reads the node's ``layer``
attribute and returns the address of that layer's row in the ext block as the kernel handle;
the op's own ``KernelComputeV2`` cfunc gets it back on every call (:func:`kernel_ext`).

The struct, its ext block, the name and message strings and the compiled callbacks are owned
by the :class:`CustomOp` object, which must outlive every session created with it.
"""

from __future__ import annotations

import ctypes

import numpy as np
from llvmlite import ir
from numba import carray, types
from numba.extending import intrinsic

from tqedge.codec.numba_runtime import cfunc, njit
from tqedge.runtime.ort_capi import (CUSTOM_OP_FIELDS, CUSTOM_OP_VERSION, INDEX, ORT_INVALID_ARGUMENT,
                                     OrtCustomOp, OrtLib)
from tqedge.runtime.warmup import register_native_hook

register_native_hook()  # before the first cfunc below: on a cold cache they compile in a child process

OP_WORDS = ctypes.sizeof(OrtCustomOp) // 8  # int64 words of the struct itself
MAX_IN, MAX_OUT, MSG_BYTES = 8, 4, 160
# ext block (int64 words after the struct)
API, NAME, N_IN, N_OUT, IN_TYPES, OUT_TYPES = 0, 1, 2, 3, 4, 4 + MAX_IN
ATTR, N_KERNELS, MSGS, PAYLOAD, PARALLEL, ROWS = 16, 17, 18, 19, 20, 21
ROW_WORDS = 2  # kernel row: (kernel index, address of the struct)
TABLE_LEN = max(INDEX.values()) + 1

_CS, _GET_ATTR = INDEX["CreateStatus"], INDEX["KernelInfoGetAttribute_int64"]
_GET_IN, _GET_OUT = INDEX["KernelContext_GetInput"], INDEX["KernelContext_GetOutput"]
_TYPE_SHAPE, _NDIM, _DIMS = INDEX["GetTensorTypeAndShape"], INDEX["GetDimensionsCount"], INDEX["GetDimensions"]
_REL_INFO, _DATA = INDEX["ReleaseTensorTypeAndShapeInfo"], INDEX["GetTensorMutableData"]
_PFOR, _REL_STATUS = INDEX["KernelContext_ParallelFor"], INDEX["ReleaseStatus"]
PAR_WORDS = 3  # a parallel-for record: (KernelContext_ParallelFor, kernel context, ReleaseStatus)
_JIT = dict(nogil=True)


@intrinsic
def ccall(typingctx, fn, args):
    """``ccall(address, (a0, a1, …))``: call the C function at ``address`` with integer
    arguments (pointers as integers), returning its 64-bit result (an ``OrtStatus*``)."""
    if not isinstance(fn, types.Integer) or not isinstance(args, types.BaseTuple):
        return None
    if not all(isinstance(t, types.Integer) for t in args):
        return None

    def codegen(context, builder, sig, llargs):
        i64 = ir.IntType(64)
        vals = [context.cast(builder, builder.extract_value(llargs[1], k), t, types.int64)
                for k, t in enumerate(args)]
        fnty = ir.FunctionType(i64, [i64] * len(vals))
        ptr = builder.inttoptr(context.cast(builder, llargs[0], fn, types.int64), fnty.as_pointer())
        return builder.call(ptr, vals)

    return types.int64(fn, args), codegen


@intrinsic
def as_ptr(typingctx, addr, dtype):
    """``as_ptr(address, np.float32)``: the address as a typed pointer (for ``carray``)."""
    if not isinstance(addr, types.Integer) or not isinstance(dtype, types.NumberClass):
        return None
    ptr_t = types.CPointer(dtype.instance_type)

    def codegen(context, builder, sig, llargs):
        a = context.cast(builder, llargs[0], addr, types.int64)
        return builder.inttoptr(a, context.get_value_type(ptr_t))

    return ptr_t(addr, dtype), codegen


@njit(warm=False, inline="always", **_JIT)
def words(addr, n):
    """``n`` int64 words at ``addr``."""
    return carray(as_ptr(addr, np.int64), (n,))


@njit(warm=False, inline="always", **_JIT)
def kernel_ext(kernel):
    """(ext block, kernel index, API table) from a kernel handle made by CreateKernelV2."""
    row = words(kernel, ROW_WORDS)
    ext = words(row[1] + 8 * OP_WORDS, ROWS)
    return ext, row[0], words(ext[API], TABLE_LEN)


@njit(warm=False, inline="always", **_JIT)
def parallel_record(ext, table, ctx, rec):
    """Fill ``rec`` (:data:`PAR_WORDS` int64) with what hands work items to onnxruntime's
    intra-op pool from this kernel call, and return its address; 0 when the op was made without
    ``parallel`` (then the session runs one intra-op thread and the items go elsewhere)."""
    if ext[PARALLEL] == 0:
        return np.int64(0)
    rec[0], rec[1], rec[2] = table[_PFOR], ctx, table[_REL_STATUS]
    return np.int64(rec.ctypes.data)


@njit(warm=False, **_JIT)
def fail(ext, table, msg):
    """An ``OrtStatus*`` (INVALID_ARGUMENT) carrying message number ``msg`` of the op."""
    return ccall(table[_CS], (ORT_INVALID_ARGUMENT, ext[MSGS] + MSG_BYTES * msg))


@njit(warm=False, **_JIT)
def tensor_in(table, ctx, i, dims):
    """Input ``i`` of the kernel context: (data address, rank, status); its shape into ``dims``."""
    scr = np.zeros(3, np.int64)
    a = scr.ctypes.data
    st = ccall(table[_GET_IN], (ctx, i, a))
    if st != 0:
        return 0, 0, st
    if scr[0] == 0:  # absent input
        return 0, -1, 0
    st = ccall(table[_TYPE_SHAPE], (scr[0], a + 8))
    if st != 0:
        return 0, 0, st
    st = ccall(table[_NDIM], (scr[1], a + 16))
    n = scr[2]
    if st == 0 and n <= dims.shape[0]:
        st = ccall(table[_DIMS], (scr[1], dims.ctypes.data, n))
    ccall(table[_REL_INFO], (scr[1],))
    if st != 0:
        return 0, 0, st
    if n > dims.shape[0]:
        return 0, n, 0
    st = ccall(table[_DATA], (scr[0], a + 16))
    return scr[2], n, st


@njit(warm=False, **_JIT)
def tensor_out(table, ctx, i, dims, n):
    """Output ``i`` allocated by ORT with shape ``dims[:n]``: (data address, status)."""
    scr = np.zeros(2, np.int64)
    a = scr.ctypes.data
    st = ccall(table[_GET_OUT], (ctx, i, dims.ctypes.data, n, a))
    if st != 0:
        return 0, st
    st = ccall(table[_DATA], (scr[0], a + 8))
    return scr[1], st


# -- generic callbacks (read the ext block behind the struct) ---------------------------------
@njit(warm=False, inline="always", **_JIT)
def _ext(op):
    return words(op + 8 * OP_WORDS, ROWS)


@cfunc(types.intp(types.intp), **_JIT)
def _get_name(op):
    return _ext(op)[NAME]


@cfunc(types.intp(types.intp), **_JIT)
def _get_ep(op):
    return 0  # NULL: the CPU execution provider


@cfunc(types.int32(types.intp, types.uintp), **_JIT)
def _input_type(op, i):
    return _ext(op)[IN_TYPES + i] if i < MAX_IN else 0


@cfunc(types.uintp(types.intp), **_JIT)
def _input_count(op):
    return _ext(op)[N_IN]


@cfunc(types.int32(types.intp, types.uintp), **_JIT)
def _output_type(op, i):
    return _ext(op)[OUT_TYPES + i] if i < MAX_OUT else 0


@cfunc(types.uintp(types.intp), **_JIT)
def _output_count(op):
    return _ext(op)[N_OUT]


@cfunc(types.int32(types.intp, types.uintp), **_JIT)
def _zero_at(op, i):
    return 0  # INPUT_OUTPUT_REQUIRED / OrtMemTypeDefault


@cfunc(types.int32(types.intp), **_JIT)
def _one(op):
    return 1  # variadic min arity / homogeneity (never asked: no variadic I/O)


@cfunc(types.void(types.intp), **_JIT)
def _destroy(kernel):
    pass  # kernel rows belong to the CustomOp object


@cfunc(types.void(types.intp, types.intp), **_JIT)
def _compute_v1(kernel, ctx):
    pass  # never called: KernelComputeV2 is set


@cfunc(types.intp(types.intp, types.intp, types.intp, types.intp), **_JIT)
def _create_kernel_v2(op, api, info, out):
    ext = _ext(op)
    table = words(api, TABLE_LEN)
    k = 0
    if ext[ATTR] != 0:
        scr = np.zeros(1, np.int64)
        st = ccall(table[_GET_ATTR], (info, ext[ATTR], scr.ctypes.data))
        if st != 0:
            return st
        k = scr[0]
    if k < 0 or k >= ext[N_KERNELS]:
        return ccall(table[_CS], (ORT_INVALID_ARGUMENT, ext[MSGS]))
    row = words(op + 8 * (OP_WORDS + ROWS + ROW_WORDS * k), ROW_WORDS)
    row[0] = k
    row[1] = op
    words(out, 1)[0] = op + 8 * (OP_WORDS + ROWS + ROW_WORDS * k)
    return 0


_CALLBACKS = {
    "GetName": _get_name, "GetExecutionProviderType": _get_ep, "GetInputType": _input_type,
    "GetInputTypeCount": _input_count, "GetOutputType": _output_type, "GetOutputTypeCount": _output_count,
    "KernelCompute": _compute_v1, "KernelDestroy": _destroy, "GetInputCharacteristic": _zero_at,
    "GetOutputCharacteristic": _zero_at, "GetInputMemoryType": _zero_at, "GetVariadicInputMinArity": _one,
    "GetVariadicInputHomogeneity": _one, "GetVariadicOutputMinArity": _one,
    "GetVariadicOutputHomogeneity": _one, "CreateKernelV2": _create_kernel_v2,
}


class CustomOp:
    """One ``OrtCustomOp`` (CPU, single-typed inputs/outputs) computed by a Numba cfunc.

    Args:
        lib: the loaded library.
        name: op type in the graph (e.g. ``"TurboQuantAttention"``).
        inputs, outputs: ONNX element types (``ort_capi.FLOAT`` …) of the inputs / outputs.
        compute: a ``@cfunc(intp(intp, intp))`` ``KernelComputeV2(kernel, context) -> OrtStatus*``.
        attr: int attribute selecting the kernel row (``"layer"``), or None (one kernel).
        kernels: number of kernel rows (layers).
        messages: error messages the compute cfunc may return (``fail(ext, table, i + 1)``).
        payload: an array whose address the compute cfunc finds at ``ext[PAYLOAD]``.
        parallel: the session runs more than one intra-op thread, and the compute cfunc may
            hand work items to that pool (:func:`parallel_record`).
    """

    def __init__(self, lib: OrtLib, name: str, inputs, outputs, compute, attr: str | None = "layer",
                 kernels: int = 1, messages=(), payload: np.ndarray | None = None,
                 parallel: bool = False):
        if len(inputs) > MAX_IN or len(outputs) > MAX_OUT:
            raise ValueError("too many inputs/outputs for a CustomOp")
        self.buf = np.zeros(OP_WORDS + ROWS + ROW_WORDS * kernels, np.int64)
        self.struct = OrtCustomOp.from_buffer(self.buf)
        self.compute = compute
        self.name = ctypes.create_string_buffer(name.encode())
        self.attr = ctypes.create_string_buffer(attr.encode()) if attr else None
        msgs = [f"{name}: the node's {attr} attribute is out of range"] + list(messages)
        self.messages = np.zeros((len(msgs), MSG_BYTES), np.uint8)
        for i, m in enumerate(msgs):
            b = m.encode()[: MSG_BYTES - 1]
            self.messages[i, : len(b)] = np.frombuffer(b, np.uint8)
        self.payload = payload
        ext = self.buf[OP_WORDS:]
        ext[API], ext[NAME] = lib.api, ctypes.addressof(self.name)
        ext[N_IN], ext[N_OUT] = len(inputs), len(outputs)
        ext[IN_TYPES: IN_TYPES + len(inputs)] = inputs
        ext[OUT_TYPES: OUT_TYPES + len(outputs)] = outputs
        ext[ATTR] = ctypes.addressof(self.attr) if self.attr else 0
        ext[N_KERNELS], ext[MSGS] = kernels, self.messages.ctypes.data
        ext[PAYLOAD] = payload.ctypes.data if payload is not None else 0
        ext[PARALLEL] = 1 if parallel else 0
        self.struct.version = CUSTOM_OP_VERSION
        self.callbacks = {**_CALLBACKS, "KernelComputeV2": compute}  # referenced for as long as the op lives
        for field in CUSTOM_OP_FIELDS:
            fn = self.callbacks.get(field)
            setattr(self.struct, field, fn.address if fn is not None else None)

    @property
    def address(self) -> int:
        """``OrtCustomOp*`` to hand to ``CustomOpDomain_Add``."""
        return ctypes.addressof(self.struct)

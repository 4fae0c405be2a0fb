"""ctypes bindings to onnxruntime's C API (``libonnxruntime`` from the published wheel).

Follows ``include/onnxruntime/core/session/onnxruntime_c_api.h`` (microsoft/onnxruntime; the
indices below were read off the ``OrtApi`` struct of the ORT_API_VERSION 30 header, which only
ever appends to it; ``GetBuildInfoString`` at 254 is a check one can run) and
``onnxruntime/core/session/custom_ops.cc`` (what ORT calls per ``OrtCustomOp.version``). The
table is requested at :data:`API_VERSION` = 17: every function used here exists since then
(``KernelContext_ParallelFor``, a custom kernel's work items on the session's intra-op pool, is
the newest), and 16 is the first version with ``CreateKernelV2`` / ``KernelComputeV2`` (a kernel
that returns an ``OrtStatus*`` instead of throwing). onnxruntime 1.32 (the wheel this was
written against) reports ORT_API_VERSION 32 and accepts any lower one.

The library is found next to the ``onnxruntime`` package without importing it: the Python module
links its own copy of onnxruntime, and the native backend needs only this one.

Nothing here is global state: an :class:`OrtLib` (library + function table) is cheap and the
objects built on it (env, options, domain, sessions) belong to whoever creates them.
"""

from __future__ import annotations

import ctypes
import glob
import importlib.util
import os
from ctypes import POINTER, c_char_p, c_int, c_int64, c_size_t, c_uint32, c_void_p

import numpy as np

from tqedge.bundle import CUSTOM_DOMAIN
from tqedge.errors import TqedgeError

API_VERSION = 17

# OrtApi function-table indices (position of the member in struct OrtApi).
INDEX = {
    "CreateStatus": 0, "GetErrorCode": 1, "GetErrorMessage": 2, "CreateEnv": 3, "CreateSession": 7,
    "Run": 9, "CreateSessionOptions": 10, "SetSessionExecutionMode": 13, "EnableMemPattern": 16,
    "DisableMemPattern": 17, "EnableCpuMemArena": 18, "DisableCpuMemArena": 19,
    "SetSessionLogSeverityLevel": 22, "SetSessionGraphOptimizationLevel": 23,
    "SetIntraOpNumThreads": 24, "SetInterOpNumThreads": 25, "CreateCustomOpDomain": 26,
    "CustomOpDomain_Add": 27, "AddCustomOpDomain": 28, "SessionGetInputCount": 30,
    "SessionGetOutputCount": 31, "SessionGetInputName": 36, "SessionGetOutputName": 37,
    "CreateTensorWithDataAsOrtValue": 49, "GetTensorMutableData": 51, "GetDimensionsCount": 61,
    "GetDimensions": 62, "GetTensorTypeAndShape": 65, "CreateCpuMemoryInfo": 69, "AllocatorFree": 76,
    "GetAllocatorWithDefaultOptions": 78, "KernelInfoGetAttribute_int64": 86,
    "KernelContext_GetInputCount": 88, "KernelContext_GetOutputCount": 89, "KernelContext_GetInput": 90,
    "KernelContext_GetOutput": 91, "ReleaseEnv": 92, "ReleaseStatus": 93, "ReleaseMemoryInfo": 94,
    "ReleaseSession": 95, "ReleaseValue": 96, "ReleaseTensorTypeAndShapeInfo": 99,
    "ReleaseSessionOptions": 100, "ReleaseCustomOpDomain": 101, "AddSessionConfigEntry": 130,
    "KernelContext_ParallelFor": 274,
}

# enums of the header
ORT_OK, ORT_FAIL, ORT_INVALID_ARGUMENT = 0, 1, 2
FLOAT, UINT8, INT64, FLOAT16 = 1, 2, 7, 10  # ONNXTensorElementDataType
DTYPES = {np.dtype(np.float32): FLOAT, np.dtype(np.uint8): UINT8, np.dtype(np.int64): INT64,
          np.dtype(np.float16): FLOAT16}
LOG_ERROR = 3
ORT_ENABLE_ALL = 99
ORT_SEQUENTIAL = 0
ARENA_ALLOCATOR, MEM_TYPE_DEFAULT = 1, 0

_PP = POINTER(c_void_p)
_S = c_void_p  # OrtStatus* (NULL = success)
PROTOTYPES = {
    "CreateStatus": (c_void_p, c_int, c_char_p), "GetErrorCode": (c_int, c_void_p),
    "GetErrorMessage": (c_char_p, c_void_p), "CreateEnv": (_S, c_int, c_char_p, _PP),
    "CreateSession": (_S, c_void_p, c_char_p, c_void_p, _PP),
    "Run": (_S, c_void_p, c_void_p, POINTER(c_char_p), _PP, c_size_t, POINTER(c_char_p), c_size_t, _PP),
    "CreateSessionOptions": (_S, _PP), "SetSessionExecutionMode": (_S, c_void_p, c_int),
    "EnableMemPattern": (_S, c_void_p), "DisableMemPattern": (_S, c_void_p),
    "EnableCpuMemArena": (_S, c_void_p), "DisableCpuMemArena": (_S, c_void_p),
    "SetSessionLogSeverityLevel": (_S, c_void_p, c_int), "SetSessionGraphOptimizationLevel": (_S, c_void_p, c_int),
    "SetIntraOpNumThreads": (_S, c_void_p, c_int), "SetInterOpNumThreads": (_S, c_void_p, c_int),
    "CreateCustomOpDomain": (_S, c_char_p, _PP), "CustomOpDomain_Add": (_S, c_void_p, c_void_p),
    "AddCustomOpDomain": (_S, c_void_p, c_void_p), "SessionGetInputCount": (_S, c_void_p, POINTER(c_size_t)),
    "SessionGetOutputCount": (_S, c_void_p, POINTER(c_size_t)),
    "SessionGetInputName": (_S, c_void_p, c_size_t, c_void_p, POINTER(c_char_p)),
    "SessionGetOutputName": (_S, c_void_p, c_size_t, c_void_p, POINTER(c_char_p)),
    "CreateTensorWithDataAsOrtValue": (_S, c_void_p, c_void_p, c_size_t, POINTER(c_int64), c_size_t, c_int, _PP),
    "GetTensorMutableData": (_S, c_void_p, _PP), "GetTensorTypeAndShape": (_S, c_void_p, _PP),
    "GetDimensionsCount": (_S, c_void_p, POINTER(c_size_t)),
    "GetDimensions": (_S, c_void_p, POINTER(c_int64), c_size_t),
    "CreateCpuMemoryInfo": (_S, c_int, c_int, _PP), "AllocatorFree": (_S, c_void_p, c_void_p),
    "GetAllocatorWithDefaultOptions": (_S, _PP), "AddSessionConfigEntry": (_S, c_void_p, c_char_p, c_char_p),
    **{name: (None, c_void_p) for name in INDEX if name.startswith("Release")},
}

# struct OrtCustomOp: a uint32 version, then function pointers (header order). Which members ORT
# reads depends on ``version`` (custom_ops.cc): 8+ characteristics, 13+ GetInputMemoryType,
# 14+ variadic arity/homogeneity (only for variadic I/O), 16+ CreateKernelV2/KernelComputeV2,
# 17+ InferOutputShapeFn / start-end version, later ones the in-place and alias maps.
CUSTOM_OP_FIELDS = (
    "CreateKernel", "GetName", "GetExecutionProviderType", "GetInputType", "GetInputTypeCount",
    "GetOutputType", "GetOutputTypeCount", "KernelCompute", "KernelDestroy", "GetInputCharacteristic",
    "GetOutputCharacteristic", "GetInputMemoryType", "GetVariadicInputMinArity",
    "GetVariadicInputHomogeneity", "GetVariadicOutputMinArity", "GetVariadicOutputHomogeneity",
    "CreateKernelV2", "KernelComputeV2", "InferOutputShapeFn", "GetStartVersion", "GetEndVersion",
    "GetMayInplace", "ReleaseMayInplace", "GetAliasMap", "ReleaseAliasMap",
)
CUSTOM_OP_VERSION = 16  # ≤ the library's version; members past KernelComputeV2 stay NULL (unread at 16)


class OrtCustomOp(ctypes.Structure):
    _fields_ = [("version", c_uint32)] + [(name, c_void_p) for name in CUSTOM_OP_FIELDS]


def library_path() -> str:
    """Path of ``libonnxruntime`` inside the installed onnxruntime wheel (not imported).

    Raises:
        TqedgeError: onnxruntime is not installed or ships no shared library.
    """
    spec = importlib.util.find_spec("onnxruntime")
    if spec is None or not spec.submodule_search_locations:
        raise TqedgeError("the native backend needs onnxruntime (pip install onnxruntime)")
    for root in spec.submodule_search_locations:
        hits = sorted(glob.glob(os.path.join(root, "capi", "libonnxruntime.so*"))
                      + glob.glob(os.path.join(root, "capi", "libonnxruntime*.dylib"))
                      + glob.glob(os.path.join(root, "capi", "onnxruntime.dll")))
        if hits:
            return hits[0]
    raise TqedgeError("the onnxruntime package has no libonnxruntime shared library for the native backend")


class OrtLib:
    """The loaded library and its ``OrtApi`` table: ``addr(name)`` for nopython callers,
    ``fn(name)`` for ctypes callers, ``check(status)`` turning an ``OrtStatus*`` into a TqedgeError."""

    def __init__(self, path: str | None = None):
        self.path = path or library_path()
        self.lib = ctypes.CDLL(self.path)
        self.lib.OrtGetApiBase.restype = POINTER(c_void_p * 2)
        base = self.lib.OrtGetApiBase().contents
        get_api = ctypes.CFUNCTYPE(c_void_p, c_uint32)(base[0])
        self.version = ctypes.CFUNCTYPE(c_char_p)(base[1])().decode()
        self.api = get_api(API_VERSION)
        if not self.api:
            raise TqedgeError(f"onnxruntime {self.version} does not offer C API version {API_VERSION}")
        table = (c_void_p * (max(INDEX.values()) + 1)).from_address(self.api)
        self._addr = {name: table[i] for name, i in INDEX.items()}
        self._fns = {}

    def addr(self, name: str) -> int:
        """Address of an OrtApi function (for nopython code)."""
        return self._addr[name]

    def fn(self, name: str):
        """The OrtApi function ``name`` as a ctypes callable."""
        f = self._fns.get(name)
        if f is None:
            restype, *argtypes = PROTOTYPES[name]
            f = self._fns[name] = ctypes.CFUNCTYPE(restype, *argtypes)(self._addr[name])
        return f

    def check(self, status, what: str = "onnxruntime") -> None:
        """Raise TqedgeError with the status message (and release it) when ``status`` is not NULL."""
        if status:
            msg = self.fn("GetErrorMessage")(status)
            self.fn("ReleaseStatus")(status)
            text = (msg or b"").decode(errors="replace").splitlines()
            raise TqedgeError(f"{what}: {text[0] if text else 'failed'}")

    def call(self, name: str, *args, what: str | None = None) -> None:
        """Call a status-returning function and raise on error."""
        self.check(self.fn(name)(*args), what or name)

    def new(self, name: str, *args, what: str | None = None):
        """Call a creating function whose last argument is the ``Ort*`` out pointer; return it."""
        out = c_void_p()
        self.call(name, *args, ctypes.byref(out), what=what)
        return out.value


class Tensor:
    """An OrtValue over a NumPy array's memory (no copy). Keeps the array alive."""

    __slots__ = ("lib", "array", "shape", "value")

    def __init__(self, lib: OrtLib, memory_info: int, array: np.ndarray):
        if not array.flags.c_contiguous or array.dtype not in DTYPES:
            raise TqedgeError(f"tensor must be C-contiguous float32/float16/uint8/int64, got {array.dtype}")
        self.lib, self.array = lib, array
        self.shape = (c_int64 * max(1, array.ndim))(*array.shape)
        self.value = lib.new("CreateTensorWithDataAsOrtValue", memory_info, array.ctypes.data, array.nbytes,
                             self.shape, array.ndim, DTYPES[array.dtype])

    def release(self) -> None:
        if self.value:
            self.lib.fn("ReleaseValue")(self.value)
            self.value = None

    __del__ = release


def names(lib: OrtLib, session: int, kind: str) -> list[str]:
    """Input (``kind="Input"``) or output names of a session, in order."""
    count = c_size_t()
    lib.call(f"SessionGet{kind}Count", session, ctypes.byref(count))
    alloc = lib.new("GetAllocatorWithDefaultOptions")
    out = []
    for i in range(count.value):
        p = c_char_p()
        lib.call(f"SessionGet{kind}Name", session, i, alloc, ctypes.byref(p))
        out.append(p.value.decode())
        lib.call("AllocatorFree", alloc, ctypes.cast(p, c_void_p))
    return out


def tensor_to_numpy(lib: OrtLib, value: int, dtype=np.float32) -> np.ndarray:
    """Copy an ORT-allocated output tensor into a new NumPy array."""
    info = lib.new("GetTensorTypeAndShape", value)
    try:
        n = c_size_t()
        lib.call("GetDimensionsCount", info, ctypes.byref(n))
        dims = (c_int64 * max(1, n.value))()
        lib.call("GetDimensions", info, dims, n.value)
    finally:
        lib.fn("ReleaseTensorTypeAndShapeInfo")(info)
    shape = tuple(dims[i] for i in range(n.value))
    data = lib.new("GetTensorMutableData", value)
    count = int(np.prod(shape, dtype=np.int64))
    buf = (ctypes.c_char * (count * np.dtype(dtype).itemsize)).from_address(data) if count else b""
    return np.frombuffer(bytes(buf), dtype=dtype).reshape(shape)


class Session:
    """One onnxruntime session created through the C API, with custom ops registered.

    Owns its env reference, session options, custom-op domain and CPU memory info, and keeps
    the ``custom_ops`` objects alive as long as it lives (ORT keeps pointers into them).

    Args:
        lib: the loaded library.
        model_path: the ``.onnx`` file.
        custom_ops: objects with an ``address`` (``OrtCustomOp*``), registered in ``domain``.
        threads: intra-op threads (None = onnxruntime's default).
        config: session config entries (``"session.intra_op.allow_spinning": "0"`` …).
    """

    def __init__(self, lib: OrtLib, model_path, custom_ops=(), domain: str = CUSTOM_DOMAIN,
                 threads: int | None = None, config: dict | None = None):
        self.lib, self.ops = lib, list(custom_ops)
        self.env = self.options = self.domain = self.session = self.memory_info = None
        try:
            self.env = lib.new("CreateEnv", LOG_ERROR, b"tqedge")
            self.options = so = lib.new("CreateSessionOptions")
            lib.call("SetSessionGraphOptimizationLevel", so, ORT_ENABLE_ALL)
            lib.call("SetSessionExecutionMode", so, ORT_SEQUENTIAL)
            lib.call("SetInterOpNumThreads", so, 1)
            if threads:
                lib.call("SetIntraOpNumThreads", so, int(threads))
            lib.call("SetSessionLogSeverityLevel", so, LOG_ERROR)
            for key, value in (config or {}).items():
                lib.call("AddSessionConfigEntry", so, key.encode(), str(value).encode())
            if self.ops:
                self.domain = lib.new("CreateCustomOpDomain", domain.encode())
                for op in self.ops:
                    lib.call("CustomOpDomain_Add", self.domain, op.address)
                lib.call("AddCustomOpDomain", so, self.domain)
            self.session = lib.new("CreateSession", self.env, os.fsencode(str(model_path)), so,
                                   what=f"cannot load {os.path.basename(str(model_path))}")
            self.memory_info = lib.new("CreateCpuMemoryInfo", ARENA_ALLOCATOR, MEM_TYPE_DEFAULT)
        except BaseException:
            self.close()
            raise
        self.inputs = names(lib, self.session, "Input")
        self.outputs = names(lib, self.session, "Output")

    def tensor(self, array: np.ndarray) -> Tensor:
        """An OrtValue over ``array`` (no copy)."""
        return Tensor(self.lib, self.memory_info, array)

    def run(self, feeds: dict, outputs: list[str]) -> list[np.ndarray]:
        """Run with NumPy inputs by name; return copies of the named outputs."""
        lib = self.lib
        arrays = [np.ascontiguousarray(feeds[n]) for n in self.inputs]
        tensors = [self.tensor(a) for a in arrays]
        in_names = (c_char_p * len(tensors))(*[n.encode() for n in self.inputs])
        in_vals = (c_void_p * len(tensors))(*[t.value for t in tensors])
        out_names = (c_char_p * len(outputs))(*[n.encode() for n in outputs])
        out_vals = (c_void_p * len(outputs))()
        try:
            lib.call("Run", self.session, None, in_names, in_vals, len(tensors), out_names, len(outputs),
                     out_vals, what="onnxruntime run failed")
            return [tensor_to_numpy(lib, v) for v in out_vals]
        finally:
            for v in out_vals:
                if v:
                    lib.fn("ReleaseValue")(v)
            for t in tensors:
                t.release()

    def close(self) -> None:
        """Release the session, then what it was built from (idempotent)."""
        lib = self.lib
        for attr, release in (("session", "ReleaseSession"), ("options", "ReleaseSessionOptions"),
                              ("domain", "ReleaseCustomOpDomain"), ("memory_info", "ReleaseMemoryInfo"),
                              ("env", "ReleaseEnv")):
            handle = getattr(self, attr, None)
            if handle:
                lib.fn(release)(handle)
                setattr(self, attr, None)

    __del__ = close

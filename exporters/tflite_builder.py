"""A small writer for TFLite flatbuffers, on top of the schema's generated object API.

The object API (``schema_py_generated``) ships inside ``ai-edge-litert``; writing a model with it
needs only the ``flatbuffers`` package, never TensorFlow. This module knows nothing about
language models: it holds constant buffers, subgraphs of tensors and operators, and signatures,
and serializes them.

File layout: the flatbuffer first, then every constant buffer's bytes, each at a 64-byte
aligned file offset, referenced through ``Buffer.offset``/``Buffer.size`` (the schema's
"data outside the flatbuffer" form, also used for models > 2 GB). The interpreter maps the
file and reads the weights in place, so subgraphs that share a buffer share its memory.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path

import flatbuffers
import numpy as np

from tqedge.errors import TqedgeError

try:
    from ai_edge_litert import schema_py_generated as schema
except ImportError:  # pragma: no cover - depends on the optional extra
    schema = None

log = logging.getLogger(__name__)

ALIGN = 64  # byte alignment of every constant buffer in the file
SCHEMA_VERSION = 3

_DTYPES = {
    np.dtype(np.float32): "FLOAT32",
    np.dtype(np.float16): "FLOAT16",
    np.dtype(np.int32): "INT32",
    np.dtype(np.int64): "INT64",
    np.dtype(np.int8): "INT8",
    np.dtype(np.uint8): "UINT8",
}


def require_schema():
    """Return the generated schema module, or raise when ai-edge-litert is missing."""
    if schema is None:
        raise TqedgeError("writing .tflite files needs ai-edge-litert (pip install 'tqedge[tflite]')")
    return schema


def tensor_type(dtype) -> int:
    """TFLite ``TensorType`` enum value of a numpy dtype."""
    name = _DTYPES.get(np.dtype(dtype))
    if name is None:
        raise TqedgeError(f"no TFLite tensor type for numpy dtype {np.dtype(dtype)}")
    return getattr(require_schema().TensorType, name)


@dataclass
class Quant:
    """Per-axis affine quantization of a constant (symmetric when zero points are 0)."""

    scale: np.ndarray  # float32 (C,)
    zero_point: np.ndarray  # int64 (C,)
    axis: int = 0


class Subgraph:
    """Tensors and operators of one subgraph; tensors are addressed by unique name."""

    def __init__(self, model: "ModelBuilder", name: str):
        self.model, self.name = model, name
        self.tensors: list = []
        self.index: dict[str, int] = {}
        self.operators: list = []
        self.inputs: list[str] = []
        self.outputs: list[str] = []

    def tensor(self, name: str, shape, dtype=np.float32, buffer: int = 0, quant: Quant | None = None,
               dynamic_first: bool = False) -> str:
        """Declare a tensor. ``dynamic_first`` marks dim 0 as resizable (shape signature -1)."""
        if name in self.index:
            raise TqedgeError(f"tflite writer: tensor {name!r} declared twice in subgraph {self.name}")
        s = require_schema()
        t = s.TensorT()
        t.name, t.type, t.buffer = name, tensor_type(dtype), buffer
        shape = [int(d) for d in shape]
        t.shape = [1 if d < 0 else d for d in shape]
        if dynamic_first or any(d < 0 for d in shape):
            t.shapeSignature = [-1 if (dynamic_first and i == 0) or d < 0 else d for i, d in enumerate(shape)]
        if quant is not None:
            q = s.QuantizationParametersT()
            q.scale = [float(x) for x in quant.scale]
            q.zeroPoint = [int(x) for x in quant.zero_point]
            q.quantizedDimension = quant.axis
            t.quantization = q
        self.index[name] = len(self.tensors)
        self.tensors.append(t)
        return name

    def const(self, name: str, array: np.ndarray, quant: Quant | None = None) -> str:
        """Declare a constant tensor whose data goes into a (deduplicated) model buffer."""
        array = np.ascontiguousarray(array)
        return self.tensor(name, array.shape, array.dtype, self.model.buffer(array), quant)

    def has(self, name: str) -> bool:
        return name in self.index

    def op(self, code: str, inputs: list[str | None], outputs: list[str], options=None,
           custom: str | None = None, custom_options: bytes | None = None) -> None:
        """Append an operator. ``code`` is a ``BuiltinOperator`` name (or "CUSTOM" with ``custom``);
        ``options`` a generated ``*OptionsT`` object; ``None`` inputs are omitted optionals (-1)."""
        s = require_schema()
        o = s.OperatorT()
        o.opcodeIndex = self.model.opcode(code, custom)
        o.inputs = [-1 if n is None else self.index[n] for n in inputs]
        o.outputs = [self.index[n] for n in outputs]
        if options is not None:
            kind = type(options).__name__[:-1]  # "FullyConnectedOptionsT" -> "FullyConnectedOptions"
            o.builtinOptionsType = getattr(s.BuiltinOptions, kind)
            o.builtinOptions = options
        if custom_options is not None:
            o.customOptions = list(custom_options)
            o.customOptionsFormat = s.CustomOptionsFormat.FLEXBUFFERS
        self.operators.append(o)

    def pack(self):
        s = require_schema()
        g = s.SubGraphT()
        g.name, g.tensors, g.operators = self.name, self.tensors, self.operators
        g.inputs = [self.index[n] for n in self.inputs]
        g.outputs = [self.index[n] for n in self.outputs]
        return g


@dataclass
class ModelBuilder:
    """A whole .tflite model: subgraphs, signatures and shared constant buffers."""

    description: str = "tqedge"
    subgraphs: list[Subgraph] = field(default_factory=list)
    signatures: list[tuple[str, int]] = field(default_factory=list)  # (key, subgraph index)
    _data: list[np.ndarray] = field(default_factory=list)  # buffer i+1 -> bytes
    _dedup: dict[bytes, int] = field(default_factory=dict)
    _opcodes: dict[tuple[str, str | None], int] = field(default_factory=dict)

    def subgraph(self, name: str) -> Subgraph:
        g = Subgraph(self, name)
        self.subgraphs.append(g)
        return g

    def sign(self, key: str, graph: Subgraph) -> None:
        """Expose ``graph`` (inputs/outputs by tensor name) as signature ``key``."""
        self.signatures.append((key, self.subgraphs.index(graph)))

    def buffer(self, array: np.ndarray) -> int:
        """Index of a buffer holding ``array``'s bytes; identical constants share one buffer."""
        raw = np.ascontiguousarray(array).view(np.uint8).reshape(-1)
        key = hashlib.sha1(raw.data).digest() + str(array.dtype).encode() + str(raw.size).encode()
        if key not in self._dedup:
            self._data.append(raw)
            self._dedup[key] = len(self._data)  # buffer 0 is the empty sentinel
        return self._dedup[key]

    def opcode(self, code: str, custom: str | None = None) -> int:
        key = (code, custom)
        if key not in self._opcodes:
            self._opcodes[key] = len(self._opcodes)
        return self._opcodes[key]

    # -- serialization ---------------------------------------------------------------------
    def _model(self, offsets: list[int]):
        s = require_schema()
        m = s.ModelT()
        m.version, m.description = SCHEMA_VERSION, self.description
        codes = []
        for (code, custom), _ in sorted(self._opcodes.items(), key=lambda kv: kv[1]):
            oc = s.OperatorCodeT()
            value = getattr(s.BuiltinOperator, code)
            oc.builtinCode, oc.deprecatedBuiltinCode = value, min(value, 127)
            oc.version, oc.customCode = 1, custom
            codes.append(oc)
        m.operatorCodes = codes
        m.subgraphs = [g.pack() for g in self.subgraphs]
        bufs = [s.BufferT()]
        for raw, off in zip(self._data, offsets):
            b = s.BufferT()
            b.offset, b.size = off, raw.size
            bufs.append(b)
        m.buffers = bufs
        sigs = []
        for key, gi in self.signatures:
            g = self.subgraphs[gi]
            sd = s.SignatureDefT()
            sd.signatureKey, sd.subgraphIndex = key, gi
            sd.inputs = [_tensor_map(n, g.index[n]) for n in g.inputs]
            sd.outputs = [_tensor_map(n, g.index[n]) for n in g.outputs]
            sigs.append(sd)
        m.signatureDefs = sigs
        return m

    def _pack(self, offsets: list[int]) -> bytes:
        b = flatbuffers.Builder(1 << 20)
        b.ForceDefaults(True)  # keep every offset/size field so the size does not depend on values
        b.Finish(self._model(offsets).Pack(b), file_identifier=b"TFL3")
        return bytes(b.Output())

    def _layout(self, start: int) -> list[int]:
        offs, pos = [], start
        for raw in self._data:
            pos = _align(pos)
            offs.append(pos)
            pos += raw.size
        return offs

    def write(self, path: str | Path) -> int:
        """Write the model to ``path``; returns its size in bytes."""
        head = self._pack(self._layout(1 << 40))  # placeholder offsets of the final byte width
        start = _align(len(head))
        head = self._pack(self._layout(start))
        if len(head) > start:
            raise TqedgeError("tflite writer: flatbuffer size changed between passes")
        path = Path(path)
        with open(path, "wb") as f:
            f.write(head)
            for raw, off in zip(self._data, self._layout(start)):
                f.write(b"\0" * (off - f.tell()))
                f.write(raw.data)
        size = path.stat().st_size
        log.info("wrote %s: %d subgraphs, %d buffers, %.1f MB", path, len(self.subgraphs),
                 len(self._data), size / 1e6)
        return size


def _tensor_map(name: str, index: int):
    tm = require_schema().TensorMapT()
    tm.name, tm.tensorIndex = name, index
    return tm


def _align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN

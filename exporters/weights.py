"""Weight formats for the ONNX graphs, and the shared external weights file.

:class:`WeightStore` appends every initializer once to ``weights.bin`` (64-byte aligned) and
hands out ``TensorProto``s that point into it, so the cut segments and the uncut ``model.onnx``
share one copy on disk. :data:`LINEAR_FORMATS` maps a weight format to a function that emits
``y = x @ W.T`` for an (out, in) weight:

- ``fp32``: ``MatMul`` with W.T stored float32.
- ``fp16``: W.T stored float16, ``Cast`` to float32 in-graph (ORT folds the cast at load, so
  disk halves while compute stays fp32 MLAS).
- ``int8`` / ``int4``: onnxruntime's ``com.microsoft.MatMulNBits`` (blockwise along the input
  dimension, asymmetric, uint zero points, ``accuracy_level`` 4). A GGUF Q4_1 weight
  (d*q + m, blocks of 32) is carried over to int4 exactly — codes and scales as-is, zero
  point 0, plus ``blocksum(x) @ m.T`` with ``m`` stored float16 as in the GGUF — with no
  re-quantization. The uncut graph runs such a linear as one ``LinearQ4_1`` node on the GGUF's
  own blocks, four rows' at a time (:data:`NATIVE_Q4_1_LINEARS`; runtime/native_linear.py), or
  else adds ``m`` with the ``AddBlockOffsets`` op (one node per linear, a fused one included;
  runtime/native_offsets.py); the cut segments with ReduceSum, Cast and MatMul. A GGUF Q8_0
  weight (an 8-bit linear or LM head, the int8 embedding rows) is
  carried over as unsigned codes with zero point 128 in its own blocks of 32: exact, no offsets.
- ``nf4`` / ``nf4-dq``: QLoRA's NormalFloat-4 (absmax per block of 64, codes into
  :data:`NF4_TABLE`) run by onnxruntime's ``com.microsoft.MatMulBnb4`` (``quant_type`` 1).
  ``nf4-dq`` stores the absmax scales double-quantized (runtime/dq_scales.py) in a side file
  the runtime expands into fp32 initializers at load: a disk format, not a memory one.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from tqedge.bundle import BLOCK_OFFSETS_OP, CUSTOM_DOMAIN, LINEAR_Q4_1_OP, RESIDENT_DATA, WEIGHT_BLOCK_SIZES
from tqedge.codec.kernels_linear import group_q4_1
from tqedge.codec.simd_linear import Q4_1_BLOCK, Q4_1_BYTES
from tqedge.codec.simd_linear import ROWS as LINEAR_ROWS
from tqedge.exporters.spec import QuantBlocks
from tqedge.runtime import dq_scales

log = logging.getLogger(__name__)

ALIGN = 64
SMALL = 256  # initializers up to this many bytes stay inside the .onnx file
BLOCK_SIZES = WEIGHT_BLOCK_SIZES  # the one home is tqedge/bundle.py (the planner sizes from it too)
# MatMulNBits accuracy_level: 4 = activations quantized to int8 per block, integer dot products.
# On x86 (AVX2) that is onnxruntime's fast path for both widths; 8-bit weights at level 0 fall
# back to dequantize-per-call (~50x slower).
ACCURACY_LEVELS = {"int8": 4, "int4": 4}
ACCURACY_OVERRIDES: dict[tuple[str, str], int] = {}  # (format, name substring) → level
# The uncut graph runs a carried GGUF Q4_1 linear as one LinearQ4_1 node (runtime/native_linear.py)
# on the file's own blocks, instead of MatMulNBits + AddBlockOffsets; the cut segments keep those.
NATIVE_Q4_1_LINEARS = True


# NormalFloat-4 (QLoRA, bitsandbytes ``nf4``): quantiles of N(0, 1) scaled to [-1, 1], 0 exact.
NF4_TABLE = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0], np.float32)
NF4_BLOCK = WEIGHT_BLOCK_SIZES["nf4"]  # weights per absmax scale (QLoRA's block size)
NF4_FORMATS = ("nf4", "nf4-dq")


def accuracy_level(fmt: str, name: str) -> int:
    """MatMulNBits accuracy_level for linear ``name`` in weight format ``fmt``."""
    for (f, sub), level in ACCURACY_OVERRIDES.items():
        if f == fmt and sub in name:
            return level
    return ACCURACY_LEVELS[fmt]


class WeightStore:
    """Append-only writer of the shared external weights file.

    Args:
        path: the ``weights.bin`` file to create.
        location: its path relative to the .onnx files (written into each TensorProto).
    """

    def __init__(self, path: Path, location: str):
        self.path, self.location = Path(path), location
        self._f = open(self.path, "wb")
        self._resident = None  # RESIDENT_DATA beside it, opened by the first resident tensor
        self._index: dict[str, tuple[int, int, int, tuple[int, ...], str]] = {}
        self._small: dict[str, TensorProto] = {}
        self._deferred: dict[str, np.ndarray] = {}
        self._segment_of: dict[str, int] = {}

    def tensor(self, name: str, array, resident: bool = False) -> TensorProto:
        """A TensorProto for ``array`` (or a zero-argument function returning it, called only the
        first time ``name`` is seen); large arrays are written once to the file and referenced.
        ``resident``: into :data:`~tqedge.bundle.RESIDENT_DATA` instead (a native op's weight that
        the runtime keeps in memory, never releases)."""
        if name in self._small:
            return self._small[name]
        if name not in self._index:
            array = np.ascontiguousarray(array() if callable(array) else array)
            if array.nbytes <= SMALL:
                self._small[name] = numpy_helper.from_array(array, name)
                return self._small[name]
            if resident and self._resident is None:
                self._resident = open(self.path.parent / RESIDENT_DATA, "wb")
            f, location = (self._resident, RESIDENT_DATA) if resident else (self._f, self.location)
            f.write(b"\0" * ((-f.tell()) % ALIGN))
            offset = f.tell()
            f.write(array.tobytes())
            dtype = helper.np_dtype_to_tensor_dtype(array.dtype)
            self._index[name] = (offset, array.nbytes, dtype, array.shape, location)
        offset, length, dtype, shape, location = self._index[name]
        return _external(name, dtype, shape, location, offset, length)

    def deferred(self, name: str, array) -> TensorProto:
        """A float32 initializer kept out of ``weights.bin``: its data goes double-quantized into
        the side file (runtime/dq_scales.py) and the graph gets a placeholder the runtime fills."""
        if name not in self._deferred:
            a = np.ascontiguousarray(array() if callable(array) else array, dtype=np.float32)
            self._deferred[name] = a
        a = self._deferred[name]
        return _external(name, TensorProto.FLOAT, a.shape, dq_scales.PLACEHOLDER, 0, a.nbytes)

    def mark_segment(self, index: int, names) -> None:
        """Record that segment ``index`` declares the deferred initializers among ``names``."""
        for n in names:
            if n in self._deferred:
                self._segment_of.setdefault(n, index)

    @property
    def files(self) -> list[str]:
        """The data files this store writes (relative to the .onnx files)."""
        return [self.location] + ([RESIDENT_DATA] if self._resident else []) + \
            ([dq_scales.DQ_FILE] if self._deferred else [])

    def view(self, name: str, base: str, shape: tuple[int, ...]) -> TensorProto:
        """A TensorProto named ``name`` reading the bytes of the already stored ``base`` with
        another shape (same dtype and size): one copy on disk serves two ops."""
        if base in self._small:
            return numpy_helper.from_array(numpy_helper.to_array(self._small[base]).reshape(shape), name)
        offset, length, dtype, old, location = self._index[base]
        if int(np.prod(old)) != int(np.prod(shape)):
            raise ValueError(f"view {name}: {shape} does not match {base}'s {old}")
        self._index[name] = (offset, length, dtype, tuple(shape), location)
        return self.tensor(name, None)

    @property
    def nbytes(self) -> int:
        """Bytes written so far to the weight files (including alignment padding)."""
        return sum((Path(f.name).stat().st_size if f.closed else f.tell())
                   for f in (self._f, self._resident) if f is not None)

    def close(self) -> None:
        for f in (self._f, self._resident):
            if f is not None:
                f.flush()
                f.close()
        if self._deferred:  # segment -1: declared only by a graph outside the segment list
            dq_scales.write(self.path.parent / dq_scales.DQ_FILE,
                            {n: (self._segment_of.get(n, -1), a) for n, a in self._deferred.items()})


def _external(name: str, dtype: int, shape, location: str, offset: int, length: int) -> TensorProto:
    t = TensorProto()
    t.name, t.data_type = name, dtype
    t.dims.extend(shape)
    t.data_location = TensorProto.EXTERNAL
    for k, v in (("location", location), ("offset", str(offset)), ("length", str(length))):
        entry = t.external_data.add()
        entry.key, entry.value = k, v
    return t


@dataclass
class LinearArgs:
    """One linear layer to emit: ``out = x @ w.T (+ bias)``."""

    name: str  # readable prefix, e.g. "layers.3.attn.q_proj"
    x: str  # input tensor name, float32 (T, in)
    w: np.ndarray  # float32 (out, in)
    weight_key: str  # store key (canonical name) so a tied weight is written once
    quant: QuantBlocks | None = None


def _fp32(g, a: LinearArgs) -> str:
    wt = g.weight(a.weight_key + ".T", lambda: a.w.T)  # (in, out)
    return g.op("MatMul", [a.x, wt], a.name)


def _fp16(g, a: LinearArgs) -> str:
    wt = g.weight(a.weight_key + ".T.fp16", lambda: a.w.T.astype(np.float16))  # (in, out)
    w32 = g.op("Cast", [wt], a.name + ".w", to=TensorProto.FLOAT)
    return g.op("MatMul", [a.x, w32], a.name)


def quantize_blocks(w: np.ndarray, bits: int, block: int) -> QuantBlocks:
    """Asymmetric min/max block quantization of an (out, in) weight, range widened to include 0.

    Returns:
        QuantBlocks with integer zero points folded into ``min`` (``w ≈ scale*q + min``,
        ``min = -zp*scale``); ``in`` is zero-padded to a multiple of ``block``.
    """
    n, k = w.shape
    kp = -(-k // block) * block
    wp = np.zeros((n, kp), np.float32)
    wp[:, :k] = w
    blocks = wp.reshape(n, kp // block, block)  # (N, nb, bs)
    lo = np.minimum(blocks.min(-1), 0.0)
    hi = np.maximum(blocks.max(-1), 0.0)
    qmax = 2**bits - 1
    scale = np.where(hi > lo, (hi - lo) / qmax, 1.0).astype(np.float32)  # (N, nb)
    zp = np.clip(np.round(-lo / scale), 0, qmax)  # (N, nb)
    q = np.clip(np.round(blocks / scale[..., None]) + zp[..., None], 0, qmax).astype(np.uint8)
    return QuantBlocks(bits=bits, block=block, q=q.reshape(n, kp), scale=scale, min=(-zp * scale).astype(np.float32))


def _pack(qb: QuantBlocks, offsets: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
    """MatMulNBits inputs (B, scales, uint zero points) and, with ``offsets``, the per-block
    minimums.

    Our own blocks have integral zero points (``min = -zp*scale``), and so do carried-over GGUF
    Q8_0 blocks (``qb.zero_point`` 128). Carried-over GGUF Q4_1 blocks (``scale*q + min`` with
    any ``min``) get zero point 0 and return ``min`` transposed, (nb, N), for the exact
    correction ``blocksum(x) @ min.T``: float zero points would also be exact but put
    MatMulNBits on onnxruntime's slow dequantize-per-call path (~25x slower).
    """
    n, kp = qb.q.shape
    nb = kp // qb.block
    if qb.bits == 4:
        q = qb.q.reshape(n, nb, qb.block)
        b = (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8)  # (N, nb, bs/2)
    else:
        b = qb.q.reshape(n, nb, qb.block)  # (N, nb, bs)
    mins = None
    if offsets:
        zi = np.zeros((n, nb), np.uint8)
        mins = np.ascontiguousarray(qb.min.T, dtype=np.float32)  # (nb, N)
    elif qb.zero_point is not None:
        zi = np.full((n, nb), qb.zero_point, np.uint8)
    else:
        zi = np.round(-qb.min / qb.scale).astype(np.uint8)  # (N, nb)
    if qb.bits == 4:
        if nb % 2:
            zi = np.concatenate([zi, np.zeros((n, 1), np.uint8)], 1)
        zpk = (zi[:, 0::2] | (zi[:, 1::2] << 4)).astype(np.uint8).reshape(-1)  # (N*ceil(nb/2),)
    else:
        zpk = zi.reshape(-1)  # (N*nb,)
    return b, qb.scale.astype(np.float32).reshape(-1), zpk, mins


def carried_block(a: LinearArgs, bits: int, block: int) -> int:
    """The block size a ``bits``-wide linear (or gather) of ``a.w`` is emitted with: the source's
    own when its blocks carry over with an integral zero point (GGUF Q8_0: 32, as in the file),
    else the format's ``block``."""
    q = a.quant
    if q is not None and q.bits == bits and q.zero_point is not None and a.w.shape[1] % q.block == 0:
        return q.block
    return block


def _nbits_initializers(g, a: LinearArgs, bits: int, block: int) -> tuple[list[str], bool, Callable]:
    """Register (lazily) the MatMulNBits initializers of ``a.w``: names [B, scales, zero points],
    whether its carried-over GGUF blocks need their minimums added (Q4_1), and a getter of the
    packed parts (3: the minimums)."""
    key = f"{a.weight_key}.q{bits}"
    k = a.w.shape[1]
    carried = a.quant is not None and a.quant.bits == bits and a.quant.block == block and k % block == 0
    offsets = carried and a.quant.zero_point is None
    packed: list = []

    def part(i: int):
        def get():
            if not packed:
                packed.extend(_pack(a.quant if carried else quantize_blocks(a.w, bits, block), offsets))
            return packed[i]
        return get

    names = [g.weight(key, part(0)), g.weight(key + ".scales", part(1)), g.weight(key + ".zp", part(2))]
    return names, offsets, part


def quantized_gather(g, a: LinearArgs, bits: int, block: int, indices: str) -> str:
    """Rows ``a.w[indices]`` (float32 (T, K)) through ``com.microsoft.GatherBlockQuantized``,
    reading the very bytes of ``a.w``'s MatMulNBits initializers (codes, scales and zero points
    viewed as (N, ·) tables): a tied LM head and the embedding share one copy.
    GGUF Q4_1 blocks (float minimums) are re-quantized under their own names; Q8_0 blocks are
    gathered as they are (:func:`carried_block`)."""
    n, k = a.w.shape
    block = carried_block(a, bits, block)
    if a.quant is not None and a.quant.bits == bits and a.quant.block == block and k % block == 0 \
            and a.quant.zero_point is None:
        a = LinearArgs(a.name, a.x, a.w, a.weight_key + ".gather", None)
    class StoreOnly:  # the bases go to weights.bin but not into this graph (its nodes read the views)
        @staticmethod
        def weight(name, array):
            g.store.tensor(name, array)
            return name

    (b, sc, zp), _, _ = _nbits_initializers(StoreOnly, a, bits, block)
    nb = -(-k // block)
    zp_cols = nb if bits == 8 else -(-nb // 2)
    views = []
    for name, shape in ((b, (n, nb * block * bits // 8)), (sc, (n, nb)), (zp, (n, zp_cols))):
        views.append(name + ".rows")
        g.inits.setdefault(views[-1], g.store.view(views[-1], name, shape))
    return g.op("GatherBlockQuantized", [views[0], indices, views[1], views[2]], a.name, domain="com.microsoft",
                bits=bits, block_size=block, gather_axis=0, quantize_axis=1)


def _float16_mins(mins: np.ndarray) -> np.ndarray:
    """Carried-over block minimums (or scales) as float16: what a Q4_1 GGUF stores, so no
    rounding; refuses values that are not halves (they would not come from a GGUF block)."""
    m16 = mins.astype(np.float16)
    if not np.array_equal(m16.astype(np.float32), mins, equal_nan=True):
        raise ValueError("carried-over block minimums or scales are not float16 values "
                         "(only GGUF Q4_1 blocks are carried)")
    return m16


def q4_1_groups(qb: QuantBlocks) -> np.ndarray:
    """A carried-over GGUF Q4_1 weight's blocks as the file stores them (float16 ``d`` and ``m``,
    then byte ``j`` = code ``j`` | code ``j + 16`` << 4), 16 rows' blocks at a time as group
    blocks: the ``LinearQ4_1`` op's weight (N / 16, K / 32 · 320) uint8
    (:func:`tqedge.codec.kernels_linear.group_q4_1`). Exact: ``d`` and ``m`` came from halves."""
    n, k = qb.q.shape
    nb = k // Q4_1_BLOCK
    d, m = _float16_mins(qb.scale), _float16_mins(qb.min)
    blocks = np.empty((n, nb, Q4_1_BYTES), np.uint8)
    blocks[..., 0:2] = d.reshape(n, nb, 1).view(np.uint8)
    blocks[..., 2:4] = m.reshape(n, nb, 1).view(np.uint8)
    q = qb.q.reshape(n, nb, Q4_1_BLOCK)
    blocks[..., 4:] = q[..., :16] | (q[..., 16:] << 4)
    return group_q4_1(blocks.reshape(n, nb * Q4_1_BYTES))


def _linear_q4_1(g, a: LinearArgs, bits: int, block: int) -> bool:
    """Whether linear ``a`` of graph ``g`` is one ``LinearQ4_1`` node: the uncut graph, a carried
    GGUF Q4_1 weight (float minimums, blocks of 32) and whole groups of 16 rows."""
    q = a.quant
    return (g.native and NATIVE_Q4_1_LINEARS and bits == 4 and q is not None and q.bits == 4
            and q.zero_point is None and q.block == block == Q4_1_BLOCK and a.w.shape[0] % LINEAR_ROWS == 0
            and a.w.shape[1] % Q4_1_BLOCK == 0)


def _nbits(bits: int, fmt: str) -> Callable:
    def emit(g, a: LinearArgs) -> str:
        block = carried_block(a, bits, BLOCK_SIZES[fmt])
        key = f"{a.weight_key}.q{bits}"
        n, k = a.w.shape
        if _linear_q4_1(g, a, bits, block):
            wg = g.weight(f"{key}.x{LINEAR_ROWS}", lambda: q4_1_groups(a.quant), resident=True)
            return g.op(LINEAR_Q4_1_OP, [a.x, wg], a.name, domain=CUSTOM_DOMAIN)
        names, offsets, part = _nbits_initializers(g, a, bits, block)
        ins = [a.x, *names]
        y = g.op("MatMulNBits", ins, a.name + (".q" if offsets else ""), domain="com.microsoft",
                 K=k, N=n, bits=bits, block_size=block, accuracy_level=accuracy_level(fmt, a.name))
        if not offsets:
            return y
        mins = g.weight(key + ".mins", lambda: _float16_mins(part(3)()))  # (nb, N), the GGUF's own halves
        if g.native:
            return g.op(BLOCK_OFFSETS_OP, [y, a.x, mins], a.name, domain=CUSTOM_DOMAIN)

        def block_sums() -> str:  # (T, nb): one per input, shared by the linears reading it (q/k/v, gate/up)
            xb = g.op("Reshape", [a.x, g.const(f"shape.blocks{k // block}x{block}", [0, k // block, block])],
                      a.name + ".xblocks")  # (T, nb, bs)
            return g.op("ReduceSum", [xb, g.const("axes.-1", [-1])], a.name + ".xsum", keepdims=0)

        xs = g.once(("block_sums", a.x, k, block), block_sums)
        m32 = g.op("Cast", [mins], a.name + ".mins32", to=TensorProto.FLOAT)  # folded by onnxruntime at load
        corr = g.op("MatMul", [xs, m32], a.name + ".offset")  # (T, N)
        return g.op("Add", [y, corr], a.name)

    return emit


def quantize_nf4(w: np.ndarray, block: int = NF4_BLOCK) -> tuple[np.ndarray, np.ndarray]:
    """NF4-quantize an (N, K) weight the way ``MatMulBnb4`` reads it: blocks of ``block`` over
    the flattened weight, each scaled by its absmax, every value rounded to the nearest entry of
    :data:`NF4_TABLE` (a tie goes to the lower code, like onnxruntime's and bitsandbytes'
    quantizer).

    Returns:
        ``(packed, absmax)``: uint8 ((N*K+1)//2,), two codes per byte, the even flat index in
        the high nibble; float32 absmax (ceil(N*K/block),).
    """
    flat = np.asarray(w, np.float32).reshape(-1)
    nb = -(-flat.size // block)
    blocks = np.zeros(nb * block, np.float32)
    blocks[: flat.size] = flat
    blocks = blocks.reshape(nb, block)
    absmax = np.abs(blocks).max(1)
    scaled = blocks / np.where(absmax > 0, absmax, 1.0)[:, None]
    codes = np.searchsorted((NF4_TABLE[1:] + NF4_TABLE[:-1]) / 2, scaled, side="left").astype(np.uint8)
    codes = codes.reshape(-1)[: flat.size]
    if codes.size % 2:
        codes = np.append(codes, np.uint8(7))  # code 7 is 0.0
    return (codes[0::2] << 4 | codes[1::2]).astype(np.uint8), absmax.astype(np.float32)


def dequantize_nf4(packed: np.ndarray, absmax: np.ndarray, shape: tuple[int, int], block: int = NF4_BLOCK) -> np.ndarray:
    """float32 (N, K) weight from :func:`quantize_nf4`'s output."""
    n = shape[0] * shape[1]
    codes = np.stack([packed >> 4, packed & 0xF], 1).reshape(-1)[:n]
    return (NF4_TABLE[codes] * np.repeat(absmax, block)[:n]).reshape(shape)


def _nf4(double_quant: bool) -> Callable:
    def emit(g, a: LinearArgs) -> str:
        n, k = a.w.shape
        key = f"{a.weight_key}.nf4"
        packed: list = []

        def part(i: int):
            def get():
                if not packed:
                    packed.extend(quantize_nf4(a.w))
                return packed[i]
            return get

        b = g.weight(key, part(0))
        absmax = key + ".absmax"
        if double_quant:
            if absmax not in g.inits:
                g.inits[absmax] = g.store.deferred(absmax, part(1))
        else:
            g.weight(absmax, part(1))
        return g.op("MatMulBnb4", [a.x, b, absmax], a.name, domain="com.microsoft", K=k, N=n,
                    block_size=NF4_BLOCK, quant_type=1)  # quant_type 1 = NF4

    return emit


LINEAR_FORMATS: dict[str, Callable] = {
    "fp32": _fp32, "fp16": _fp16, "int8": _nbits(8, "int8"), "int4": _nbits(4, "int4"),
    "nf4": _nf4(False), "nf4-dq": _nf4(True),
}
# dtype of the embedding gather table of the formats that keep a float one (tqedge/bundle.py:
# EMBED_QUANTIZED names the others)
EMBED_DTYPES = {"fp32": np.float32, "fp16": np.float16, "int8": np.float16}

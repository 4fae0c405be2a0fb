"""Llama-family building blocks as TFLite builtin ops (RMSNorm, linear, RoPE, SwiGLU, embedding).

Each helper appends operators to one :class:`~tqedge.exporters.tflite_builder.Subgraph` and
returns the name of its output tensor. Activations carry a resizable first dimension (T, or n
for the logits rows); everything else is static.

Weights are dense float32 (``fp32``); float16 (``fp16``: stored half, widened by a
DEQUANTIZE op that TFLite folds once at load and XNNPACK fuses into its packed fp32 weights —
halves the file, not the RAM); or int8 with one symmetric scale per output channel (``int8``):
TFLite runs an int8-weight FULLY_CONNECTED with float input as a *hybrid* (dynamic-range)
kernel that quantizes the activations per row on the fly.
"""

from __future__ import annotations

import numpy as np

from tqedge.errors import TqedgeError
from tqedge.exporters.tflite_builder import Quant, Subgraph, require_schema

TFLITE_WEIGHTS = ("fp32", "fp16", "int8")


def quantize_per_channel(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 quantization with one scale per row (output channel).

    Args:
        w: float32 (out, in).

    Returns:
        ``(q, scale)``: int8 (out, in) and float32 (out,), with ``w ≈ q * scale[:, None]``.
    """
    amax = np.abs(w).max(axis=1)  # (out,)
    scale = np.where(amax > 0, amax / 127.0, 1.0).astype(np.float32)  # (out,)
    q = np.clip(np.rint(w / scale[:, None]), -127, 127).astype(np.int8)  # (out, in)
    return q, scale


class WeightStore:
    """Prepared weights of one export (quantized once, shared by every subgraph that uses them)."""

    def __init__(self, weights: dict[str, np.ndarray], fmt: str):
        if fmt not in TFLITE_WEIGHTS:
            raise TqedgeError(f"tflite export supports weights {', '.join(TFLITE_WEIGHTS)}, not {fmt!r}")
        self.weights, self.fmt = weights, fmt
        self._cache: dict[str, tuple[np.ndarray, np.ndarray | None]] = {}

    def get(self, name: str) -> np.ndarray:
        try:
            return self.weights[name]
        except KeyError:
            raise TqedgeError(f"model is missing tensor {name}") from None

    def linear(self, names: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray | None]:
        """Rows of the named (out, in) weights stacked (fused projections), in the store's format."""
        key = "+".join(names)
        if key not in self._cache:
            w = np.concatenate([self.get(n) for n in names], axis=0).astype(np.float32)  # (out, in)
            if self.fmt == "int8":
                self._cache[key] = quantize_per_channel(w)
            else:
                self._cache[key] = (w.astype(np.float16) if self.fmt == "fp16" else w, None)
        return self._cache[key]


class Ops:
    """Op emission into one subgraph, with fresh names under ``prefix``."""

    def __init__(self, g: Subgraph, store: WeightStore, prefix: str):
        self.g, self.store, self.prefix, self.s = g, store, prefix, require_schema()
        self._n = 0

    # -- tensors --------------------------------------------------------------------------
    def act(self, shape, dtype=np.float32, name: str | None = None) -> str:
        """A new activation tensor (dim 0 resizable); ``name`` defaults to a fresh one."""
        if name is None:
            self._n += 1
            name = f"{self.prefix}/t{self._n}"
        return self.g.tensor(name, [-1, *shape[1:]], dtype, dynamic_first=True)

    def const(self, array: np.ndarray, name: str | None = None, quant: Quant | None = None) -> str:
        """A constant; small ones are named by value so a subgraph declares each once."""
        array = np.asarray(array)
        name = name or f"const/{array.dtype}/{array.shape}/{array.reshape(-1).tolist()}"
        if self.g.has(name):
            return name
        return self.g.const(name, array, quant)

    def _ints(self, values) -> str:
        return self.const(np.asarray(values, np.int32))

    def widen(self, name: str, shape) -> str:
        """float32 view of the float16 constant ``name`` (a DEQUANTIZE op, folded at load)."""
        out = name + ".fp32"
        if not self.g.has(out):
            self.g.tensor(out, shape, np.float32)
            self.g.op("DEQUANTIZE", [name], [out])
        return out

    # -- elementwise and shape ops --------------------------------------------------------
    def binary(self, code: str, a: str, b: str, shape) -> str:
        out = self.act(shape)
        opts = getattr(self.s, f"{code.title()}OptionsT")()
        self.g.op(code, [a, b], [out], opts)
        return out

    def unary(self, code: str, x: str, shape, dtype=np.float32) -> str:
        out = self.act(shape, dtype)
        self.g.op(code, [x], [out])
        return out

    def reshape(self, x: str, shape, name: str | None = None) -> str:
        out = self.act(shape, name=name)
        self.g.op("RESHAPE", [x, self._ints([-1, *shape[1:]])], [out])
        return out

    def gather(self, params: str, indices: str, shape, dtype=np.float32, name: str | None = None) -> str:
        out = self.act(shape, dtype, name=name)
        opts = self.s.GatherOptionsT()
        opts.axis = 0
        self.g.op("GATHER", [params, indices], [out], opts)
        return out

    def slice_last(self, x: str, start: int, size: int, shape, name: str | None = None) -> str:
        """``x[..., start:start+size]`` for a tensor of rank ``len(shape)`` (STRIDED_SLICE:
        unlike SLICE and SPLIT_V it stays inside XNNPACK's partitions)."""
        r = len(shape)
        out = self.act([*shape[:-1], size], name=name)
        opts = self.s.StridedSliceOptionsT()
        opts.beginMask = opts.endMask = (1 << (r - 1)) - 1  # every leading axis whole
        ins = [x, self._ints([0] * (r - 1) + [start]), self._ints([0] * (r - 1) + [start + size]), self._ints([1] * r)]
        self.g.op("STRIDED_SLICE", ins, [out], opts)
        return out

    def split_last(self, x: str, sizes: list[int], shape) -> list[str]:
        """Split the last axis of ``x`` into pieces of ``sizes`` (SPLIT when equal, else slices)."""
        if len(set(sizes)) > 1:
            starts = np.cumsum([0, *sizes[:-1]])
            return [self.slice_last(x, int(a), n, shape) for a, n in zip(starts, sizes)]
        outs = [self.act([*shape[:-1], sizes[0]]) for _ in sizes]
        opts = self.s.SplitOptionsT()
        opts.numSplits = len(sizes)
        self.g.op("SPLIT", [self.const(np.int32(len(shape) - 1)), x], outs, opts)
        return outs

    def concat_last(self, xs: list[str], shape) -> str:
        out = self.act(shape)
        opts = self.s.ConcatenationOptionsT()
        opts.axis = len(shape) - 1
        self.g.op("CONCATENATION", xs, [out], opts)
        return out

    # -- model blocks ----------------------------------------------------------------------
    def linear(self, x: str, names: tuple[str, ...], bias: tuple[str, ...] | None = None,
               name: str | None = None) -> tuple[str, int]:
        """Fused ``x @ W.T (+ b)`` for the row-stacked weights ``names``; returns (output, out_dim)."""
        w, scale = self.store.linear(names)
        key = "+".join(names)
        quant = None if scale is None else Quant(scale, np.zeros(len(scale), np.int64), axis=0)
        wt = self.const(w, name=key, quant=quant)  # (out, in)
        if w.dtype == np.float16:
            wt = self.widen(wt, w.shape)
        b = None
        if bias:
            b = self.const(np.concatenate([self.store.get(n) for n in bias]).astype(np.float32), name="+".join(bias))
        out_dim = w.shape[0]
        out = self.act([-1, out_dim], name=name)  # (T, out)
        opts = self.s.FullyConnectedOptionsT()
        opts.asymmetricQuantizeInputs = scale is not None
        self.g.op("FULLY_CONNECTED", [x, wt, b], [out], opts)
        return out, out_dim

    def rms_norm(self, x: str, weight: str, dim: int, eps: float) -> str:
        """``x * rsqrt(mean(x²) + eps) * w`` over the last axis of (T, dim)."""
        sq = self.binary("MUL", x, x, [-1, dim])  # (T, dim)
        ms = self.act([-1, 1])  # (T, 1)
        opts = self.s.ReducerOptionsT()
        opts.keepDims = True
        self.g.op("MEAN", [sq, self._ints([-1])], [ms], opts)
        var = self.binary("ADD", ms, self.const(np.float32(eps)), [-1, 1])
        inv = self.unary("RSQRT", var, [-1, 1])  # (T, 1)
        xn = self.binary("MUL", x, inv, [-1, dim])
        return self.binary("MUL", xn, self.const(self.store.get(weight).astype(np.float32), name=weight), [-1, dim])

    def rope_tables(self, positions: str, inv_freq: np.ndarray, cos_name: str, sin_name: str) -> tuple[str, str]:
        """cos/sin (T, 1, D) of ``positions`` (T,) int64, rotate-half layout ``[f, f]``."""
        d = 2 * len(inv_freq)
        pos = self.unary("CAST", positions, [-1], np.float32)  # (T,)
        pos = self.reshape(pos, [-1, 1])  # (T, 1)
        inv = np.concatenate([inv_freq, inv_freq]).astype(np.float32)[None]  # (1, D)
        ang = self.binary("MUL", pos, self.const(inv, name="rope.inv_freq"), [-1, d])  # (T, D)
        cos = self.reshape(self.unary("COS", ang, [-1, d]), [-1, 1, d], name=cos_name)  # (T, 1, D)
        sin = self.reshape(self.unary("SIN", ang, [-1, d]), [-1, 1, d], name=sin_name)  # (T, 1, D)
        return cos, sin

    def rope(self, x: str, heads: int, d: int, cos: str, sin: str, name: str) -> str:
        """``x * cos + rotate_half(x) * sin`` for x (T, heads, D)."""
        shape = [-1, heads, d]
        lo, hi = self.split_last(x, [d // 2, d // 2], shape)  # (T, H, D/2) each
        rot = self.concat_last([self.unary("NEG", hi, [-1, heads, d // 2]), lo], shape)  # (T, H, D)
        a = self.binary("MUL", x, cos, shape)
        b = self.binary("MUL", rot, sin, shape)
        out = self.act(shape, name=name)
        self.g.op("ADD", [a, b], [out], self.s.AddOptionsT())
        return out

    def embed(self, ids: str, name: str, vocab: int, dim: int, out_name: str) -> str:
        """Rows ``ids`` (T,) of the (vocab, dim) table; int8 tables are scaled back per row."""
        w, scale = self.store.linear((name,))
        if w.dtype == np.float16:
            rows = self.gather(self.const(w, name=name), ids, [-1, dim], np.float16)  # (T, dim) fp16
            out = self.act([-1, dim], name=out_name)
            self.g.op("CAST", [rows], [out])
            return out
        if scale is None:
            return self.gather(self.const(w, name=name), ids, [-1, dim], name=out_name)
        quant = Quant(scale, np.zeros(len(scale), np.int64), axis=0)
        rows = self.gather(self.const(w, name=name, quant=quant), ids, [-1, dim], np.int8)  # (T, dim) int8
        rows = self.unary("CAST", rows, [-1, dim])  # (T, dim)
        s = self.gather(self.const(scale.reshape(vocab, 1), name=name + ".scale"), ids, [-1, 1])  # (T, 1)
        out = self.act([-1, dim], name=out_name)
        self.g.op("MUL", [rows, s], [out], self.s.MulOptionsT())
        return out

    def swiglu(self, x: str, prefix: str, hidden: int, ffn: int) -> str:
        """``down(silu(gate(x)) * up(x))`` with gate and up fused into one FULLY_CONNECTED."""
        gu, _ = self.linear(x, (prefix + "gate_proj.weight", prefix + "up_proj.weight"))  # (T, 2F)
        gate, up = self.split_last(gu, [ffn, ffn], [-1, 2 * ffn])  # (T, F) each
        act = self.binary("MUL", gate, self.unary("LOGISTIC", gate, [-1, ffn]), [-1, ffn])
        h = self.binary("MUL", act, up, [-1, ffn])  # (T, F)
        out, _ = self.linear(h, (prefix + "down_proj.weight",))  # (T, hidden)
        return out

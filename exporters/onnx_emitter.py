"""ONNX emitter: a ModelSpec → the cut segments + the uncut ``model.onnx``, sharing weights.bin.

One decoder layer, and where the graph is cut (segment s finishes layer s-1, starts layer s)::

      layers.i.resid (T, H) ──┬─► RMSNorm(input_layernorm) ─► qkv_proj (+b) ─► Split
                              │       ├─► q_proj ─► Reshape (T,Hq,D)  ─► RoPE ─► layers.i.attn.q
                              │       ├─► k_proj ─► Reshape (T,Hkv,D) ─► RoPE ─► layers.i.attn.k
                              │       └─► v_proj ─► Reshape (T,Hkv,D) ─────────► layers.i.attn.v
      ════════════════════════│═════ cut: TurboQuantAttention (runtime cache.attend) ═════════════
                              │   layers.i.attn.out (T,Hq,D) ─► Reshape (T,Hq*D) ─► o_proj
                              └───────────────────────────────────────────────────► Add ─► h (T, H)
      h ──┬─► RMSNorm(post_attention_layernorm) ─► gate_up_proj ─► Split ─┬─► gate ─► Sigmoid·x (SiLU) ─┐
          │                                                               └─► up ─────────────────────► Mul ─► down_proj
          └────────────────────────────────────────────────────────────────────────────────────────────────► Add ─► layers.i+1.resid

``qkv_proj`` and ``gate_up_proj`` are the parts' weights concatenated along the output, split
back into the parts' names (:meth:`LayerEmitter.linears`): 4 instead of 7 linears per layer, the
same logits, a decode step 1.5–8 % faster at one onnxruntime thread (docs/RESULTS.md, round 24).
In the uncut graph, the split, reshapes and RoPE after ``qkv_proj`` are one ``RotaryQKV`` node (a
custom op, :mod:`tqedge.runtime.native_rope`, the same bits): 15 small nodes fewer per layer,
where the model has no q/k norm and the parts are one linear.

Segment 0 also embeds ``input_ids`` (Gather) and computes ``rope.cos``/``rope.sin`` (T,1,D) from
``positions`` × inv_freq once; the last segment gathers the ``logits_index`` rows, applies the
final RMSNorm and the LM head (tied: the embedding table, ``Gemm`` transB). RoPE is HF
rotate-half: ``x*cos + concat(-x2, x1)*sin``. Shapes have no batch dimension.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from onnx import TensorProto, helper

from tqedge.bundle import (ATTENTION_OP, CUSTOM_DOMAIN, DESCRIPTOR_VERSION, EMBED_QUANTIZED, HEAD_FORMATS, INPUT_IDS,
                           KV_DESC, LOGITS, LOGITS_INDEX, POSITIONS, ROTARY_QKV_OP, AttentionNode, GraphSpec)
from tqedge.exporters.plan import (ROPE_COS, ROPE_LOCAL_COS, ROPE_LOCAL_SIN, ROPE_SIN, Segment, attention_scale, attn_name,
                                   local_rope, resid, rope_inv_freq, rope_names, segment_plan)
from tqedge.exporters.spec import ModelSpec, QuantBlocks
from tqedge.exporters.weights import (BLOCK_SIZES, EMBED_DTYPES, LINEAR_FORMATS, NF4_FORMATS, LinearArgs,
                                      WeightStore, quantized_gather)

log = logging.getLogger(__name__)

OPSET = 23  # RMSNormalization
IR_VERSION = 10
DIR = "onnx"


class GraphBuilder:
    """Collects nodes and initializers of one ONNX graph; names are readable and unique.
    ``native``: the uncut graph, which may use this build's custom ops (tqedge.bundle.NATIVE_OPS)
    where a cut segment spells the same computation in standard ONNX ops."""

    def __init__(self, store: WeightStore, native: bool = False):
        self.store, self.native = store, native
        self.nodes: list = []
        self.inits: dict[str, TensorProto] = {}
        self.shared: dict = {}

    def weight(self, name: str, array, resident: bool = False) -> str:
        """Register an initializer (array or lazy function; ``resident``: a native op's weight kept
        in memory, :meth:`WeightStore.tensor`) and return its name."""
        if name not in self.inits:
            self.inits[name] = self.store.tensor(name, array, resident)
        return name

    def const(self, name: str, values, dtype=np.int64) -> str:
        return self.weight(name, np.asarray(values, dtype=dtype))

    def once(self, key, build) -> str:
        """The output of ``build()``, emitted once per graph for ``key``: a subexpression that
        several nodes read (e.g. the block sums of an input feeding q, k and v)."""
        if key not in self.shared:
            self.shared[key] = build()
        return self.shared[key]

    def op(self, op_type: str, inputs: list[str], out: str, domain: str | None = None, **attrs) -> str:
        """Append a node with one output named ``out``; returns ``out``."""
        self.nodes.append(helper.make_node(op_type, inputs, [out], name=out, domain=domain, **attrs))
        return out


class LayerEmitter:
    """Emits the pieces of the layer plan for one ModelSpec and weight format."""

    def __init__(self, spec: ModelSpec, fmt: str):
        self.spec, self.a, self.fmt = spec, spec.arch, fmt
        self.linear_fn = LINEAR_FORMATS[fmt]
        self._fused: dict = {}  # fused weight key → (w, quant, bias) or False (see linears)

    def w(self, name: str) -> np.ndarray:
        return self.spec.weights[name]

    def linear(self, g: GraphBuilder, x: str, name: str, key: str, bias: str | None = None, fn=None) -> str:
        y = (fn or self.linear_fn)(g, LinearArgs(name=name, x=x, w=self.w(key), weight_key=key, quant=self.spec.quant.get(key)))
        if bias is not None and bias in self.spec.weights:
            y = g.op("Add", [y, g.weight(bias, self.w(bias))], name + ".bias")
        return y

    def linears(self, g: GraphBuilder, x: str, name: str, key: str, parts: list[tuple[str, str]]) -> list[str]:
        """The linears ``parts`` — (output name, weight key) pairs reading the same ``x`` — as one:
        their weights (and biases) concatenated along the output under ``key``, one node (one
        ``MatMulNBits``, and one ``AddBlockOffsets`` for Q4_1 blocks) instead of one per part, then
        ``Split`` back into the parts' own names. Parts whose carried-over blocks cannot share a node
        (different bits, block or zero point, or only some carried) stay separate linears, and so do
        the NF4 formats' (``MatMulBnb4`` blocks run over the flattened weight, and nf4-dq's scale
        groups over all of its blocks: a concatenation would quantize differently)."""
        y = self.fused_linear(g, x, name, key, [k for _, k in parts])
        if y is None:
            return [self.linear(g, x, n, k, bias=_bias_key(k)) for n, k in parts]
        sizes = [self.w(k).shape[0] for _, k in parts]
        outs = [n for n, _ in parts]
        g.nodes.append(helper.make_node("Split", [y, g.const("split." + "_".join(map(str, sizes)), sizes)], outs,
                                        name=name + ".split", axis=-1))
        return outs

    def fused_linear(self, g: GraphBuilder, x: str, name: str, key: str, keys: list[str]) -> str | None:
        """The weights ``keys`` concatenated along the output as one linear (see :meth:`linears`):
        its output's name, or None when they cannot share a node."""
        fused = self._fused.get(key)
        if fused is None:
            nf4 = self.fmt in NF4_FORMATS
            fused = self._fused[key] = False if nf4 else _concat_parts(self.spec, keys)
        if fused is False:
            return None
        w, quant, bias = fused
        y = self.linear_fn(g, LinearArgs(name=name, x=x, w=w, weight_key=key, quant=quant))
        if bias is not None:
            y = g.op("Add", [y, g.weight(_bias_key(key), bias)], name + ".bias")
        return y

    def rmsnorm(self, g: GraphBuilder, x: str, key: str, out: str) -> str:
        return g.op("RMSNormalization", [x, g.weight(key, self.w(key))], out, axis=-1, epsilon=float(self.a.rms_norm_eps))

    def embed(self, g: GraphBuilder) -> None:
        key = "model.embed_tokens.weight"
        if self.fmt in EMBED_QUANTIZED:  # int rows, sharing the tied head's MatMulNBits bytes
            fmt = EMBED_QUANTIZED[self.fmt]
            rows = resid(0) if self.a.embed_scale == 1.0 else "embed.rows"
            quantized_gather(g, LinearArgs(rows, INPUT_IDS, self.w(key), key, self.spec.quant.get(key)),
                             {"int8": 8, "int4": 4}[fmt], BLOCK_SIZES[fmt], INPUT_IDS)  # (T, H)
            self.scale_embedding(g, rows)
            return
        dtype = EMBED_DTYPES[self.fmt]
        table = g.weight(key if dtype == np.float32 else f"{key}.fp16", lambda: self.w(key).astype(dtype))  # (V, H)
        out = resid(0) if self.a.embed_scale == 1.0 else "embed.rows"
        if dtype == np.float32:
            g.op("Gather", [table, INPUT_IDS], out, axis=0)  # (T, H)
        else:
            g.op("Gather", [table, INPUT_IDS], "embed.fp16", axis=0)
            g.op("Cast", ["embed.fp16"], out, to=TensorProto.FLOAT)  # (T, H)
        self.scale_embedding(g, out)

    def scale_embedding(self, g: GraphBuilder, rows: str) -> None:
        """``resid(0) = rows * embed_scale`` (Gemma: sqrt(hidden)); nothing when the scale is 1."""
        if self.a.embed_scale != 1.0:
            g.op("Mul", [rows, g.weight("embed.scale", np.asarray(self.a.embed_scale, np.float32))], resid(0))

    def rope_tables(self, g: GraphBuilder) -> None:
        p = g.op("Cast", [POSITIONS], "rope.pos", to=TensorProto.FLOAT)  # (T,)
        p = g.op("Unsqueeze", [p, g.const("axes.1", [1])], "rope.pos2")  # (T, 1)
        sets = [("rope", False, ROPE_COS, ROPE_SIN)]
        if local_rope(self.a):
            sets.append(("rope.local", True, ROPE_LOCAL_COS, ROPE_LOCAL_SIN))
        for prefix, local, cos, sin in sets:
            inv = g.weight(prefix + ".inv_freq", rope_inv_freq(self.a, local=local).astype(np.float32))  # (D/2,)
            f = g.op("Mul", [p, inv], prefix + ".freqs")  # (T, D/2)
            f = g.op("Concat", [f, f], prefix + ".emb", axis=-1)  # (T, D)
            for fn, out in (("Cos", cos), ("Sin", sin)):
                t = g.op(fn, [f], out + ".2d")
                g.op("Unsqueeze", [t, g.const("axes.1", [1])], out)  # (T, 1, D)

    def rope(self, g: GraphBuilder, x: str, out: str, layer: int = 0) -> str:
        cos, sin = rope_names(self.a, layer)
        half = self.a.head_dim // 2
        split = g.const("rope.split", [half, half])
        x1, x2 = out + ".x1", out + ".x2"
        g.nodes.append(helper.make_node("Split", [x, split], [x1, x2], name=out + ".split", axis=-1))
        rot = g.op("Concat", [g.op("Neg", [x2], out + ".neg"), x1], out + ".rot", axis=-1)  # (T, H, D)
        a = g.op("Mul", [x, cos], out + ".cos")
        b = g.op("Mul", [rot, sin], out + ".sin")
        return g.op("Add", [a, b], out)

    def start_layer(self, g: GraphBuilder, i: int) -> None:
        a, p = self.a, f"model.layers.{i}."
        x = self.rmsnorm(g, resid(i), p + "input_layernorm.weight", f"layers.{i}.attn_norm")  # (T, H)
        if g.native and not a.qk_norm:  # one RotaryQKV node for the split, the reshapes and RoPE
            y = self.fused_linear(g, x, f"layers.{i}.attn.qkv_proj", f"{p}self_attn.qkv_proj.weight",
                                  [f"{p}self_attn.{kind}_proj.weight" for kind in "qkv"])
            if y is not None:
                cos, sin = rope_names(a, i)
                g.nodes.append(helper.make_node(ROTARY_QKV_OP, [y, cos, sin], [attn_name(i, k) for k in "qkv"],
                                                name=f"layers.{i}.attn.rope", domain=CUSTOM_DOMAIN,
                                                num_heads=a.num_heads))
                return
        ys = self.linears(g, x, f"layers.{i}.attn.qkv_proj", f"{p}self_attn.qkv_proj.weight",
                          [(f"layers.{i}.attn.{kind}_proj", f"{p}self_attn.{kind}_proj.weight") for kind in "qkv"])
        for (kind, heads), y in zip((("q", a.num_heads), ("k", a.num_kv_heads), ("v", a.num_kv_heads)), ys):
            shape = g.const(f"shape.heads{heads}", [-1, heads, a.head_dim])
            if kind == "v":
                g.op("Reshape", [y, shape], attn_name(i, "v"))  # (T, Hkv, D)
            else:
                y = g.op("Reshape", [y, shape], f"layers.{i}.attn.{kind}_heads")  # (T, heads, D)
                if a.qk_norm:
                    y = self.rmsnorm(g, y, f"{p}self_attn.{kind}_norm.weight", f"layers.{i}.attn.{kind}_normed")
                self.rope(g, y, attn_name(i, kind), i)

    def finish_layer(self, g: GraphBuilder, i: int, out: str) -> str:
        a, p = self.a, f"model.layers.{i}."
        o = g.op("Reshape", [attn_name(i, "out"), g.const("shape.flat", [0, a.num_heads * a.head_dim])],
                 f"layers.{i}.attn.out_flat")  # (T, Hq*D)
        o = self.linear(g, o, f"layers.{i}.attn.o_proj", p + "self_attn.o_proj.weight")  # (T, H)
        if a.post_norms:
            o = self.rmsnorm(g, o, p + "self_attn.post_norm.weight", f"layers.{i}.attn.post_norm")
        h = g.op("Add", [resid(i), o], f"layers.{i}.attn_resid")  # (T, H)
        x = self.rmsnorm(g, h, p + "post_attention_layernorm.weight", f"layers.{i}.mlp_norm")
        gate, up = self.linears(g, x, f"layers.{i}.mlp.gate_up_proj", p + "mlp.gate_up_proj.weight",
                                [(f"layers.{i}.mlp.{k}_proj", f"{p}mlp.{k}_proj.weight") for k in ("gate", "up")])  # (T, F) each
        if a.hidden_act == "gelu_tanh":
            gated = g.op("Gelu", [gate], f"layers.{i}.mlp.gelu", approximate="tanh")
        else:
            gated = g.op("Mul", [gate, g.op("Sigmoid", [gate], f"layers.{i}.mlp.sigmoid")], f"layers.{i}.mlp.silu")
        act = g.op("Mul", [gated, up], f"layers.{i}.mlp.act")  # (T, F)
        down = self.linear(g, act, f"layers.{i}.mlp.down_proj", p + "mlp.down_proj.weight")  # (T, H)
        if a.post_norms:
            down = self.rmsnorm(g, down, p + "mlp.post_norm.weight", f"layers.{i}.mlp.post_norm")
        return g.op("Add", [h, down], out)  # (T, H)

    def head(self, g: GraphBuilder, x: str) -> None:
        rows = g.op("Gather", [x, LOGITS_INDEX], "head.rows", axis=0)  # (n, H)
        xn = self.rmsnorm(g, rows, "model.norm.weight", "head.norm")
        if self.a.tie_word_embeddings and self.fmt == "fp32":
            g.op("Gemm", [xn, "model.embed_tokens.weight"], LOGITS, transB=1)  # (n, V), shares the gather table
            g.weight("model.embed_tokens.weight", lambda: self.w("model.embed_tokens.weight"))
            return
        key = "model.embed_tokens.weight" if self.a.tie_word_embeddings else "lm_head.weight"
        y = self.linear(g, xn, "head.lm_head", key, fn=LINEAR_FORMATS[HEAD_FORMATS[self.fmt]])
        g.op("Identity", [y], LOGITS)  # (n, V)

    def segment(self, g: GraphBuilder, seg: Segment) -> None:
        """Emit one segment of the plan into ``g``."""
        if seg.finish is None:
            self.embed(g)
            self.rope_tables(g)
        else:
            self.finish_layer(g, seg.finish, resid(seg.finish + 1))
        if seg.start is not None:
            self.start_layer(g, seg.start)
        else:
            self.head(g, resid(self.a.num_layers))


def _bias_key(weight_key: str) -> str:
    return weight_key.removesuffix(".weight") + ".bias"


def _concat_parts(spec: ModelSpec, keys: list[str]):
    """(w, quant, bias) of the weights ``keys`` concatenated along the output, or False when their
    carried-over blocks (:class:`~tqedge.exporters.spec.QuantBlocks`) differ in kind: all or none
    carried, with the same bits, block and zero point. A part without a bias adds zeros."""
    quants = [spec.quant.get(k) for k in keys]
    ws = [spec.weights[k] for k in keys]
    if any(q is None for q in quants):
        if any(q is not None for q in quants):
            return False
        quant = None
    else:
        q0 = quants[0]
        if any((q.bits, q.block, q.zero_point) != (q0.bits, q0.block, q0.zero_point) for q in quants):
            return False
        quant = QuantBlocks(bits=q0.bits, block=q0.block, q=np.concatenate([q.q for q in quants]),
                            scale=np.concatenate([q.scale for q in quants]), min=np.concatenate([q.min for q in quants]),
                            zero_point=q0.zero_point)
    biases = [spec.weights.get(_bias_key(k)) for k in keys]
    bias = None
    if any(b is not None for b in biases):
        bias = np.concatenate([np.zeros(w.shape[0], np.float32) if b is None else b for w, b in zip(ws, biases)])
    return np.concatenate(ws), quant, bias


def _value_infos(a) -> dict[str, TensorProto]:
    f, i64 = TensorProto.FLOAT, TensorProto.INT64
    infos = {INPUT_IDS: (i64, ["T"]), POSITIONS: (i64, ["T"]), LOGITS_INDEX: (i64, ["n"]), KV_DESC: (i64, ["desc"]),
             LOGITS: (f, ["n", a.vocab_size])}
    for name in (ROPE_COS, ROPE_SIN, ROPE_LOCAL_COS, ROPE_LOCAL_SIN):
        infos[name] = (f, ["T", 1, a.head_dim])
    for i in range(a.num_layers + 1):
        infos[resid(i)] = (f, ["T", a.hidden_size])
    for i in range(a.num_layers):
        infos[attn_name(i, "q")] = infos[attn_name(i, "out")] = (f, ["T", a.num_heads, a.head_dim])
        infos[attn_name(i, "k")] = infos[attn_name(i, "v")] = (f, ["T", a.num_kv_heads, a.head_dim])
    return {k: helper.make_tensor_value_info(k, t, s) for k, (t, s) in infos.items()}


def _model(g: GraphBuilder, name: str, inputs: list[str], outputs: list[str], infos, custom: bool = False):
    opsets = [helper.make_opsetid("", OPSET), helper.make_opsetid("com.microsoft", 1)]
    if custom:
        opsets.append(helper.make_opsetid(CUSTOM_DOMAIN, 1))
    graph = helper.make_graph(g.nodes, name, [infos[n] for n in inputs], [infos[n] for n in outputs],
                              initializer=list(g.inits.values()))
    return helper.make_model(graph, opset_imports=opsets, ir_version=IR_VERSION, producer_name="tqedge")


def emit_onnx(spec: ModelSpec, out_dir: Path, fmt: str = "fp32", progress=None) -> GraphSpec:
    """Write ``onnx/`` (segments, model.onnx, weights.bin) into ``out_dir``.

    Args:
        spec: the validated model.
        out_dir: bundle directory being built.
        fmt: weight format (tqedge.bundle.WEIGHT_FORMATS).
        progress: optional callable(n) advanced once per segment.

    Returns:
        The GraphSpec for ``manifest.graphs["onnx"]``.
    """
    a = spec.arch
    (out_dir / DIR).mkdir(parents=True, exist_ok=True)
    store = WeightStore(out_dir / DIR / "weights.bin", "weights.bin")
    emitter = LayerEmitter(spec, fmt)
    infos = _value_infos(a)
    whole = GraphBuilder(store, native=True)
    plan = segment_plan(a.num_layers, a)
    scale = attention_scale(a)
    attention, files = [], []
    try:
        for seg in plan:
            g = GraphBuilder(store)
            emitter.segment(g, seg)
            name = f"{DIR}/segment_{seg.index:03d}.onnx"
            (out_dir / name).write_bytes(_model(g, f"segment_{seg.index}", seg.inputs, seg.outputs, infos).SerializeToString())
            store.mark_segment(seg.index, g.inits)
            files.append(name)
            emitter.segment(whole, seg)
            if seg.start is not None:
                i = seg.start
                node = AttentionNode(layer=i, q=attn_name(i, "q"), k=attn_name(i, "k"), v=attn_name(i, "v"),
                                     out=attn_name(i, "out"), scale=scale)
                attention.append(node)
                whole.nodes.append(helper.make_node(
                    ATTENTION_OP, [node.q, node.k, node.v, KV_DESC], [node.out], name=f"layers.{i}.attn.core",
                    domain=CUSTOM_DOMAIN, layer=i, num_heads=a.num_heads, num_kv_heads=a.num_kv_heads,
                    head_dim=a.head_dim, scale=scale))
            if progress:
                progress(1)
        model = _model(whole, spec.source.get("name") or "tqedge", [INPUT_IDS, POSITIONS, LOGITS_INDEX, KV_DESC],
                       [LOGITS], infos, custom=True)
        (out_dir / DIR / "model.onnx").write_bytes(model.SerializeToString())
    finally:
        store.close()
    log.info("onnx: %d segments, weights.bin %.1f MB", len(files), store.nbytes / 1e6)
    ops = sorted({n.op_type for n in whole.nodes if n.domain == CUSTOM_DOMAIN})
    return GraphSpec(segments=files, attention=attention, file=f"{DIR}/model.onnx", data=[f"{DIR}/{f}" for f in store.files],
                     descriptor=DESCRIPTOR_VERSION, ops=ops)

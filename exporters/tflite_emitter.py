"""TFLite emitter: a :class:`~tqedge.exporters.spec.ModelSpec` → ``model.tflite``, the sibling
of the ONNX emitter, following the same segment protocol (``exporters/plan.py``).

One file holds, over one set of shared weight buffers:

* subgraph 0, ``VALIDATION:main``: the whole model with one ``CUSTOM`` op
  ``TurboQuantAttention`` per layer (flexbuffer options ``layer``, ``num_heads``,
  ``num_kv_heads``, ``head_dim``, ``scale``) — for Netron and for runtimes that register the
  op. The ``VALIDATION:`` name prefix makes the interpreter skip the subgraph when it applies
  delegates: otherwise XNNPACK would pack a second copy of every weight for a graph the
  backend never runs (measured: +530 MB RSS on SmolLM2-135M fp32);
* one subgraph + signature per dense segment (``segment_000`` … ``segment_{L}``), whose
  inputs/outputs are the protocol tensors (``input_ids``, ``layers.{i}.attn.q`` …, ``logits``).
  The LiteRT backend runs these and the attention op between them.

One layer (``s`` finishes layer ``i-1`` and starts layer ``i``)::

    resid ─┬──────────────────────────────(+)─┬───────────────────────(+)── resid(i)
           │  attn.out ─reshape─FC(o_proj)─┘  └─RMSNorm─FC(gate|up)─┐   │
           │                                    SiLU(gate)*up─FC(down)┘
    resid(i) ─RMSNorm─FC(q|k|v)─split─┬ q ─reshape─RoPE── attn.q   (T, Hq, D)
                                       ├ k ─reshape─RoPE── attn.k   (T, Hkv, D)
                                       └ v ─reshape─────── attn.v   (T, Hkv, D)
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from tqedge.bundle import ATTENTION_OP, INPUT_IDS, LOGITS, LOGITS_INDEX, POSITIONS, ArchSpec, AttentionNode, GraphSpec
from tqedge.exporters.plan import ROPE_COS, ROPE_SIN, Segment, attention_scale, attn_name, resid, rope_inv_freq, segment_plan
from tqedge.exporters.tflite_builder import ModelBuilder, Subgraph, require_schema
from tqedge.exporters.tflite_layers import Ops, WeightStore

log = logging.getLogger(__name__)

TFLITE_FILE = "tflite/model.tflite"  # relative to the bundle directory
CUSTOM_OP = ATTENTION_OP
WHOLE_GRAPH = "VALIDATION:main"


def signature_name(index: int) -> str:
    """Signature key of dense segment ``index``."""
    return f"segment_{index:03d}"


def protocol_shape(name: str, arch: ArchSpec) -> tuple[list[int], type]:
    """Shape (dim 0 resizable, -1) and dtype of a tensor of the segment protocol."""
    h, d = arch.hidden_size, arch.head_dim
    if name in (INPUT_IDS, POSITIONS, LOGITS_INDEX):
        return [-1], np.int64
    if name == LOGITS:
        return [-1, arch.vocab_size], np.float32
    if name in (ROPE_COS, ROPE_SIN):
        return [-1, 1, d], np.float32
    if name.endswith(".resid"):
        return [-1, h], np.float32
    kind = name.rsplit(".", 1)[-1]
    heads = arch.num_heads if kind in ("q", "out") else arch.num_kv_heads
    return [-1, heads, d], np.float32


def _declare(g: Subgraph, name: str, arch: ArchSpec) -> str:
    if not g.has(name):
        shape, dtype = protocol_shape(name, arch)
        g.tensor(name, shape, dtype, dynamic_first=True)
    return name


def _finish_layer(o: Ops, arch: ArchSpec, i: int, out_name: str | None) -> str:
    """o_proj + residual + MLP + residual of layer ``i``; returns the new residual stream."""
    h, qd = arch.hidden_size, arch.num_heads * arch.head_dim
    p = f"model.layers.{i}."
    attn = o.reshape(attn_name(i, "out"), [-1, qd])  # (T, Hq*D)
    proj, _ = o.linear(attn, (p + "self_attn.o_proj.weight",))  # (T, hidden)
    x = o.binary("ADD", resid(i), proj, [-1, h])
    xn = o.rms_norm(x, p + "post_attention_layernorm.weight", h, arch.rms_norm_eps)
    mlp = o.swiglu(xn, p + "mlp.", h, arch.intermediate_size)
    out = o.act([-1, h], name=out_name)
    o.g.op("ADD", [x, mlp], [out], o.s.AddOptionsT())
    return out


def _start_layer(o: Ops, arch: ArchSpec, i: int) -> None:
    """Input norm, fused q|k|v projection, RoPE; emits ``layers.{i}.attn.q|k|v``."""
    h, d, hq, hkv = arch.hidden_size, arch.head_dim, arch.num_heads, arch.num_kv_heads
    p = f"model.layers.{i}.self_attn."
    xn = o.rms_norm(resid(i), f"model.layers.{i}.input_layernorm.weight", h, arch.rms_norm_eps)
    names = tuple(p + f"{k}_proj.weight" for k in "qkv")
    bias = tuple(p + f"{k}_proj.bias" for k in "qkv") if arch.attention_bias else None
    qkv, _ = o.linear(xn, names, bias)  # (T, (Hq+2Hkv)*D)
    q, k, v = o.split_last(qkv, [hq * d, hkv * d, hkv * d], [-1, (hq + 2 * hkv) * d])
    q = o.reshape(q, [-1, hq, d])  # (T, Hq, D)
    k = o.reshape(k, [-1, hkv, d])  # (T, Hkv, D)
    o.reshape(v, [-1, hkv, d], name=attn_name(i, "v"))  # (T, Hkv, D)
    o.rope(q, hq, d, ROPE_COS, ROPE_SIN, name=attn_name(i, "q"))
    o.rope(k, hkv, d, ROPE_COS, ROPE_SIN, name=attn_name(i, "k"))


def _emit_segment(g: Subgraph, store: WeightStore, arch: ArchSpec, seg: Segment, inv_freq: np.ndarray) -> None:
    """Append the ops of ``seg`` to ``g``; protocol tensors keep their protocol names."""
    o = Ops(g, store, prefix=f"seg{seg.index:03d}")
    for name in seg.inputs:
        _declare(g, name, arch)
    if seg.finish is None:
        o.embed(INPUT_IDS, "model.embed_tokens.weight", arch.vocab_size, arch.hidden_size, resid(0))
        o.rope_tables(POSITIONS, inv_freq, ROPE_COS, ROPE_SIN)
    elif seg.start is not None:
        _finish_layer(o, arch, seg.finish, resid(seg.start))
    else:
        x = _finish_layer(o, arch, seg.finish, None)  # (T, hidden)
        rows = o.gather(x, LOGITS_INDEX, [-1, arch.hidden_size])  # (n, hidden)
        xn = o.rms_norm(rows, "model.norm.weight", arch.hidden_size, arch.rms_norm_eps)
        head = "model.embed_tokens.weight" if arch.tie_word_embeddings else "lm_head.weight"
        o.linear(xn, (head,), name=LOGITS)  # (n, vocab)
    if seg.start is not None:
        _start_layer(o, arch, seg.start)


def _attention_options(arch: ArchSpec, layer: int, scale: float) -> bytes:
    from flatbuffers import flexbuffers

    return bytes(flexbuffers.Dumps({"layer": layer, "num_heads": arch.num_heads, "num_kv_heads": arch.num_kv_heads,
                                    "head_dim": arch.head_dim, "scale": float(scale)}))


def build_model(arch: ArchSpec, weights: dict[str, np.ndarray], weight_format: str = "fp32",
                progress=None) -> tuple[ModelBuilder, GraphSpec]:
    """Build (in memory) the whole-graph subgraph and one signature per segment.

    Args:
        arch: model dimensions.
        weights: canonical name → float32 array (``ModelSpec.weights``).
        weight_format: "fp32" or "int8" (per-channel, hybrid FULLY_CONNECTED).
        progress: optional callable(n) advanced once per segment.

    Returns:
        ``(builder, graph_spec)``; call ``builder.write(path)`` to serialize.
    """
    require_schema()
    store = WeightStore(weights, weight_format)
    plan = segment_plan(arch.num_layers)
    inv_freq = rope_inv_freq(arch)
    scale = attention_scale(arch)
    mb = ModelBuilder(description=f"tqedge {arch.name} ({weight_format})")

    main = mb.subgraph(WHOLE_GRAPH)
    for seg in plan:
        _emit_segment(main, store, arch, seg, inv_freq)
        if seg.start is not None:
            i = seg.start
            ins = [attn_name(i, k) for k in "qkv"]
            main.op("CUSTOM", ins, [_declare(main, attn_name(i, "out"), arch)], custom=CUSTOM_OP,
                    custom_options=_attention_options(arch, i, scale))
    main.inputs, main.outputs = [INPUT_IDS, POSITIONS, LOGITS_INDEX], [LOGITS]

    for seg in plan:
        g = mb.subgraph(signature_name(seg.index))
        _emit_segment(g, store, arch, seg, inv_freq)
        g.inputs, g.outputs = list(seg.inputs), list(seg.outputs)
        mb.sign(signature_name(seg.index), g)
        if progress:
            progress(1)

    nodes = [AttentionNode(layer=i, q=attn_name(i, "q"), k=attn_name(i, "k"), v=attn_name(i, "v"),
                           out=attn_name(i, "out"), scale=scale) for i in range(arch.num_layers)]
    spec = GraphSpec(segments=[signature_name(s.index) for s in plan], attention=nodes, file=TFLITE_FILE)
    return mb, spec


def emit_tflite(spec, out_dir, weights: str = "fp32", progress=None) -> GraphSpec:
    """Write ``tflite/model.tflite`` for ``spec`` into the bundle directory ``out_dir``.

    Args:
        spec: the validated :class:`~tqedge.exporters.spec.ModelSpec` (``arch`` + float32 ``weights``).
        out_dir: bundle directory being built.
        weights: "fp32" or "int8" (per-channel, hybrid FULLY_CONNECTED).
        progress: optional callable(n) advanced once per segment.

    Returns:
        The :class:`GraphSpec` for ``manifest.graphs["tflite"]`` (segments are signature names).
    """
    mb, graph = build_model(spec.arch, spec.weights, weights, progress=progress)
    path = Path(out_dir) / TFLITE_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    size = mb.write(path)
    log.info("tflite: %d segments, %s %.1f MB", len(graph.segments), TFLITE_FILE, size / 1e6)
    return graph

"""ModelSpec: the architecture-neutral model every source produces and every emitter consumes.

Sources (``exporters/sources``) read a file format; architectures (``exporters/architectures``)
map that format's tensor names onto the canonical names below; emitters (ONNX, later TFLite)
read only a :class:`ModelSpec`. Canonical names are Hugging Face style, per layer ``i``::

    model.embed_tokens.weight                     (vocab, hidden)
    model.layers.{i}.input_layernorm.weight       (hidden,)
    model.layers.{i}.self_attn.q_proj.weight      (Hq*D, hidden)      (+ .bias (Hq*D,) when attention_bias)
    model.layers.{i}.self_attn.k_proj.weight      (Hkv*D, hidden)     (+ .bias)
    model.layers.{i}.self_attn.v_proj.weight      (Hkv*D, hidden)     (+ .bias)
    model.layers.{i}.self_attn.o_proj.weight      (hidden, Hq*D)
    model.layers.{i}.post_attention_layernorm.weight  (hidden,)
    model.layers.{i}.mlp.gate_proj.weight         (ffn, hidden)
    model.layers.{i}.mlp.up_proj.weight           (ffn, hidden)
    model.layers.{i}.mlp.down_proj.weight         (hidden, ffn)
    model.norm.weight                             (hidden,)
    with ``arch.qk_norm``:    model.layers.{i}.self_attn.q_norm.weight, k_norm.weight  (D,)
    with ``arch.post_norms``: model.layers.{i}.self_attn.post_norm.weight  (hidden,)  on o_proj's output
                              model.layers.{i}.mlp.post_norm.weight        (hidden,)  on down_proj's output
    lm_head.weight                                (vocab, hidden)     (absent when tied)

Linear weights are (out, in) like ``torch.nn.Linear``; Q/K rows are in HF rotate-half order.
``post_attention_layernorm`` is always the norm in front of the MLP (Gemma's HF
``pre_feedforward_layernorm``). Norm weights are the multiplier the graph applies: Gemma's
``1 + w`` is folded in by its architecture module.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from tqedge.bundle import ArchSpec, GenerationSpec, TokenizerSpec
from tqedge.errors import TqedgeError


@dataclass
class QuantBlocks:
    """A weight that arrives already block-quantized (GGUF Q4_1, Q8_0), kept so an emitter can
    carry it over without re-quantizing: ``w[n, k] = scale[n, b] * q[n, k] + min[n, b]`` with
    ``b = k // block``."""

    bits: int
    block: int
    q: np.ndarray  # uint8 (out, in) codes in [0, 2**bits)
    scale: np.ndarray  # float32 (out, in // block)
    min: np.ndarray  # float32 (out, in // block)
    # the integral zero point every block shares, ``min = -zero_point * scale`` (GGUF Q8_0: 128);
    # None when the minimums are any floats (GGUF Q4_1)
    zero_point: int | None = None


@dataclass
class ModelSpec:
    """Everything an emitter needs, in one naming, independent of the source format.

    Attributes:
        arch: dimensions and hyper-parameters.
        weights: canonical name → float32 numpy array (see module docstring for shapes).
        tokenizer_json: the ``tokenizers`` JSON text of the tokenizer.
        tokenizer: special tokens, BOS policy, chat template.
        generation: sampling defaults from the source, if any.
        source: provenance (file name, type, sha256, original dtype/quantization).
        quant: optional pre-quantized blocks for some weights (same canonical names).
    """

    arch: ArchSpec
    weights: dict[str, np.ndarray]
    tokenizer_json: str
    tokenizer: TokenizerSpec
    generation: GenerationSpec = field(default_factory=GenerationSpec)
    source: dict[str, Any] = field(default_factory=dict)
    quant: dict[str, QuantBlocks] = field(default_factory=dict)

    @property
    def num_parameters(self) -> int:
        """Parameter count (tied embeddings counted once)."""
        return int(sum(w.size for w in self.weights.values()))

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        """Canonical name → shape this architecture requires."""
        a = self.arch
        h, d, f = a.hidden_size, a.head_dim, a.intermediate_size
        qd, kvd = a.num_heads * d, a.num_kv_heads * d
        shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (a.vocab_size, h),
                                              "model.norm.weight": (h,)}
        if not a.tie_word_embeddings:
            shapes["lm_head.weight"] = (a.vocab_size, h)
        for i in range(a.num_layers):
            p = f"model.layers.{i}."
            shapes.update({
                p + "input_layernorm.weight": (h,),
                p + "self_attn.q_proj.weight": (qd, h),
                p + "self_attn.k_proj.weight": (kvd, h),
                p + "self_attn.v_proj.weight": (kvd, h),
                p + "self_attn.o_proj.weight": (h, qd),
                p + "post_attention_layernorm.weight": (h,),
                p + "mlp.gate_proj.weight": (f, h),
                p + "mlp.up_proj.weight": (f, h),
                p + "mlp.down_proj.weight": (h, f),
            })
            if a.qk_norm:
                shapes.update({p + "self_attn.q_norm.weight": (d,), p + "self_attn.k_norm.weight": (d,)})
            if a.post_norms:
                shapes.update({p + "self_attn.post_norm.weight": (h,), p + "mlp.post_norm.weight": (h,)})
            if a.attention_bias:
                shapes.update({p + "self_attn.q_proj.bias": (qd,), p + "self_attn.k_proj.bias": (kvd,),
                               p + "self_attn.v_proj.bias": (kvd,)})
        return shapes

    def validate(self) -> None:
        """Check every required tensor is present with the right shape and finite values.

        Raises:
            TqedgeError: naming the first missing, misshapen or non-finite tensor.
        """
        for name, shape in self.expected_shapes().items():
            w = self.weights.get(name)
            if w is None:
                raise TqedgeError(f"model is missing tensor {name}")
            if tuple(w.shape) != shape:
                raise TqedgeError(f"tensor {name} has shape {tuple(w.shape)}, expected {shape}")
            if w.dtype != np.float32:
                raise TqedgeError(f"tensor {name} is {w.dtype}, expected float32 after loading")
            if not np.isfinite(w).all():
                raise TqedgeError(f"tensor {name} contains NaN or Inf")

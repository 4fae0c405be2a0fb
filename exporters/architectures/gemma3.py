"""Gemma 3 (text): args from HF config / GGUF metadata, name tables, sanitize.

What differs from Llama, all carried by :class:`~tqedge.bundle.ArchSpec` fields:

- RMSNorm on q and k per head (``qk_norm``), and on the attention and MLP outputs before each
  residual add (``post_norms``); every norm multiplies by ``1 + w`` — HF stores ``w``, GGUF
  (llama.cpp's converter) stores ``w + 1``; canonical weights hold the multiplier.
- GeGLU MLP (tanh GELU), embeddings scaled by ``sqrt(hidden)``, tied LM head.
- Softmax scale ``query_pre_attn_scalar ** -0.5``.
- Sliding-window layers with their own RoPE base (local 10,000) beside full-attention layers
  (global ``rope_theta``, 1,000,000): every 6th layer is global unless ``layer_types`` says
  otherwise. GGUF files carry neither the pattern, the local base nor the query scale; they
  come from the architecture's definition, as transformers does.

GGUF Gemma tensors are not row-permuted (llama.cpp runs Gemma with NeoX RoPE).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace

import numpy as np

from tqedge.bundle import ArchSpec
from tqedge.errors import TqedgeError
from tqedge.exporters.architectures.llama import Architecture, sanitize

SLIDING_PATTERN = 6  # layer i is global when (i + 1) % 6 == 0 (transformers' default pattern)
LOCAL_THETA = 10_000.0
GLOBAL_THETA = 1_000_000.0

GGUF_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "blk.{i}.attn_norm.weight": "model.layers.{i}.input_layernorm.weight",
    "blk.{i}.attn_q.weight": "model.layers.{i}.self_attn.q_proj.weight",
    "blk.{i}.attn_k.weight": "model.layers.{i}.self_attn.k_proj.weight",
    "blk.{i}.attn_v.weight": "model.layers.{i}.self_attn.v_proj.weight",
    "blk.{i}.attn_q_norm.weight": "model.layers.{i}.self_attn.q_norm.weight",
    "blk.{i}.attn_k_norm.weight": "model.layers.{i}.self_attn.k_norm.weight",
    "blk.{i}.attn_output.weight": "model.layers.{i}.self_attn.o_proj.weight",
    "blk.{i}.post_attention_norm.weight": "model.layers.{i}.self_attn.post_norm.weight",
    "blk.{i}.ffn_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
    "blk.{i}.ffn_gate.weight": "model.layers.{i}.mlp.gate_proj.weight",
    "blk.{i}.ffn_up.weight": "model.layers.{i}.mlp.up_proj.weight",
    "blk.{i}.ffn_down.weight": "model.layers.{i}.mlp.down_proj.weight",
    "blk.{i}.post_ffw_norm.weight": "model.layers.{i}.mlp.post_norm.weight",
}

# HF Gemma 3 per-layer norm names that differ from the canonical ones (the rest are identical).
HF_NORMS = {
    "post_attention_layernorm": "self_attn.post_norm",
    "pre_feedforward_layernorm": "post_attention_layernorm",
    "post_feedforward_layernorm": "mlp.post_norm",
}
_HF_NORM = re.compile(r"model\.layers\.(\d+)\.(" + "|".join(HF_NORMS) + r")\.weight")


@dataclass
class Gemma3Args:
    """Hyper-parameters of a Gemma 3 text decoder (HF ``Gemma3TextConfig`` names)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_local_base_freq: float
    max_position_embeddings: int
    query_pre_attn_scalar: float
    sliding_window: int
    layer_types: list[str]
    rope_scaling: dict | None = None  # global layers only
    tie_word_embeddings: bool = True

    def arch_spec(self, name: str) -> ArchSpec:
        return ArchSpec(
            name=name, vocab_size=self.vocab_size, hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size, num_layers=self.num_hidden_layers,
            num_heads=self.num_attention_heads, num_kv_heads=self.num_key_value_heads,
            head_dim=self.head_dim, rms_norm_eps=self.rms_norm_eps, rope_theta=self.rope_theta,
            max_position_embeddings=self.max_position_embeddings,
            tie_word_embeddings=self.tie_word_embeddings, rope_scaling=self.rope_scaling,
            qk_norm=True, post_norms=True, hidden_act="gelu_tanh", embed_scale=math.sqrt(self.hidden_size),
            query_pre_attn_scalar=self.query_pre_attn_scalar, layer_types=list(self.layer_types),
            sliding_window=self.sliding_window, rope_local_theta=self.rope_local_base_freq,
        )


def default_layer_types(n: int, pattern: int = SLIDING_PATTERN) -> list[str]:
    """Transformers' default: every ``pattern``-th layer global, the others sliding."""
    return ["full_attention" if (i + 1) % pattern == 0 else "sliding_attention" for i in range(n)]


def _rope(cfg: dict) -> tuple[float, float, dict | None]:
    """(global theta, local theta, global rope_scaling) from transformers 5 ``rope_parameters``
    (per layer type) or 4.x ``rope_theta`` / ``rope_local_base_freq`` / ``rope_scaling``."""
    params = cfg.get("rope_parameters") or {}
    full = dict(params.get("full_attention") or {})
    local = dict(params.get("sliding_attention") or {})
    theta = float(full.pop("rope_theta", None) or cfg.get("rope_theta") or GLOBAL_THETA)
    local_theta = float(local.pop("rope_theta", None) or cfg.get("rope_local_base_freq") or LOCAL_THETA)
    if local.get("rope_type", "default") != "default":
        raise TqedgeError(f"config.json: rope scaling on sliding layers ({local['rope_type']!r}) is not supported")
    scaling = cfg.get("rope_scaling") or (full if full.get("rope_type", "default") != "default" else None)
    return theta, local_theta, scaling


def args_from_hf(cfg: dict) -> Gemma3Args:
    """Build args from a Gemma 3 text ``config.json`` (transformers 4.x and 5.x spellings).

    Raises:
        TqedgeError: naming a missing or unsupported field.
    """
    act = cfg.get("hidden_activation") or cfg.get("hidden_act") or "gelu_pytorch_tanh"
    if act not in ("gelu_pytorch_tanh", "gelu_tanh"):
        raise TqedgeError(f"config.json: Gemma 3 hidden_activation {act!r} is not supported (only gelu_pytorch_tanh)")
    for key in ("final_logit_softcapping", "attn_logit_softcapping", "use_bidirectional_attention"):
        if cfg.get(key):
            raise TqedgeError(f"config.json: {key} is not supported")
    if cfg.get("attention_bias"):
        raise TqedgeError("config.json: attention_bias is not supported for Gemma 3")
    try:
        n = int(cfg["num_hidden_layers"])
        theta, local_theta, scaling = _rope(cfg)
        layer_types = cfg.get("layer_types") or default_layer_types(n, int(cfg.get("sliding_window_pattern", SLIDING_PATTERN)))
        heads = int(cfg["num_attention_heads"])
        head_dim = int(cfg.get("head_dim") or 256)
        return Gemma3Args(
            vocab_size=int(cfg["vocab_size"]), hidden_size=int(cfg["hidden_size"]),
            intermediate_size=int(cfg["intermediate_size"]), num_hidden_layers=n,
            num_attention_heads=heads, num_key_value_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=head_dim, rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=theta, rope_local_base_freq=local_theta,
            max_position_embeddings=int(cfg.get("max_position_embeddings", 32768)),
            query_pre_attn_scalar=float(cfg.get("query_pre_attn_scalar") or head_dim),
            sliding_window=int(cfg.get("sliding_window") or 4096), layer_types=list(layer_types),
            rope_scaling=scaling, tie_word_embeddings=bool(cfg.get("tie_word_embeddings", True)),
        )
    except KeyError as e:
        raise TqedgeError(f"config.json is missing {e.args[0]!r}") from None


def args_from_gguf(meta: dict) -> Gemma3Args:
    """Build args from ``gemma3.*`` GGUF metadata (pattern, local base and query scale from the
    architecture's definition)."""
    def get(key, default=None):
        v = meta.get(f"gemma3.{key}", default)
        if v is None:
            raise TqedgeError(f"GGUF metadata is missing gemma3.{key}")
        return v

    n = int(get("block_count"))
    heads = int(get("attention.head_count"))
    head_dim = int(get("attention.key_length", 256))
    scaling = None
    if meta.get("gemma3.rope.scaling.type") == "linear":
        scaling = {"rope_type": "linear", "factor": float(meta["gemma3.rope.scaling.factor"])}
    return Gemma3Args(
        vocab_size=int(meta.get("gemma3.vocab_size") or len(meta["tokenizer.ggml.tokens"])),
        hidden_size=int(get("embedding_length")), intermediate_size=int(get("feed_forward_length")),
        num_hidden_layers=n, num_attention_heads=heads,
        num_key_value_heads=int(get("attention.head_count_kv", heads)), head_dim=head_dim,
        rms_norm_eps=float(get("attention.layer_norm_rms_epsilon")),
        rope_theta=float(get("rope.freq_base", GLOBAL_THETA)), rope_local_base_freq=LOCAL_THETA,
        max_position_embeddings=int(get("context_length", 32768)), query_pre_attn_scalar=float(head_dim),
        sliding_window=int(get("attention.sliding_window")), layer_types=default_layer_types(n),
        rope_scaling=scaling,
    )


def hf_fixup(weights: dict[str, np.ndarray], args: Gemma3Args) -> dict[str, np.ndarray]:
    """HF names → canonical (see :data:`HF_NORMS`), and every norm's ``w`` → ``1 + w``."""
    out = {}
    for src, w in weights.items():
        m = _HF_NORM.fullmatch(src)
        dst = f"model.layers.{m.group(1)}.{HF_NORMS[m.group(2)]}.weight" if m else src
        out[dst] = (w + np.float32(1.0)) if dst.endswith("norm.weight") else w
    return out


def sanitize_gemma3(weights: dict[str, np.ndarray], args: Gemma3Args) -> tuple[dict[str, np.ndarray], Gemma3Args]:
    """Llama's sanitize (tying), refusing an untied Gemma (the graph ties the head)."""
    weights, args = sanitize(weights, args)
    if not args.tie_word_embeddings:
        raise TqedgeError("Gemma 3 with a separate lm_head is not supported")
    return weights, replace(args, tie_word_embeddings=True)


GEMMA3 = Architecture(
    name="gemma3", hf_classes=("Gemma3ForCausalLM",), gguf_arch="gemma3",
    args_from_hf=args_from_hf, args_from_gguf=args_from_gguf, gguf_names=GGUF_NAMES,
    sanitize=sanitize_gemma3, hf_fixup=hf_fixup,
    kv_bits="8,4",  # 4-bit keys cost head_dim-256 Gemma > 1 % PPL (docs/RESULTS.md, Gemma KV quality)
)

"""Llama (and SmolLM, Llama 2/3): args from HF config / GGUF metadata, name tables, sanitize.

GGUF files written by llama.cpp's ``convert_hf_to_gguf.py`` permute the rows of Q and K for
its interleaved RoPE; :func:`unpermute` undoes ``permute(w, n_head)`` so rows are back in HF's
rotate-half order.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Callable

import numpy as np

from tqedge.bundle import ArchSpec
from tqedge.errors import TqedgeError

# GGUF tensor name → canonical name ({i} = layer).
GGUF_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "blk.{i}.attn_norm.weight": "model.layers.{i}.input_layernorm.weight",
    "blk.{i}.attn_q.weight": "model.layers.{i}.self_attn.q_proj.weight",
    "blk.{i}.attn_k.weight": "model.layers.{i}.self_attn.k_proj.weight",
    "blk.{i}.attn_v.weight": "model.layers.{i}.self_attn.v_proj.weight",
    "blk.{i}.attn_q.bias": "model.layers.{i}.self_attn.q_proj.bias",
    "blk.{i}.attn_k.bias": "model.layers.{i}.self_attn.k_proj.bias",
    "blk.{i}.attn_v.bias": "model.layers.{i}.self_attn.v_proj.bias",
    "blk.{i}.attn_output.weight": "model.layers.{i}.self_attn.o_proj.weight",
    "blk.{i}.ffn_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
    "blk.{i}.ffn_gate.weight": "model.layers.{i}.mlp.gate_proj.weight",
    "blk.{i}.ffn_up.weight": "model.layers.{i}.mlp.up_proj.weight",
    "blk.{i}.ffn_down.weight": "model.layers.{i}.mlp.down_proj.weight",
}

# Source tensors that carry no weights the graph needs.
HF_IGNORED = re.compile(r".*rotary_emb\.inv_freq$")


def _table_regex(table: dict[str, str]) -> list[tuple[re.Pattern, str]]:
    out = []
    for src, dst in table.items():
        pat = re.compile("^" + re.escape(src).replace(r"\{i\}", r"(?P<i>\d+)") + "$")
        out.append((pat, dst))
    return out


def rename(names: list[str], table: dict[str, str]) -> dict[str, str]:
    """Map source names through an explicit table; returns source → canonical.

    Raises:
        TqedgeError: for a tensor the table does not know (an unexpected architecture variant).
    """
    rules = _table_regex(table)
    out = {}
    for n in names:
        for pat, dst in rules:
            m = pat.match(n)
            if m:
                out[n] = dst.replace("{i}", m.group("i")) if "i" in m.groupdict() else dst
                break
        else:
            raise TqedgeError(f"unexpected tensor {n} (not part of this architecture)")
    return out


def unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of llama.cpp's ``permute(w, n_head)``: interleaved rope rows → rotate-half rows.

    Args:
        w: (n_head*D, in) or (n_head*D,) rows as stored in GGUF.
        n_head: heads of this projection (KV heads for K).

    Returns:
        Same shape, rows in HF order.
    """
    d2 = w.shape[0] // n_head // 2
    return w.reshape(n_head, d2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@dataclass
class LlamaArgs:
    """Hyper-parameters of a Llama-family decoder (HF ``config.json`` names)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    rope_scaling: dict | None = None
    attention_bias: bool = False
    qk_norm: bool = False

    def arch_spec(self, name: str) -> ArchSpec:
        return ArchSpec(
            name=name, vocab_size=self.vocab_size, hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size, num_layers=self.num_hidden_layers,
            num_heads=self.num_attention_heads, num_kv_heads=self.num_key_value_heads,
            head_dim=self.head_dim, rms_norm_eps=self.rms_norm_eps, rope_theta=self.rope_theta,
            max_position_embeddings=self.max_position_embeddings,
            tie_word_embeddings=self.tie_word_embeddings, attention_bias=self.attention_bias,
            rope_scaling=self.rope_scaling, qk_norm=self.qk_norm,
        )


def args_from_hf(cfg: dict, attention_bias: bool = False) -> LlamaArgs:
    """Build args from a ``config.json`` dict (transformers 4.x and 5.x spellings).

    Raises:
        TqedgeError: naming a missing or unsupported field.
    """
    try:
        heads = int(cfg["num_attention_heads"])
        rope = dict(cfg.get("rope_parameters") or {})  # transformers 5
        theta = rope.pop("rope_theta", None) or cfg.get("rope_theta", 10000.0)
        scaling = cfg.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
        args = LlamaArgs(
            vocab_size=int(cfg["vocab_size"]), hidden_size=int(cfg["hidden_size"]),
            intermediate_size=int(cfg["intermediate_size"]), num_hidden_layers=int(cfg["num_hidden_layers"]),
            num_attention_heads=heads, num_key_value_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=int(cfg.get("head_dim") or int(cfg["hidden_size"]) // heads),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)), rope_theta=float(theta),
            max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            rope_scaling=scaling, attention_bias=bool(cfg.get("attention_bias", attention_bias)),
        )
    except KeyError as e:
        raise TqedgeError(f"config.json is missing {e.args[0]!r}") from None
    except (TypeError, ValueError, ZeroDivisionError, AttributeError) as e:
        raise TqedgeError(f"config.json has a malformed value ({e})") from None
    if cfg.get("hidden_act", "silu") != "silu":
        raise TqedgeError(f"config.json: hidden_act {cfg['hidden_act']!r} is not supported (only silu)")
    if cfg.get("mlp_bias"):
        raise TqedgeError("config.json: mlp_bias is not supported")
    return args


def args_from_gguf(meta: dict, arch: str = "llama") -> LlamaArgs:
    """Build args from GGUF metadata (``{arch}.block_count`` etc.)."""
    def get(key, default=None):
        v = meta.get(f"{arch}.{key}", default)
        if v is None:
            raise TqedgeError(f"GGUF metadata is missing {arch}.{key}")
        return v

    heads = int(get("attention.head_count"))
    hidden = int(get("embedding_length"))
    scaling = None
    if meta.get(f"{arch}.rope.scaling.type") == "linear":
        scaling = {"rope_type": "linear", "factor": float(meta[f"{arch}.rope.scaling.factor"])}
    return LlamaArgs(
        vocab_size=int(meta.get(f"{arch}.vocab_size") or len(meta["tokenizer.ggml.tokens"])),
        hidden_size=hidden, intermediate_size=int(get("feed_forward_length")),
        num_hidden_layers=int(get("block_count")), num_attention_heads=heads,
        num_key_value_heads=int(get("attention.head_count_kv", heads)),
        head_dim=int(get("rope.dimension_count", hidden // heads)),
        rms_norm_eps=float(get("attention.layer_norm_rms_epsilon")),
        rope_theta=float(get("rope.freq_base", 10000.0)),
        max_position_embeddings=int(get("context_length", 2048)),
        tie_word_embeddings=False, rope_scaling=scaling,
    )


def sanitize(weights: dict[str, np.ndarray], args: LlamaArgs) -> tuple[dict[str, np.ndarray], LlamaArgs]:
    """Drop tensors the graph does not use and settle embedding tying.

    A model without ``lm_head.weight`` is tied; a tied model's ``lm_head.weight`` is dropped.
    """
    weights = {k: v for k, v in weights.items() if not HF_IGNORED.match(k)}
    if "lm_head.weight" not in weights:
        args = replace(args, tie_word_embeddings=True)
    elif args.tie_word_embeddings:
        weights.pop("lm_head.weight")
    return weights, args


def unpermute_gguf(weights: dict[str, np.ndarray], args: LlamaArgs) -> dict[str, np.ndarray]:
    """Undo llama.cpp's Q/K row permutation on canonical-named GGUF weights."""
    for i in range(args.num_hidden_layers):
        for proj, heads in (("q_proj", args.num_attention_heads), ("k_proj", args.num_key_value_heads)):
            for kind in ("weight", "bias"):
                name = f"model.layers.{i}.self_attn.{proj}.{kind}"
                if name in weights:
                    weights[name] = unpermute(weights[name], heads)
    return weights


@dataclass(frozen=True)
class Architecture:
    """A registry entry: how to read one architecture from each source format."""

    name: str
    hf_classes: tuple[str, ...]
    gguf_arch: str | None
    args_from_hf: Callable[[dict], LlamaArgs]
    args_from_gguf: Callable[[dict], LlamaArgs] | None
    gguf_names: dict[str, str]
    sanitize: Callable
    gguf_fixup: Callable | None = None  # e.g. un-permute Q/K
    hf_fixup: Callable | None = None  # HF names/conventions → canonical (after sanitize)
    kv_bits: str = "4,3"  # the manifest's default KV bits when the export names none (measured per model)


LLAMA = Architecture(
    name="llama", hf_classes=("LlamaForCausalLM",), gguf_arch="llama",
    args_from_hf=args_from_hf, args_from_gguf=args_from_gguf, gguf_names=GGUF_NAMES,
    sanitize=sanitize, gguf_fixup=unpermute_gguf,
)

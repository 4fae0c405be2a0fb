"""Qwen3: the Llama layout plus an RMSNorm over each head's q and k before RoPE (QK-norm),
no q/k/v biases (HF ``Qwen3ForCausalLM``). Read from the Hugging Face folder only."""

from __future__ import annotations

from tqedge.errors import TqedgeError
from tqedge.exporters.architectures.llama import Architecture, LlamaArgs, args_from_hf, sanitize


def qwen3_args_from_hf(cfg: dict) -> LlamaArgs:
    """Llama args with ``qk_norm`` on; sliding-window attention is refused."""
    if cfg.get("use_sliding_window"):
        raise TqedgeError("config.json: Qwen3 use_sliding_window is not supported")
    args = args_from_hf(cfg)
    args.qk_norm = True
    return args


QWEN3 = Architecture(
    name="qwen3", hf_classes=("Qwen3ForCausalLM",), gguf_arch=None,
    args_from_hf=qwen3_args_from_hf, args_from_gguf=None, gguf_names={}, sanitize=sanitize,
)

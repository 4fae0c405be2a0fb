"""Qwen2: the Llama layout plus q/k/v projection biases (HF ``Qwen2ForCausalLM``).

GGUF Qwen2 files are not read (their tokenizer and layout were not verified); export them
from the Hugging Face folder instead.
"""

from __future__ import annotations

from tqedge.errors import TqedgeError
from tqedge.exporters.architectures.llama import Architecture, LlamaArgs, args_from_hf, sanitize


def qwen2_args_from_hf(cfg: dict) -> LlamaArgs:
    """Llama args with ``attention_bias`` on; sliding-window attention is refused."""
    if cfg.get("use_sliding_window"):
        raise TqedgeError("config.json: Qwen2 use_sliding_window is not supported")
    args = args_from_hf(cfg, attention_bias=True)
    args.attention_bias = True
    return args


QWEN2 = Architecture(
    name="qwen2", hf_classes=("Qwen2ForCausalLM",), gguf_arch=None,
    args_from_hf=qwen2_args_from_hf, args_from_gguf=None, gguf_names={}, sanitize=sanitize,
)

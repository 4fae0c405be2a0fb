"""Graph decisions shared by every emitter (ONNX today, TFLite next): tensor names of the
segment protocol, the layer plan (which segment computes what), and RoPE frequencies.

Nothing here depends on a graph format; an emitter walks :func:`segment_plan` and builds each
step with its own ops.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from tqedge.bundle import INPUT_IDS, LOGITS, LOGITS_INDEX, POSITIONS, ArchSpec
from tqedge.errors import TqedgeError

# Residual stream and RoPE tables passed between segments (names in the backend's tensor dict).
ROPE_COS = "rope.cos"  # float32 (T, 1, D)
ROPE_SIN = "rope.sin"  # float32 (T, 1, D)
ROPE_LOCAL_COS = "rope.local.cos"  # sliding layers' tables when their RoPE base differs (Gemma 3)
ROPE_LOCAL_SIN = "rope.local.sin"


def resid(i: int) -> str:
    """Name of the residual stream entering layer ``i`` (float32 (T, hidden))."""
    return f"layers.{i}.resid"


def attn_name(i: int, kind: str) -> str:
    """Attention tensor ``kind`` ∈ q|k|v|out of layer ``i`` (segment protocol)."""
    return f"layers.{i}.attn.{kind}"


@dataclass
class Segment:
    """One dense segment: finishes layer ``finish`` (o_proj, residual, MLP) if not None, then
    starts layer ``start`` (norm, q/k/v, RoPE) if not None, else runs the LM head."""

    index: int
    finish: int | None
    start: int | None
    inputs: list[str]
    outputs: list[str]

    @property
    def file(self) -> str:
        return f"segments/{self.index:03d}.onnx"


def local_rope(arch: ArchSpec) -> bool:
    """Whether sliding layers get their own RoPE tables (a base of their own)."""
    return bool(arch.layer_types and "sliding_attention" in arch.layer_types and arch.rope_local_theta)


def rope_names(arch: ArchSpec | None, layer: int) -> tuple[str, str]:
    """(cos, sin) tensor names layer ``layer`` rotates its q and k with."""
    if arch is not None and local_rope(arch) and arch.layer_window(layer) is not None:
        return ROPE_LOCAL_COS, ROPE_LOCAL_SIN
    return ROPE_COS, ROPE_SIN


def segment_plan(num_layers: int, arch: ArchSpec | None = None) -> list[Segment]:
    """The L+1 segments of an L-layer model, cut at every attention core (``arch`` only matters
    for models whose sliding layers have their own RoPE tables)."""
    segs = []
    tables = [ROPE_COS, ROPE_SIN] + ([ROPE_LOCAL_COS, ROPE_LOCAL_SIN] if arch is not None and local_rope(arch) else [])
    for s in range(num_layers + 1):
        finish = s - 1 if s > 0 else None
        start = s if s < num_layers else None
        if finish is None:
            inputs = [INPUT_IDS, POSITIONS]
        else:
            inputs = [resid(finish), attn_name(finish, "out")]
        if start is not None:
            outs = [resid(start)] + [attn_name(start, k) for k in "qkv"]
            if finish is None:
                outs += tables
            else:
                inputs += list(rope_names(arch, start))
        else:
            inputs.append(LOGITS_INDEX)
            outs = [LOGITS]
        segs.append(Segment(s, finish, start, inputs, outs))
    return segs


def attention_scale(arch: ArchSpec) -> float:
    """Softmax scale of the attention core: 1/sqrt(head_dim) for the Llama family,
    ``query_pre_attn_scalar ** -0.5`` for Gemma."""
    return 1.0 / math.sqrt(arch.query_pre_attn_scalar or arch.head_dim)


def _default(inv: np.ndarray, cfg: dict) -> np.ndarray:
    return inv


def _linear(inv: np.ndarray, cfg: dict) -> np.ndarray:
    return inv / float(cfg["factor"])


def _llama3(inv: np.ndarray, cfg: dict) -> np.ndarray:
    """Llama 3.1 frequency-dependent scaling (as transformers' ``_compute_llama3_parameters``)."""
    factor = float(cfg["factor"])
    low, high = float(cfg.get("low_freq_factor", 1.0)), float(cfg.get("high_freq_factor", 4.0))
    old_ctx = float(cfg["original_max_position_embeddings"])
    low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
    wavelen = 2 * math.pi / inv
    out = np.where(wavelen > low_wavelen, inv / factor, inv)
    smooth = (old_ctx / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * out / factor + smooth * out
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return np.where(medium, smoothed, out)


ROPE_SCALINGS = {"default": _default, "linear": _linear, "llama3": _llama3}


def rope_inv_freq(arch: ArchSpec, local: bool = False) -> np.ndarray:
    """RoPE inverse frequencies (D/2,) float64, with ``arch.rope_scaling`` folded in; ``local``:
    the sliding layers' (base ``rope_local_theta``, unscaled, as transformers' Gemma 3).

    Raises:
        TqedgeError: for a rope_scaling type the graphs cannot express statically.
    """
    d = arch.head_dim
    theta = arch.rope_local_theta if local else arch.rope_theta
    inv = 1.0 / (theta ** (np.arange(0, d, 2, dtype=np.float64) / d))  # (D/2,)
    if local:
        return inv
    cfg = dict(arch.rope_scaling or {})
    kind = cfg.get("rope_type", cfg.get("type", "default"))
    if kind not in ROPE_SCALINGS:
        raise TqedgeError(f"rope_scaling type {kind!r} is not supported (supported: {', '.join(ROPE_SCALINGS)})")
    return ROPE_SCALINGS[kind](inv, cfg)

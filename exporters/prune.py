"""Structured pruning at export (``--drop-layers``): measure each transformer block's influence
on calibration text, drop blocks, renumber the rest.

Block influence (ShortGPT, Men et al. 2024): ``1 - cos(h_in, h_out)`` between a block's input
and output hidden states, averaged over the calibration tokens; a block that barely turns the
residual stream is the cheapest to remove. It is measured here in NumPy, float32, on the
ModelSpec's own weights (a plain causal forward of the Llama family: RMSNorm, RoPE, GQA,
SwiGLU, optional q/k/v biases), together with the calibration perplexity with and without the
dropped blocks — the measured cost recorded in the manifest (``pruning``).

Renumbering is one function, :func:`keep_layers`: layer ``keep[j]`` of the source becomes layer
``j`` in the weights, the pre-quantized blocks and every per-layer list of the ArchSpec (any
list-valued field whose length is ``num_layers``, e.g. a local/global attention pattern).
"""

from __future__ import annotations

import dataclasses
import logging
import re
from pathlib import Path

import numpy as np

from tqedge.bundle import PruningSpec
from tqedge.errors import TqedgeError
from tqedge.exporters.plan import attention_scale, rope_inv_freq
from tqedge.exporters.spec import ModelSpec

log = logging.getLogger(__name__)

CALIBRATION_TOKENS = 256  # enough for a stable ranking (SmolLM2: same order from 128 to 1024)
MEASURED_ARCHS = ("llama", "qwen2")  # architectures the NumPy forward below computes exactly
_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.*)$")


def parse_drop_layers(text: str | None, num_layers: int) -> tuple[str, int | list[int]] | None:
    """``"auto:N"`` → ("auto", N); ``"3,7"`` → ("manual", [3, 7]); None/"" → None.

    Raises:
        TqedgeError: malformed text, a block the model does not have, or dropping every block.
    """
    if text is None or str(text).strip() == "":
        return None
    t = str(text).strip()
    if t.startswith("auto:"):
        n = t[5:]
        if not n.isdigit() or not 0 < int(n) < num_layers:
            raise TqedgeError(f"--drop-layers {t!r}: N must be 1..{num_layers - 1} (the model has {num_layers} blocks)")
        return "auto", int(n)
    parts = [p.strip() for p in t.split(",")]
    if not all(p.isdigit() for p in parts):
        raise TqedgeError(f"--drop-layers {t!r}: give auto:N or block indices like 3,7")
    idx = sorted({int(p) for p in parts})
    if len(idx) != len(parts) or idx[-1] >= num_layers or len(idx) >= num_layers:
        raise TqedgeError(f"--drop-layers {t!r}: distinct blocks of 0..{num_layers - 1}, at least one kept")
    return "manual", idx


def keep_layers(spec: ModelSpec, keep: list[int]) -> ModelSpec:
    """The model with only source blocks ``keep`` (ascending), renumbered 0..len(keep)-1."""
    n = spec.arch.num_layers
    new_index = {old: new for new, old in enumerate(keep)}

    def rename(d: dict) -> dict:
        out = {}
        for name, w in d.items():
            m = _LAYER.match(name)
            if m is None:
                out[name] = w
            elif int(m.group(1)) in new_index:
                out[f"model.layers.{new_index[int(m.group(1))]}.{m.group(2)}"] = w
        return out

    per_layer = {f.name: [getattr(spec.arch, f.name)[i] for i in keep] for f in dataclasses.fields(spec.arch)
                 if isinstance(getattr(spec.arch, f.name), (list, tuple)) and len(getattr(spec.arch, f.name)) == n}
    arch = dataclasses.replace(spec.arch, num_layers=len(keep), **per_layer)
    return dataclasses.replace(spec, arch=arch, weights=rename(spec.weights), quant=rename(spec.quant))


def remap_layer_bits(layer_bits: dict | None, keep: list[int]) -> dict | None:
    """Per-layer KV bit overrides given for source blocks → the renumbered layers.

    Raises:
        TqedgeError: an override names a dropped block.
    """
    if not layer_bits:
        return layer_bits
    new_index = {old: new for new, old in enumerate(keep)}
    dropped = [k for k in layer_bits if int(k) not in new_index]
    if dropped:
        raise TqedgeError(f"per-layer kv bits name layer {dropped[0]}, which --drop-layers removes "
                          "(overrides use the source model's layer numbers)")
    return {str(new_index[int(k)]): v for k, v in layer_bits.items()}


# -- the NumPy reference forward -------------------------------------------------------------
def _rmsnorm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    return (x / np.sqrt((x * x).mean(-1, keepdims=True) + eps)) * w


def _rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    half = x.shape[-1] // 2
    return x * cos + np.concatenate([-x[..., half:], x[..., :half]], -1) * sin


def _block(spec: ModelSpec, i: int, h: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """Decoder block ``i`` on the residual stream ``h`` (T, H) → (T, H)."""
    a, w, p = spec.arch, spec.weights, f"model.layers.{i}."
    t, d = h.shape[0], a.head_dim
    x = _rmsnorm(h, w[p + "input_layernorm.weight"], a.rms_norm_eps)

    def proj(kind: str, heads: int) -> np.ndarray:
        y = x @ w[f"{p}self_attn.{kind}_proj.weight"].T
        b = w.get(f"{p}self_attn.{kind}_proj.bias")
        return (y if b is None else y + b).reshape(t, heads, d)

    q = _rope(proj("q", a.num_heads), cos, sin)
    k = np.repeat(_rope(proj("k", a.num_kv_heads), cos, sin), a.num_heads // a.num_kv_heads, axis=1)
    v = np.repeat(proj("v", a.num_kv_heads), a.num_heads // a.num_kv_heads, axis=1)
    s = np.einsum("thd,shd->hts", q, k) * np.float32(attention_scale(a))  # (Hq, T, T)
    s = np.where(np.tri(t, dtype=bool), s, -np.inf)
    s = np.exp(s - s.max(-1, keepdims=True))
    o = np.einsum("hts,shd->thd", s / s.sum(-1, keepdims=True), v).reshape(t, a.num_heads * d)
    h = h + o @ w[p + "self_attn.o_proj.weight"].T
    x = _rmsnorm(h, w[p + "post_attention_layernorm.weight"], a.rms_norm_eps)
    g = x @ w[p + "mlp.gate_proj.weight"].T
    act = g / (1 + np.exp(-g)) * (x @ w[p + "mlp.up_proj.weight"].T)
    return h + act @ w[p + "mlp.down_proj.weight"].T


def _run(spec: ModelSpec, ids: list[int], layers: list[int]) -> tuple[np.ndarray, list[float]]:
    """Hidden states through ``layers``; returns (final residual (T, H), influence per layer)."""
    a = spec.arch
    h = spec.weights["model.embed_tokens.weight"][np.asarray(ids)]
    f = np.arange(len(ids), dtype=np.float64)[:, None] * rope_inv_freq(a)[None]  # (T, D/2)
    emb = np.concatenate([f, f], -1)[:, None, :]  # (T, 1, D)
    cos, sin = np.cos(emb).astype(np.float32), np.sin(emb).astype(np.float32)
    influence = []
    for i in layers:
        out = _block(spec, i, h, cos, sin)
        cs = (h * out).sum(-1) / (np.linalg.norm(h, axis=-1) * np.linalg.norm(out, axis=-1) + 1e-12)
        influence.append(float(1.0 - cs.mean()))
        h = out
    return h, influence


def _perplexity(spec: ModelSpec, h: np.ndarray, ids: list[int]) -> float:
    a, w = spec.arch, spec.weights
    x = _rmsnorm(h[:-1], w["model.norm.weight"], a.rms_norm_eps)
    head = w["model.embed_tokens.weight" if a.tie_word_embeddings else "lm_head.weight"]
    logits = (x @ head.T).astype(np.float64)  # (T-1, V)
    m = logits.max(-1, keepdims=True)
    lse = (m + np.log(np.exp(logits - m).sum(-1, keepdims=True)))[:, 0]
    return float(np.exp(np.mean(lse - logits[np.arange(len(ids) - 1), ids[1:]])))


def calibration_ids(spec: ModelSpec, path: str | Path | None) -> tuple[list[int], str]:
    """Token ids of the calibration text (default: the shipped WikiText-2 excerpt), at most
    :data:`CALIBRATION_TOKENS`, and the text's name for the manifest."""
    from tokenizers import Tokenizer

    from tqedge import data

    p = Path(path) if path is not None else data.text_path(data.DEFAULT_TEXT)
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise TqedgeError(f"cannot read calibration text {p}: {e}") from None
    ids = Tokenizer.from_str(spec.tokenizer_json).encode(text, add_special_tokens=False).ids
    tok = spec.tokenizer
    if tok.add_bos_token and tok.bos_token_id is not None:
        ids = [tok.bos_token_id] + ids
    ids = ids[:CALIBRATION_TOKENS]
    if len(ids) < 16:
        raise TqedgeError(f"calibration text {p} has {len(ids)} tokens; at least 16 are needed")
    return ids, p.name


def prune(spec: ModelSpec, drop: tuple[str, int | list[int]], calibration=None) -> tuple[ModelSpec, PruningSpec]:
    """Drop blocks from ``spec`` as :func:`parse_drop_layers` said, measuring on calibration text.

    ``("auto", N)`` drops the N blocks of least influence; ``("manual", [i, ...])`` the given
    ones (measured too when the architecture is one the NumPy forward computes, else recorded
    unmeasured).

    Returns:
        (the renumbered ModelSpec, the manifest's PruningSpec).

    Raises:
        TqedgeError: ``auto`` on an architecture without a measuring forward; bad calibration text.
    """
    method, arg = drop
    n = spec.arch.num_layers
    measurable = spec.arch.name in MEASURED_ARCHS
    if not measurable:
        if method == "auto":
            raise TqedgeError(f"--drop-layers auto needs block influence, not measured for {spec.arch.name!r} "
                              f"(measured: {', '.join(MEASURED_ARCHS)}); give block indices instead")
        log.warning("block influence is not measured for %s; dropping %s unmeasured", spec.arch.name, arg)
        keep = [i for i in range(n) if i not in arg]
        return keep_layers(spec, keep), PruningSpec(dropped=list(arg), original_num_layers=n, method=method)
    ids, name = calibration_ids(spec, calibration)
    h, influence = _run(spec, ids, list(range(n)))
    ppl = _perplexity(spec, h, ids)
    dropped = sorted(np.argsort(influence, kind="stable")[:arg].tolist()) if method == "auto" else list(arg)
    keep = [i for i in range(n) if i not in dropped]
    h2, _ = _run(spec, ids, keep)
    ppl2 = _perplexity(spec, h2, ids)
    log.info("dropping blocks %s (influence %s): calibration PPL %.2f -> %.2f", dropped,
             [round(influence[i], 4) for i in dropped], ppl, ppl2)
    return keep_layers(spec, keep), PruningSpec(
        dropped=dropped, original_num_layers=n, method=method, influence=influence, calibration=name,
        calibration_tokens=len(ids), calibration_ppl=ppl, calibration_ppl_pruned=ppl2)

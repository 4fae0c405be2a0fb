"""The ``--kv-bits`` grammar: ``exact``, a preset name, ``4,3`` / ``(4, 3)`` / ``3.5``, and per-layer
overrides ``K4V3+L4,7@K4V2`` (parsed here; the caches and the exporter take the parsed bits)."""

from __future__ import annotations

import re

from tqedge.errors import TqedgeError

# Named KV configurations, chosen from the quality study (docs/RESULTS.md, SmolLM2, ctx 1024):
# ΔPPL wikitext / tinyshakespeare and KV bytes per token (fp16 = 23,040).
KV_PRESETS = {
    "quality": (4.0, 4.0),  # +0.21 % / +0.18 %, 6,120 B (3.8x smaller than fp16)
    "balanced": (4.0, 3.0),  # +0.42 % / +0.31 %, 5,400 B (4.3x) — the shipped default
    "tiny": (3.0, 2.0),  # ≈ +3 % / +1.4 % (one window), 3,960 B (5.8x)
}


def parse_kv_bits(kv_bits) -> tuple[float, float] | None:
    """``"exact"`` (or None) → None; a preset name (``quality``, ``balanced``, ``tiny``) or
    ``"4,3"`` / ``(4, 3)`` / ``4`` → (key_bits, value_bits)."""
    if kv_bits is None or (isinstance(kv_bits, str) and kv_bits.strip().lower() in ("exact", "fp32", "none")):
        return None
    if isinstance(kv_bits, str) and kv_bits.strip().lower() in KV_PRESETS:
        return KV_PRESETS[kv_bits.strip().lower()]
    try:
        if isinstance(kv_bits, str):
            parts = [float(p) for p in kv_bits.split(",")]
        elif isinstance(kv_bits, (int, float)):
            parts = [float(kv_bits)]
        else:
            parts = [float(p) for p in kv_bits]
    except (TypeError, ValueError):
        raise TqedgeError(f"kv bits must look like 4,3, exact or a preset ({', '.join(KV_PRESETS)}), not {kv_bits!r}") from None
    if len(parts) == 1:
        parts = parts * 2
    if len(parts) != 2 or not all(1 <= p <= 8 for p in parts):
        raise TqedgeError(f"kv bits must be two numbers in 1..8 (keys,values) or exact, not {kv_bits!r}")
    return parts[0], parts[1]


KV_SPEC = re.compile(r"K([\d.]+)V([\d.]+)((?:\+L[\d,]+@K[\d.]+V[\d.]+)*)", re.IGNORECASE)
LAYER_OVERRIDE = re.compile(r"\+L([\d,]+)@K([\d.]+)V([\d.]+)", re.IGNORECASE)


def parse_kv_spec(kv_bits) -> tuple[tuple[float, float] | None, dict[str, list[float]] | None]:
    """Like :func:`parse_kv_bits`, plus per-layer overrides written ``K4V3+L4,7,12@K4V2+L0@K8V4``
    (keys 4 / values 3 bits, layers 4, 7 and 12 at K4V2, layer 0 at K8V4).

    Returns:
        ((key_bits, value_bits) or None for exact, {"layer": [key_bits, value_bits]} or None).
    """
    m = KV_SPEC.fullmatch(kv_bits.strip()) if isinstance(kv_bits, str) else None
    if m is None:
        return parse_kv_bits(kv_bits), None
    base = parse_kv_bits(f"{m.group(1)},{m.group(2)}")
    layers: dict[str, list[float]] = {}
    for ls, k, v in LAYER_OVERRIDE.findall(m.group(3)):
        kb, vb = parse_kv_bits(f"{k},{v}")
        for layer in ls.split(","):
            if layer == "" or str(int(layer)) in layers:
                raise TqedgeError(f"kv bits {kv_bits!r}: empty or repeated layer {layer!r}")
            layers[str(int(layer))] = [kb, vb]
    return base, layers or None


def check_layer_bits(layer_bits: dict | None, num_layers: int) -> None:
    """Refuse per-layer overrides naming a layer the model does not have."""
    bad = [k for k in (layer_bits or {}) if not (str(k).isdigit() and int(k) < num_layers)]
    if bad:
        raise TqedgeError(f"per-layer kv bits name layer {bad[0]}, the model has layers 0..{num_layers - 1}")

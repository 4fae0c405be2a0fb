"""Per-layer KV bit allocation from measured sensitivity.

``sweep`` measures, on the real runtime, how much each layer alone costs when its KV cache
drops from a base configuration to a cheaper one: one configuration per layer (the base with
only that layer lowered), all in lock step with the exact cache (``benchmarks/quality.py``'s
driver), so every row is scored on the same tokens. The cost of layer ``l`` is
``KL(base with l lowered) − KL(base)`` (mean nats/token against the exact cache).

``allocate`` then lowers the least sensitive layers first until the bytes per token fit a
target, assuming the per-layer costs add up (checked by measuring the result with
``quality.py``), and prints the configuration's name (e.g. ``K4V3+L4,7,12@K4V2``), which
``quality.py --configs`` and ``tqedge export --kv-layer-bits`` accept.

    python benchmarks/layer_bits.py sweep --bundle smol-fp32.tqe --text wikitext --ctx 1024 \\
        --windows 2 --base 4,3 --low 4,2 --out benchmarks/out/layers_wikitext.json
    python benchmarks/layer_bits.py allocate benchmarks/out/layers_*.json --max-bytes 5120
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import quality

log = logging.getLogger("benchmarks.layer_bits")


def bits_name(bits: str) -> str:
    k, v = (float(b) for b in bits.split(","))
    return f"K{k:g}V{v:g}"


def sweep_configs(base: str, low: str, layers: int) -> list:
    """The base configuration, then one per layer with only that layer at ``low``."""
    names = [bits_name(base)] + [f"{bits_name(base)}+L{layer}@{bits_name(low)}" for layer in range(layers)]
    return quality.pick(";".join(names))


def costs(docs: list[dict]) -> tuple[dict, dict]:
    """Per-layer KL cost summed over result files (texts), and the bytes each layer saves.

    Returns:
        ({layer: ΔKL}, {"base": name, "low": bits name, "bytes": base bytes/token,
        "saved": bytes/token saved per lowered layer, "layers": n}).
    """
    total: dict[int, float] = {}
    info: dict = {}
    for d in docs:
        rows = d["results"]
        base = rows[0]
        for r in rows[1:]:
            (layer,) = (int(k) for k in r["settings"]["layer_bits"])
            total[layer] = total.get(layer, 0.0) + r["kl"] - base["kl"]
            info = {"base": base["config"], "low": r["config"].split("@")[1], "bytes": base["bytes_per_token"],
                    "saved": base["bytes_per_token"] - r["bytes_per_token"], "layers": len(rows) - 1}
    return total, info


def allocate(docs: list[dict], max_bytes: int) -> dict:
    """Lower the least sensitive layers until bytes/token ≤ ``max_bytes``.

    Returns:
        {"config": name, "bytes_per_token": int, "lowered": [layers], "predicted_kl_cost": float}.
    """
    cost, info = costs(docs)
    if not cost:
        raise SystemExit("no per-layer rows in the sweep files")
    need = max(0, info["bytes"] - max_bytes)
    n = -(-need // info["saved"]) if info["saved"] else 0
    if n > info["layers"]:
        raise SystemExit(f"even lowering every layer leaves {info['bytes'] - info['layers'] * info['saved']} "
                         f"bytes/token > {max_bytes}")
    lowered = sorted(sorted(cost, key=cost.get)[:n])
    name = info["base"] + (f"+L{','.join(map(str, lowered))}@{info['low']}" if lowered else "")
    return {"config": name, "bytes_per_token": info["bytes"] - n * info["saved"], "lowered": lowered,
            "predicted_kl_cost": sum(cost[layer] for layer in lowered),
            "ranking": sorted(cost, key=cost.get, reverse=True), "cost": {str(k): cost[k] for k in sorted(cost)}}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("sweep", help="measure each layer's KL cost")
    s.add_argument("--bundle", type=Path, required=True)
    s.add_argument("--text", default="wikitext")
    s.add_argument("--ctx", type=int, default=1024)
    s.add_argument("--windows", type=int, default=2)
    s.add_argument("--skip", type=int, default=0)
    s.add_argument("--base", default="4,3")
    s.add_argument("--low", default="4,2")
    s.add_argument("--layers", type=int, default=None, help="default: the bundle's layer count")
    s.add_argument("--out", type=Path, required=True)
    a_ = sub.add_parser("allocate", help="pick layers to lower from sweep files")
    a_.add_argument("files", nargs="+", type=Path)
    a_.add_argument("--max-bytes", type=int, default=5120, help="target bytes/token (scales included)")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    if a.cmd == "sweep":
        from tqedge.bundle import read_manifest

        layers = a.layers or read_manifest(a.bundle, verify="none").architecture.num_layers
        quality.run(a.bundle, a.text, a.ctx, a.windows, sweep_configs(a.base, a.low, layers), a.out, 512, a.skip)
        print(json.dumps(costs([json.loads(a.out.read_text())])[0], indent=1))
        return 0
    print(json.dumps(allocate([json.loads(p.read_text()) for p in a.files], a.max_bytes), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""What the 262K-token embedding costs (Gemma 3 270M): bundles side by side, each measured in
a fresh process — weights on disk, resident memory after load, peak RSS (after a short
generation), prefill and decode speed (medians).

    python benchmarks/gemma_embed.py --bundle fp16-gather=/tmp/g1.tqe --bundle int8-shared=/tmp/g2.tqe \
        --out benchmarks/out/gemma_embed.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

PROMPT = "The capital of France is Paris. The capital of Germany is Berlin. The capital of Italy is"


def worker(bundle: str, steps: int, repeats: int) -> dict:
    import numpy as np

    import tqedge
    from tqedge.runtime.memory import current_rss, peak_rss

    t0 = time.perf_counter()
    model = tqedge.load(bundle, verify="none")
    load_s = time.perf_counter() - t0
    rss_load = current_rss()
    ids = model.encode(PROMPT)
    prefill, decode = [], []
    for _ in range(repeats):
        cache = model.new_cache(kv_budget="32MiB")
        t = time.perf_counter()
        logits = model.forward(ids, cache)
        prefill.append(len(ids) / (time.perf_counter() - t))
        tok = int(np.argmax(logits))
        t = time.perf_counter()
        for _ in range(steps):
            tok = int(np.argmax(model.forward([tok], cache)))
        decode.append(steps / (time.perf_counter() - t))
    files = model.manifest.files
    return {"weights_bytes": sum(f.bytes for k, f in files.items() if k.endswith(".bin")),
            "load_s": load_s, "rss_after_load": rss_load, "peak_rss": peak_rss(),
            "prefill_tok_s": float(np.median(prefill)), "decode_tok_s": float(np.median(decode)),
            "prompt_tokens": len(ids), "decode_steps": steps, "repeats": repeats}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", action="append", required=True, help="name=path")
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default="benchmarks/out/gemma_embed.json")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.steps, args.repeats)))
        return
    rows = {}
    for spec in args.bundle:
        name, path = spec.split("=", 1)
        out = subprocess.run([sys.executable, __file__, "--bundle", spec, "--worker", path, "--steps", str(args.steps),
                              "--repeats", str(args.repeats)], capture_output=True, text=True, check=True)
        rows[name] = json.loads(out.stdout.strip().splitlines()[-1])
        print(name, rows[name], flush=True)
    load = os.getloadavg()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"bundles": rows, "loadavg": load, "cpus": os.cpu_count()}, indent=1) + "\n")


if __name__ == "__main__":
    main()

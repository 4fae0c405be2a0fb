"""Prefill and decode speed and memory of the graph backends (native, onnx, tflite) on the same bundle(s).

Each (bundle, backend) pair runs in its own worker process so RSS is that backend's alone. The
worker loads the model, prefills ``--prefill`` wikitext tokens (exact KV cache; one warm-up run,
then the median of ``--repeats``), then times ``--decode`` greedy decode steps (median step).
CPU time (``time.process_time``, all threads) is recorded next to wall time: on a shared
machine wall time measures the neighbours, CPU time per token still compares the backends.
Memory: RSS split into anonymous (heap, packed weights, arenas) and file-backed (the mapped
graph/weights files, reclaimable), plus the peak. Results go to ``benchmarks/out/backends.json``.

    python benchmarks/backends.py --bundle /tmp/smol.tqe [--bundle /tmp/smol-int8.tqe] \\
        [--backends native,onnx,tflite] [--threads 2] [--prefill 128] [--decode 32]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
DATA = HERE.parent.parent / "shared" / "data" / "wikitext2-valid.txt"
MEMORY_KEYS = {"anon": "rss_anon_mib", "file": "rss_file_mib", "peak": "peak_rss_mib"}  # of rss_breakdown()


def worker(bundle: str, backend: str, threads: int, n_prefill: int, n_decode: int, repeats: int) -> dict:
    """Measure one backend on one bundle (runs in a fresh process)."""
    import numpy as np

    from tqedge.runtime.memory import rss_breakdown
    from tqedge.runtime.model import load

    t0 = time.perf_counter()
    model = load(bundle, backend=backend, threads=threads, verify="none")
    load_s = time.perf_counter() - t0
    ids = model.encode(DATA.read_text(encoding="utf-8")[:20000])[:n_prefill]
    times, cpu = [], []
    for _ in range(repeats + 1):  # the first run also pays one-off allocation / weight packing
        cache = model.new_cache(kv_bits="exact", kv_budget="64MiB")
        t, c = time.perf_counter(), time.process_time()
        logits = model.forward(ids, cache)
        times.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
    steps, steps_cpu = [], []
    tok = int(np.argmax(logits))
    for _ in range(n_decode):
        t, c = time.perf_counter(), time.process_time()
        logits = model.forward([tok], cache)
        steps.append(time.perf_counter() - t)
        steps_cpu.append(time.process_time() - c)
        tok = int(np.argmax(logits))
    mem = rss_breakdown()
    return {"bundle": bundle, "backend": backend, "weights": model.manifest.weights.format, "threads": threads,
            "load_s": round(load_s, 3), "first_prefill_s": round(times[0], 3),
            "prefill_tokens": len(ids), "prefill_tok_s": round(len(ids) / statistics.median(times[1:]), 2),
            "prefill_cpu_ms_per_token": round(1e3 * statistics.median(cpu[1:]) / len(ids), 2),
            "decode_steps": n_decode, "decode_tok_s": round(1 / statistics.median(steps), 2),
            "decode_cpu_ms_per_token": round(1e3 * statistics.median(steps_cpu), 2),
            "load_avg_1min": round(os.getloadavg()[0], 2),
            **{name: mem[k] / 2**20 for k, name in MEMORY_KEYS.items() if k in mem}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", action="append", default=[], help="bundle directory (repeatable)")
    ap.add_argument("--backends", default="onnx,tflite")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prefill", type=int, default=128)
    ap.add_argument("--decode", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", default=str(HERE / "out" / "backends.json"))
    ap.add_argument("--worker", nargs=2, metavar=("BUNDLE", "BACKEND"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        res = worker(*args.worker, args.threads, args.prefill, args.decode, args.repeats)
        sys.stdout.write(json.dumps(res) + "\n")
        return
    if not args.bundle:
        ap.error("give at least one --bundle")
    from tqedge.bundle import read_manifest
    from tqedge.runtime.backends import BACKENDS

    results = []
    for bundle in args.bundle:
        have = read_manifest(bundle, verify="none").graphs
        for backend in args.backends.split(","):
            if BACKENDS[backend][2] not in have:  # native runs the "onnx" graph
                continue
            cmd = [sys.executable, __file__, "--worker", bundle, backend, "--threads", str(args.threads),
                   "--prefill", str(args.prefill), "--decode", str(args.decode), "--repeats", str(args.repeats)]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode:
                sys.exit(f"worker {bundle} {backend} failed:\n{proc.stderr[-2000:]}")
            res = json.loads(proc.stdout.strip().splitlines()[-1])
            results.append(res)
            sys.stderr.write(f"{Path(bundle).name:>20} {backend:>6} {res['weights']:>5}: prefill "
                             f"{res['prefill_tok_s']:7.1f} tok/s ({res['prefill_cpu_ms_per_token']:.1f} cpu-ms/tok)  "
                             f"decode {res['decode_tok_s']:6.1f} tok/s ({res['decode_cpu_ms_per_token']:.1f} cpu-ms/tok)  "
                             f"RSS anon {res['rss_anon_mib']:6.0f} + file {res['rss_file_mib']:5.0f} MiB "
                             f"(peak {res['peak_rss_mib']:.0f})\n")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"machine": platform.machine(), "python": platform.python_version(), "cpu_count": os.cpu_count()}
    out.write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    sys.stderr.write(f"wrote {out}\n")


if __name__ == "__main__":
    main()

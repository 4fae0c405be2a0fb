"""Decode speed under CPU contention: idle vs beside one CPU-bound busy loop, default environment.

Each worker process loads the bundle, prefills 256 tokens of the shipped wikitext excerpt
through the model (default KV cache) and fills the cache up to ``--context`` tokens with random
keys/values through the cache API (decode speed does not depend on the values; this skips the
dense model's prefill), then times ``--repeats`` runs of ``--steps`` greedy decode steps and
reports the median tok/s. It runs twice per variant and round: once
on an otherwise idle process table, once beside a ``python -c 'while 1: pass'`` child (one
busy core of 2 is what "a phone always has other processes" looks like). Idle and busy runs
alternate, so machine drift hits both sides alike; the figure is busy / idle.

Workers run in the *default environment*: ``OMP_WAIT_POLICY``, ``GOMP_SPINCOUNT``,
``NUMBA_THREADING_LAYER`` and ``NUMBA_NUM_THREADS`` are removed unless a variant sets them.
A variant is ``label=SRC[:VAR=VALUE,...]``: the source tree to import tqedge from (e.g. an
exported copy of an older commit, for before/after) and extra environment;
``BENCH_KERNEL_THREADS=1`` runs the attention kernels on one thread while onnxruntime keeps
``--threads`` (serial decode kernels, for the "parallel at decode or not" comparison);
``BENCH_BACKEND=native`` picks the backend (default: what ``tqedge.load`` picks).

    python benchmarks/threads.py --bundle /tmp/int4.tqe --variant now=. \\
        --variant before=/tmp/base --variant passive=/tmp/base:OMP_WAIT_POLICY=PASSIVE
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
CLEAN = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "NUMBA_THREADING_LAYER", "NUMBA_NUM_THREADS", "OMP_NUM_THREADS")
BUSY = "while 1: pass"
REAL_PREFILL = 256  # tokens prefilled by the model; the rest of the context is synthetic


def worker(bundle: str, context: int, steps: int, repeats: int, threads: int | None) -> dict:
    """Prefill ``context`` tokens, then time decode; runs in a fresh process."""
    import numpy as np

    import tqedge
    from tqedge.data import read_text

    sys.path.insert(0, str(HERE))
    from decode import synthetic_fill

    model = tqedge.load(bundle, threads=threads, verify="none", backend=os.environ.get("BENCH_BACKEND") or None)
    kernel_threads = os.environ.get("BENCH_KERNEL_THREADS")
    if kernel_threads:
        from tqedge.codec import kernels

        model._set_kernel_threads = lambda _: kernels.set_threads(int(kernel_threads))
    ids = model.encode(read_text("wikitext2"))[:REAL_PREFILL]
    cache = model.new_cache(kv_budget="128MiB")
    t0 = time.perf_counter()
    logits = model.forward(ids, cache)
    prefill_s = time.perf_counter() - t0
    synthetic_fill(cache, model.arch, context - cache.offset, np.random.default_rng(0))
    per_run, cpu_per_tok, worst = [], [], 0.0
    tok = int(np.argmax(logits))
    for _ in range(repeats):
        t, c = time.perf_counter(), time.process_time()
        for _ in range(steps):
            s = time.perf_counter()
            tok = int(np.argmax(model.forward([tok], cache)))
            worst = max(worst, time.perf_counter() - s)
        per_run.append(steps / (time.perf_counter() - t))
        cpu_per_tok.append((time.process_time() - c) / steps)
    layer = None
    try:
        import numba

        layer = numba.threading_layer()
    except (ImportError, ValueError):  # no parallel kernel ran, or no numba
        pass
    return {"context": context, "prefill_tok_s": len(ids) / prefill_s, "decode_tok_s": statistics.median(per_run),
            "decode_tok_s_runs": per_run, "worst_step_ms": worst * 1e3,
            "decode_cpu_ms_per_token": 1e3 * statistics.median(cpu_per_tok), "numba_layer": layer,
            "threads_after": len(os.listdir("/proc/self/task")) if os.path.isdir("/proc/self/task") else None}


def run_worker(src: str, env_extra: dict, args, busy: bool) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in CLEAN}
    env.update(env_extra)
    env["PYTHONPATH"] = os.path.abspath(src)
    cmd = [sys.executable, __file__, "--worker", "--bundle", args.bundle, "--context", str(args.context),
           "--steps", str(args.steps), "--repeats", str(args.repeats)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    hog = subprocess.Popen([sys.executable, "-c", BUSY]) if busy else None
    try:
        out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True, timeout=3600)
    finally:
        if hog is not None:
            hog.kill()
            hog.wait()
    return json.loads(out.stdout.strip().splitlines()[-1])


def parse_variant(text: str) -> tuple[str, str, dict]:
    label, _, rest = text.partition("=")
    src, _, envs = rest.partition(":")
    env = dict(kv.split("=", 1) for kv in envs.split(",") if kv)
    return label, src or ".", env


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bundle", required=True)
    p.add_argument("--variant", action="append", default=[], help="label=SRC[:VAR=VALUE,...] (repeatable)")
    p.add_argument("--context", type=int, default=2048)
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--rounds", type=int, default=2, help="idle/busy pairs per variant (medians over rounds)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--no-prewarm", dest="prewarm", action="store_false", help="skip the untimed first run per variant")
    p.add_argument("--out", default=str(HERE / "out" / "threads.json"))
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.bundle, args.context, args.steps, args.repeats, args.threads)))
        return
    variants = [parse_variant(v) for v in args.variant] or [("now", ".", {})]
    runs = {label: {"idle": [], "busy": []} for label, _, _ in variants}
    for label, src, env in variants if args.prewarm else []:  # untimed: compiles each tree's kernels first
        res = run_worker(src, env, argparse.Namespace(**{**vars(args), "steps": 2, "repeats": 1}), False)
        print(f"{label:12s} warm-up run done (layer {res['numba_layer']})", flush=True)
    load_before = os.getloadavg()
    for r in range(args.rounds):
        for label, src, env in variants:
            for cond in (("idle", "busy") if r % 2 == 0 else ("busy", "idle")):
                res = run_worker(src, env, args, cond == "busy")
                runs[label][cond].append(res)
                print(f"{label:12s} {cond:4s} decode {res['decode_tok_s']:6.2f} tok/s  "
                      f"CPU {res.get('decode_cpu_ms_per_token', float('nan')):6.1f} ms/tok  worst step "
                      f"{res['worst_step_ms']:7.1f} ms  prefill {res['prefill_tok_s']:6.1f} tok/s  "
                      f"layer {res['numba_layer']}  threads {res['threads_after']}", flush=True)
    summary = {}
    for label, src, env in variants:
        idle = statistics.median(x["decode_tok_s"] for x in runs[label]["idle"])
        busy = statistics.median(x["decode_tok_s"] for x in runs[label]["busy"])
        cpu = {c: statistics.median(x.get("decode_cpu_ms_per_token", float("nan")) for x in runs[label][c])
               for c in ("idle", "busy")}
        summary[label] = {"src": src, "env": env, "idle_tok_s": idle, "busy_tok_s": busy, "busy_over_idle": busy / idle,
                          "idle_cpu_ms_per_token": cpu["idle"], "busy_cpu_ms_per_token": cpu["busy"]}
        print(f"{label:12s} idle {idle:6.2f}  busy {busy:6.2f} tok/s  busy/idle {busy / idle:.2f}")
    data = {"bundle": args.bundle, "machine": platform.platform(), "cpus": os.cpu_count(),
            "context": args.context, "steps": args.steps, "repeats": args.repeats, "rounds": args.rounds,
            "threads": args.threads, "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
            "summary": summary, "runs": runs}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

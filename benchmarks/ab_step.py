"""Decode step time of two (or more) source trees of tqedge, side by side: an A/B of a change.

For each round, context and tree, a child process with ``PYTHONPATH=<tree>`` (each tree imports
its own tqedge, and Numba caches its kernels per source) loads the bundle with the given threads,
prefills a 32-token prompt, fills the default compressed cache to the context with random keys and
values (benchmarks/decode.py's ``synthetic_fill``: decode speed does not depend on the values),
then times greedy decode steps through ``Model.forward``: median wall and CPU milliseconds after 3
untimed steps. Trees alternate within a round; the summary is the median over rounds.

    python benchmarks/ab_step.py --bundle smol-int4.tqe --trees /tmp/wt-old,/tmp/wt-new \\
        [--contexts 2048,8192] [--rounds 3] [--steps 32] [--threads 2] [--out benchmarks/out/ab_step.json]

``--bundle`` may list one bundle per tree (``old.tqe,new.tqe``) when a change is in the graph too:
each tree then runs the bundle its own exporter wrote. ``--prefill``: time prompt chunks instead
(the context's first tokens of the shipped WikiText-2 excerpt in chunks of ``--chunk``, a fresh
cache per repeat, 3 repeats after an untimed one): wall and CPU ms per chunk, and tokens/s.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def child(bundle: str, ctx: int, steps: int, threads: int) -> dict:
    import numpy as np

    sys.path.insert(0, str(HERE))
    from decode import synthetic_fill

    from tqedge.runtime.model import load

    model = load(bundle, verify="none", threads=threads)
    cache = model.new_cache()
    ids = model.encode("The quick brown fox jumps over the lazy dog. " * 8)[:32]
    model.forward(ids, cache)
    synthetic_fill(cache, model.arch, ctx - len(ids), np.random.default_rng(0))
    tok = np.array([ids[-1]], np.int64)
    walls, cpus = [], []
    for i in range(steps + 3):
        w0, c0 = time.perf_counter(), time.process_time()
        out = model.forward(tok, cache)
        w1, c1 = time.perf_counter(), time.process_time()
        if i >= 3:
            walls.append((w1 - w0) * 1e3)
            cpus.append((c1 - c0) * 1e3)
        tok = np.array([int(out.argmax())], np.int64)
    return {"wall_ms": statistics.median(walls), "cpu_ms": statistics.median(cpus), "offset": cache.offset}


def child_prefill(bundle: str, ctx: int, chunk: int, threads: int) -> dict:
    from tqedge.data import read_text
    from tqedge.runtime.model import load

    model = load(bundle, verify="none", threads=threads)
    ids = model.encode(read_text() * 4)[:ctx]
    walls, cpus = [], []
    for r in range(4):
        cache = model.new_cache()
        w0, c0 = time.perf_counter(), time.process_time()
        for i in range(0, len(ids), chunk):
            model.forward(ids[i: i + chunk], cache)
        if r:
            walls.append(time.perf_counter() - w0)
            cpus.append(time.process_time() - c0)
    n = -(-len(ids) // chunk)
    wall = statistics.median(walls)
    return {"wall_ms": wall / n * 1e3, "cpu_ms": statistics.median(cpus) / n * 1e3, "tok_s": len(ids) / wall,
            "offset": len(ids)}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", required=True)
    ap.add_argument("--trees", required=True, type=lambda s: s.split(","))
    ap.add_argument("--contexts", default=[2048, 8192], type=lambda s: [int(x) for x in s.split(",")])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=HERE / "out" / "ab_step.json")
    ap.add_argument("--prefill", action="store_true", help="time prompt chunks, not decode steps")
    ap.add_argument("--chunk", type=int, default=256)
    ap.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child is not None:
        res = child_prefill(args.bundle, args.child, args.chunk, args.threads) if args.prefill \
            else child(args.bundle, args.child, args.steps, args.threads)
        print(json.dumps(res))
        return
    bundles = args.bundle.split(",")
    if len(bundles) not in (1, len(args.trees)):
        ap.error("--bundle: one bundle, or one per tree")
    bundle_of = dict(zip(args.trees, bundles * len(args.trees) if len(bundles) == 1 else bundles))
    runs = []
    for r in range(args.rounds):
        for ctx in args.contexts:
            for tree in args.trees:
                env = dict(os.environ, PYTHONPATH=tree)
                cmd = [sys.executable, __file__, "--bundle", bundle_of[tree], "--trees", tree, "--child", str(ctx),
                       "--steps", str(args.steps), "--threads", str(args.threads), "--chunk", str(args.chunk)]
                cmd += ["--prefill"] if args.prefill else []
                res = json.loads(subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout)
                runs.append({"round": r, "ctx": ctx, "tree": tree, "bundle": bundle_of[tree], **res,
                             "loadavg": os.getloadavg()})
                print(json.dumps(runs[-1]), flush=True)
    keys = ("wall_ms", "cpu_ms", "tok_s") if args.prefill else ("wall_ms", "cpu_ms")
    summary = {tree: {ctx: {k: statistics.median(x[k] for x in runs if x["tree"] == tree and x["ctx"] == ctx)
                            for k in keys} for ctx in args.contexts} for tree in args.trees}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"bundle": args.bundle, "threads": args.threads, "steps": args.steps,
                                    "phase": "prefill" if args.prefill else "decode", "chunk": args.chunk,
                                    "summary": summary, "runs": runs}, indent=1))
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()

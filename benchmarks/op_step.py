"""The TurboQuantAttention op alone: microseconds per layer call of a decode step against context,
for one or more source trees of tqedge side by side (an A/B of a kernel change).

A whole decode step on this shared 2-core machine moves by ±10 % from run to run with the host's
load; the op alone, on one thread, moves by ~1 %. For each round, tree and context, a child process
(``PYTHONPATH=<tree>``; Numba caches kernels per source) builds a graph of 30 chained
``TurboQuantAttention`` nodes (SmolLM2's shapes: 9 query heads, 3 KV heads, head size 64), runs it
through the native op in one onnxruntime session, fills the default compressed cache (K4V3, window
128, sinks 4) to the context with random keys and values in prompt chunks of 512, then times
decode steps: the median over ``--steps`` steps after 10 untimed ones, divided by 30.

    python benchmarks/op_step.py --trees /tmp/wt-old,/tmp/wt-new [--contexts 512,2048,8192] \\
        [--rounds 2] [--threads 1] [--out benchmarks/out/op_step.json]

``--threads``: the op's threads (the cooperative pool when > 1); onnxruntime's session has one.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
HQ, HKV, D, LAYERS = 9, 3, 64, 30


def child(ctx: int, steps: int, threads: int) -> dict:
    import numpy as np
    import onnx
    from onnx import helper

    from tqedge.bundle import CUSTOM_DOMAIN, KVSpec
    from tqedge.codec import numba_runtime
    from tqedge.runtime import native_op, ort_capi
    from tqedge.runtime.cache import build_codecs
    from tqedge.runtime.compressed_cache import CompressedKVCache

    def info(name, shape, elem=onnx.TensorProto.FLOAT):
        return helper.make_tensor_value_info(name, elem, shape)

    nodes, prev = [], "q"
    for i in range(LAYERS):
        out = "out" if i == LAYERS - 1 else f"o{i}"
        nodes.append(helper.make_node(native_op.OP_NAME, [prev, "k", "v", "kv_desc"], [out], domain=CUSTOM_DOMAIN,
                                      layer=i))
        prev = out
    graph = helper.make_graph(nodes, "op", [info("q", ["T", HQ, D]), info("k", ["T", HKV, D]),
                                            info("v", ["T", HKV, D]), info("kv_desc", ["n"], onnx.TensorProto.INT64)],
                              [info("out", ["T", HQ, D])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(CUSTOM_DOMAIN, 1)])
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "op.onnx"
        onnx.save(model, path)
        lib = ort_capi.OrtLib()
        op = native_op.make_op(lib, [D ** -0.5] * LAYERS)
        sess = ort_capi.Session(lib, path, [op], threads=1, config={"session.intra_op.allow_spinning": "0"})
    numba_runtime.set_threads(threads)
    rng = np.random.default_rng(0)
    k, v = build_codecs(KVSpec(), LAYERS, D, (4, 3))
    cache = CompressedKVCache(k, v, HKV, D, ring=ctx + 1024, sinks=4, window=128, policy="slide")

    def run(t):
        q, kk, vv = (rng.normal(size=(t, h, D)).astype(np.float32) for h in (HQ, HKV, HKV))
        cache.prepare(t)
        desc = cache.descriptor()
        t0 = time.perf_counter()
        sess.run({"q": q, "k": kk, "v": vv, "kv_desc": desc}, ["out"])
        dt = time.perf_counter() - t0
        cache.commit()
        return dt

    for start in range(0, ctx, 512):  # the prompt, in chunks
        run(min(512, ctx - start))
    times = [run(1) for _ in range(10 + steps)][10:]
    return {"us_per_layer_call": statistics.median(times) / LAYERS * 1e6}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trees", required=True, type=lambda s: s.split(","))
    ap.add_argument("--contexts", default=[512, 2048, 8192], type=lambda s: [int(x) for x in s.split(",")])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=HERE / "out" / "op_step.json")
    ap.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child is not None:
        print(json.dumps(child(args.child, args.steps, args.threads)))
        return
    runs = []
    for rnd in range(args.rounds):
        for ctx in args.contexts:
            for tree in args.trees:
                cmd = [sys.executable, __file__, "--trees", tree, "--child", str(ctx), "--steps", str(args.steps),
                       "--threads", str(args.threads)]
                out = subprocess.run(cmd, env=dict(os.environ, PYTHONPATH=tree), capture_output=True, text=True,
                                     check=True)
                res = dict(json.loads(out.stdout.strip().splitlines()[-1]), round=rnd, ctx=ctx, tree=tree,
                           loadavg=os.getloadavg())
                print(json.dumps(res), flush=True)
                runs.append(res)
    summary = {tree: {str(ctx): statistics.median(r["us_per_layer_call"] for r in runs
                                                  if r["tree"] == tree and r["ctx"] == ctx)
                      for ctx in args.contexts} for tree in args.trees}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"summary": summary, "runs": runs, "threads": args.threads,
                                    "layers": LAYERS, "shapes": {"hq": HQ, "hkv": HKV, "d": D}}, indent=1))
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()

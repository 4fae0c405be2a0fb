"""How should onnxruntime reach the TurboQuant attention op? Two ways, measured side by side.

1. **segments** (what the runtime ships): the bundle's graph cut at each attention core; one
   InferenceSession per segment; Python calls ``cache.attend`` between them.
2. **pyop**: the uncut ``model.onnx`` with its ``TurboQuantAttention`` nodes registered as a
   Python custom op through onnxruntime-extensions (``onnx_op``); one ``run`` per step. The op
   callback must find its cache through a process-global (onnxruntime-extensions registers
   ops by type name, globally), which the runtime's design rules out for production; here it
   is a measurement only.

Both run the same bundle and the same cache type, prefill the same prompt, then time decode
steps at a given context. Prints and writes JSON (``--out``). Needs the ``export`` extra
(onnx, to rewrite the op domain) and ``onnxruntime-extensions`` (benchmark-only).

    python benchmarks/op_dispatch.py BUNDLE [--ctx 512] [--steps 32] [--kv-bits 4,3]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

import tqedge

_CURRENT = {}  # the measurement-only global the pyop route needs (see module docstring)


def _pyop_session(bundle: Path, manifest, threads: int):
    import onnx
    import onnxruntime as ort
    from onnxruntime_extensions import PyCustomOpDef, get_library_path, onnx_op

    @onnx_op(op_type="TurboQuantAttention", inputs=[PyCustomOpDef.dt_float] * 3,
             outputs=[PyCustomOpDef.dt_float],
             attrs={"layer": PyCustomOpDef.dt_int64, "scale": PyCustomOpDef.dt_float,
                    "num_heads": PyCustomOpDef.dt_int64, "num_kv_heads": PyCustomOpDef.dt_int64,
                    "head_dim": PyCustomOpDef.dt_int64})
    def _tq(q, k, v, **attrs):
        return _CURRENT["cache"].attend(int(attrs["layer"]), q, k, v, float(attrs["scale"]))

    graph = manifest.graphs["onnx"]
    src = bundle / graph.file
    model = onnx.load(str(src), load_external_data=False)
    for node in model.graph.node:
        if node.op_type == "TurboQuantAttention":
            node.domain = "ai.onnx.contrib"
    model.opset_import.append(onnx.helper.make_opsetid("ai.onnx.contrib", 1))
    tmp = Path(tempfile.mkdtemp(prefix="tq-pyop-"))
    for data in graph.data:  # external weights resolve inside the model's folder: hard-link them
        target = (bundle / data).resolve()
        link = tmp / os.path.relpath(bundle / data, src.parent)
        link.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(target, link)
        except OSError:
            shutil.copyfile(target, link)
    path = tmp / "model.onnx"
    onnx.save(model, str(path))
    so = ort.SessionOptions()
    so.register_custom_ops_library(get_library_path())
    so.intra_op_num_threads = threads
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _time_steps(step, cache, first_token: int, steps: int) -> list[float]:
    times, tok = [], first_token
    for _ in range(steps):
        t0 = time.perf_counter()
        logits = step([tok], cache)
        times.append(time.perf_counter() - t0)
        tok = int(np.argmax(logits))
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("bundle", type=Path)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--kv-bits", default=None, help="e.g. 4,3 or exact (default: the bundle's)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/out/op_dispatch.json"))
    args = ap.parse_args()

    model = tqedge.load(args.bundle, threads=args.threads, verify="size", kv_budget="256MiB")
    text = (Path(__file__).resolve().parents[2] / "shared/data/wikitext2-valid.txt").read_text()
    prompt = model.encode(text)[: args.ctx]
    sess = _pyop_session(args.bundle, model.manifest, args.threads)

    def segments_step(ids, cache):
        return model.forward(ids, cache)

    def pyop_step(ids, cache):
        ids = np.asarray(ids, np.int64)
        t = len(ids)
        pos = np.arange(cache.offset, cache.offset + t, dtype=np.int64)
        _CURRENT["cache"] = cache
        cache.prepare(t)
        (logits,) = sess.run(["logits"], {"input_ids": ids, "positions": pos,
                                          "logits_index": np.array([t - 1], np.int64)})
        cache.commit()
        return logits[0]

    # the share of a decode step spent in the op: time cache.attend itself
    attend_time = [0.0]

    def timed(cache):
        inner = cache.attend

        def attend(*a):
            t0 = time.perf_counter()
            out = inner(*a)
            attend_time[0] += time.perf_counter() - t0
            return out

        cache.attend = attend
        return cache

    results = {}
    for name, step in (("segments", segments_step), ("pyop", pyop_step)):
        cache = timed(model.new_cache(kv_bits=args.kv_bits))
        logits = step(prompt, cache)  # prefill
        _time_steps(step, cache, int(np.argmax(logits)), 3)  # warm-up (numba, allocations)
        attend_time[0] = 0.0
        times = _time_steps(step, cache, int(np.argmax(logits)), args.steps)
        results[name] = {"step_ms_median": 1e3 * statistics.median(times),
                         "attend_share": attend_time[0] / sum(times)}
        print(f"{name:9s} decode step {results[name]['step_ms_median']:.1f} ms (median of {args.steps}), "
              f"op share {100 * results[name]['attend_share']:.1f}%")
    ratio = results["pyop"]["step_ms_median"] / results["segments"]["step_ms_median"]
    print(f"pyop / segments step time: {ratio:.2f}x")
    out = {"bundle": str(args.bundle), "ctx": args.ctx, "steps": args.steps, "threads": args.threads,
           "kv_bits": args.kv_bits or "default", "results": results, "pyop_over_segments": ratio}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()

"""Native backend (model.onnx in one onnxruntime session, attention op in Numba) vs the segment
backend, side by side in one run: decode / prefill speed and peak RSS of ``tqedge generate``,
and Python-level calls per decode step.

Speed and memory: for each context length, a child process per backend runs
``python -m tqedge.cli generate BUNDLE --raw -p <ctx tokens of WikiText> --max-tokens N --json
--backend B --threads T`` (default environment, default compressed KV cache); its JSON stats give
decode / prefill tok/s, ``os.wait4`` its peak RSS (ru_maxrss) and CPU seconds
(:func:`tqedge.runtime.memory.wait_child`). Backends alternate
within each repeat; medians over repeats. The machine's load average is recorded before and
after (on a shared machine wall-clock speeds move with it; CPU seconds much less).

Decode step (``--step-bench``): both backends in one process, each cache filled to the context
with random keys/values through ``cache.attend`` (benchmarks/decode.py's ``synthetic_fill``),
then alternating greedy decode steps: median wall and CPU milliseconds per step (CPU seconds
count every thread of the process; on a loaded machine they are the steadier figure).

Calls: a child loads the bundle, prefills a short prompt and counts ``sys.setprofile`` events
(``call`` and ``c_call``: Python functions and builtins, ctypes calls included) during
``model.forward`` of single decode steps (median), and per token of ``stream_generate``, greedy
and with the bundle's default sampling.

    python benchmarks/native.py --bundle models/smollm2-int4.tqe [--contexts 512,2048] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
BACKENDS = ("native", "onnx")


def prompt_text(bundle: str, ctx: int) -> str:
    """About ``ctx`` tokens of the shipped WikiText excerpt (cut by the bundle's tokenizer)."""
    from tokenizers import Tokenizer

    from tqedge.bundle import read_manifest
    from tqedge.data import read_text

    m = read_manifest(bundle, verify="none")
    tok = Tokenizer.from_file(str(Path(bundle) / m.tokenizer.file))
    ids = tok.encode(read_text("wikitext2")[: ctx * 12], add_special_tokens=False).ids[:ctx]
    return tok.decode(ids)


def generate_child(bundle: str, backend: str, prompt: str, max_tokens: int, threads: int) -> dict:
    """One ``tqedge generate --json`` child: speeds from its stats, peak RSS (MiB) and CPU seconds."""
    cmd = [sys.executable, "-m", "tqedge.cli", "generate", bundle, "--raw", "-p", prompt, "--max-tokens",
           str(max_tokens), "--json", "--backend", backend, "--threads", str(threads), "--verify", "none"]
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    from tqedge.runtime.memory import wait_child

    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=str(ROOT))
    out, err = proc.stdout.read(), proc.stderr.read()
    status, peak, cpu_s = wait_child(proc.pid)
    if status != 0:
        raise RuntimeError(f"{backend} generate failed: {err.decode()[-2000:]}")
    stats = json.loads(out.decode().strip().splitlines()[-1])["stats"]
    return {"decode_tps": stats["decode_tps"], "prefill_tps": stats["prefill_tps"],
            "prompt_tokens": stats["prompt_tokens"], "generation_tokens": stats["generation_tokens"],
            "peak_rss_mib": peak / 2**20, "cpu_s": cpu_s}


def count_calls(bundle: str, backend: str, threads: int, steps: int = 16) -> dict:
    """Python-level calls (call + c_call events) per decode step: inside ``model.forward``, and
    per token of ``stream_generate`` (forward, sampling, detokenizing, stats) greedy and with the
    bundle's default sampling (run in this process: call from a child)."""
    import tqedge
    from tqedge.runtime.generate import stream_generate

    model = tqedge.load(bundle, backend=backend, threads=threads, verify="none")
    n = [0]

    def prof(frame, event, arg):
        if event in ("call", "c_call"):
            n[0] += 1

    def counted(fn, *args):
        n[0] = 0
        sys.setprofile(prof)
        try:
            fn(*args)
        finally:
            sys.setprofile(None)
        return n[0] - 1  # minus the setprofile(None) c_call

    cache = model.new_cache()
    logits = model.forward(model.encode("The history of the city begins"), cache)
    forward = []
    for i in range(steps + 1):  # the first step loads machine code: not counted
        tok = int(logits.argmax())
        c = counted(model.forward, [tok], cache)
        if i:
            forward.append(c)
        logits = model.forward([tok], cache)
    out = {"forward": statistics.median(forward)}
    for name, temperature in (("generate_greedy", 0.0), ("generate_default_sampling", None)):
        it = stream_generate(model, "The history of the city of Paris begins with", max_tokens=steps + 8,
                             temperature=temperature, seed=0)
        for _ in range(4):
            next(it)

        def tokens(k):
            for _ in zip(range(k), it):
                pass

        out[name] = (counted(tokens, steps) - 1) / steps  # minus tokens() itself
        it.close()
    return out


def step_bench(bundle: str, contexts: list[int], threads: int, steps: int = 16) -> dict:
    """Median wall / CPU ms per decode step of each backend at each context (see module docstring)."""
    import time

    import numpy as np

    import tqedge

    sys.path.insert(0, str(HERE))
    from decode import synthetic_fill

    models = {b: tqedge.load(bundle, backend=b, threads=threads, verify="none", kv_budget="64MiB") for b in BACKENDS}
    out = {}
    for ctx in contexts:
        caches, logits, wall, cpu = {}, {}, {b: [] for b in BACKENDS}, {b: [] for b in BACKENDS}
        for b, m in models.items():
            caches[b] = m.new_cache()
            synthetic_fill(caches[b], m.arch, ctx, np.random.default_rng(0))
            logits[b] = m.forward([100], caches[b])
        for _ in range(steps):
            for b, m in models.items():
                t, c = time.perf_counter(), time.process_time()
                logits[b] = m.forward([int(logits[b].argmax())], caches[b])
                wall[b].append(1e3 * (time.perf_counter() - t))
                cpu[b].append(1e3 * (time.process_time() - c))
        out[str(ctx)] = {b: {"wall_ms": statistics.median(wall[b]), "cpu_ms": statistics.median(cpu[b])}
                         for b in BACKENDS}
        out[str(ctx)]["native_vs_onnx_cpu"] = out[str(ctx)]["native"]["cpu_ms"] / out[str(ctx)]["onnx"]["cpu_ms"]
        print(ctx, out[str(ctx)], flush=True)
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bundle", required=True)
    p.add_argument("--contexts", default="512,2048")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=str(HERE / "out" / "native.json"))
    p.add_argument("--count-calls", default=None, help=argparse.SUPPRESS)
    p.add_argument("--step-bench", action="store_true", help="only the in-process decode-step measurement")
    args = p.parse_args(argv)
    if args.step_bench:
        data = {"bundle": args.bundle, "machine": platform.platform(), "threads": args.threads,
                "loadavg_before": os.getloadavg(),
                "decode_step": step_bench(args.bundle, [int(c) for c in args.contexts.split(",")], args.threads)}
        data["loadavg_after"] = os.getloadavg()
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
        print(f"json: {out}")
        return
    if args.count_calls:
        print(json.dumps(count_calls(args.bundle, args.count_calls, args.threads)))
        return
    load_before = os.getloadavg()
    results: dict = {}
    for ctx in (int(c) for c in args.contexts.split(",")):
        prompt = prompt_text(args.bundle, ctx)
        runs = {b: [] for b in BACKENDS}
        for _ in range(args.repeats):
            for b in BACKENDS:
                runs[b].append(generate_child(args.bundle, b, prompt, args.max_tokens, args.threads))
                print(ctx, b, runs[b][-1], flush=True)
        med = {b: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for b, rs in runs.items()}
        med["native_vs_onnx"] = {k: med["native"][k] / med["onnx"][k] for k in
                                 ("decode_tps", "prefill_tps", "peak_rss_mib", "cpu_s")}
        results[str(ctx)] = {"median": med, "runs": runs}
    calls = {}
    for b in BACKENDS:
        out = subprocess.run([sys.executable, __file__, "--bundle", args.bundle, "--threads", str(args.threads),
                              "--count-calls", b], capture_output=True, text=True, check=True, cwd=str(ROOT),
                             env={**os.environ, "PYTHONPATH": str(ROOT)})
        calls[b] = json.loads(out.stdout.strip().splitlines()[-1])
    data = {"bundle": args.bundle, "machine": platform.platform(), "cpus": os.cpu_count(),
            "threads": args.threads, "repeats": args.repeats, "max_tokens": args.max_tokens,
            "loadavg_before": load_before, "loadavg_after": os.getloadavg(), "results": results,
            "python_calls_per_decode_step": calls}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    for ctx, r in results.items():
        for b in (*BACKENDS, "native_vs_onnx"):
            print(ctx, b, {k: round(v, 3) for k, v in r["median"][b].items()})
    print("calls per decode step:", calls)
    print(f"json: {out}")


if __name__ == "__main__":
    main()

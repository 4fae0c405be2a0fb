"""Speed and peak RSS against context, one process per (side, context), side by side.

Each run is one worker of ``benchmarks/vs_llamacpp.py`` (``--phase speed``) given a single
context: it loads the model, prefills ``c`` tokens of the same text, times 16 decode steps and
reports its peak RSS — so the peak belongs to that context alone (the combined speed phase of
vs_llamacpp.py reports the peak of all its contexts). Sides: llama.cpp KV types (through the
llama-cpp-python venv), tqedge backends (default KV cache) and, given ``--og-python`` /
``--og-model``, onnxruntime-genai's int4 build (benchmarks/peers.py). Repeats alternate the sides
within each round, after one untimed run per side (kernel caches); medians per (side, context). Every side runs in its default environment
(no ``OMP_WAIT_POLICY``); the load average is recorded before and after each round. ``--busy N``
runs N CPU-bound ``while 1: pass`` processes beside every worker (contention: a phone or a Pi
always has other processes); compare with an idle run of the same sides.

    python benchmarks/rss_context.py --gguf SmolLM2-135M-Instruct.Q4_1.gguf --bundle smol-int4.tqe \\
        --llama-python /tmp/llama-venv/bin/python [--contexts 512,2048,8192] [--repeats 2] \\
        [--llama-kv q8_0,q4_0] [--tqedge-backends native,onnx]

Output: ``benchmarks/out/rss_context.json`` and ``rss_context.png`` (peak RSS and decode tok/s
against context, one line per side).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
VS = HERE / "vs_llamacpp.py"
DATA = HERE.parent.parent / "shared" / "data" / "wikitext2-valid.txt"


def run_one(args, side: str, kv: str, ctx: int, backend: str | None) -> dict:
    """One worker process; returns its JSON (prefill/decode tok/s at ``ctx``, peak RSS)."""
    py = {"llama": str(args.llama_python), "og": str(args.og_python)}.get(side, sys.executable)
    cmd = [py, str(VS), "--worker", side, "--kv", kv, "--phase", "speed", "--gguf", str(args.gguf),
           "--bundle", str(args.bundle), "--text", str(args.text), "--contexts", str(ctx),
           "--threads", str(args.threads), *(["--backend", backend] if backend else []),
           *(["--og-model", str(args.og_model)] if side == "og" else [])]
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    busy = [subprocess.Popen([sys.executable, "-c", "while 1: pass"]) for _ in range(args.busy)]
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    finally:
        for b in busy:
            b.kill()
            b.wait()
    if res.returncode:
        from vs_llamacpp import worker_failed

        raise SystemExit(worker_failed(f"{side} {kv} {backend or ''} at {ctx}", res))
    return json.loads(res.stdout.strip().splitlines()[-1])


def summarize(runs: list[dict]) -> dict:
    """Medians per (label, context) over the rounds."""
    out: dict = {}
    for r in runs:
        e = out.setdefault(r["label"], {}).setdefault(str(r["ctx"]), {"prefill": [], "decode": [], "rss": []})
        e["prefill"].append(r["prefill_tok_s"])
        e["decode"].append(r["decode_tok_s"])
        e["rss"].append(r["peak_rss_mib"])
    return {label: {c: {f"{k}_median": statistics.median(v) for k, v in e.items()} | {"n": len(e["rss"])}
                    for c, e in by_ctx.items()} for label, by_ctx in out.items()}


def plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for label, by_ctx in summary.items():
        cs = sorted(by_ctx, key=int)
        style = "-o" if label.startswith("tqedge") else "--s"
        a.plot([int(c) for c in cs], [by_ctx[c]["rss_median"] for c in cs], style, label=label)
        b.plot([int(c) for c in cs], [by_ctx[c]["decode_median"] for c in cs], style, label=label)
    for ax, title in ((a, "peak RSS (MiB)"), (b, "decode tok/s")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context (tokens)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    a.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gguf", type=Path, required=True)
    ap.add_argument("--bundle", type=Path, required=True)
    ap.add_argument("--llama-python", type=Path, required=True)
    ap.add_argument("--text", type=Path, default=DATA)
    ap.add_argument("--contexts", type=lambda s: [int(x) for x in s.split(",")], default=[512, 2048, 8192])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--llama-kv", type=lambda s: s.split(","), default=["q8_0", "q4_0"])
    ap.add_argument("--tqedge-backends", type=lambda s: s.split(","), default=["native", "onnx"])
    ap.add_argument("--og-python", type=Path, default=None, help="onnxruntime-genai venv's python (peers.py)")
    ap.add_argument("--og-model", type=Path, default=None, help="onnxruntime-genai model folder")
    ap.add_argument("--no-prewarm", dest="prewarm", action="store_false", help="skip the untimed first run per side")
    ap.add_argument("--busy", type=int, default=0,
                    help="CPU-bound 'while 1: pass' processes running beside every timed worker (contention)")
    ap.add_argument("--out", type=Path, default=HERE / "out" / "rss_context.json")
    args = ap.parse_args(argv)
    sides = [("llama", kv, None, f"llama.cpp {kv}") for kv in args.llama_kv]
    sides += [("tqedge", "tqedge-default", b, f"tqedge {b}") for b in args.tqedge_backends]
    if args.og_python and args.og_model:
        sides.append(("og", "int4", None, "onnxruntime-genai int4"))
    runs, loads = [], []
    if args.prewarm:  # compile caches (Numba's kernel cache, a first load) before any timed run
        for side, kv, backend, _ in sides:
            run_one(args, side, kv, min(args.contexts), backend)
    for rnd in range(args.repeats):
        loads.append({"round": rnd, "before": os.getloadavg()})
        for ctx in args.contexts:
            for side, kv, backend, label in sides:
                r = run_one(args, side, kv, ctx, backend)
                c = str(ctx)
                runs.append({"label": label, "ctx": ctx, "round": rnd, "prefill_tok_s": r["prefill_tok_s"][c],
                             "decode_tok_s": r["decode_tok_s"][c], "decode_ms": r["decode_ms"][c],
                             "peak_rss_mib": r["peak_rss_mib"], "system_info": r.get("system_info")})
                print(f"round {rnd} ctx {ctx} {label}: prefill {r['prefill_tok_s'][c]:.1f} decode "
                      f"{r['decode_tok_s'][c]:.1f} tok/s, peak {r['peak_rss_mib']:.0f} MiB", file=sys.stderr)
                summary = summarize(runs)
                args.out.parent.mkdir(parents=True, exist_ok=True)
                args.out.write_text(json.dumps({"summary": summary, "runs": runs, "loadavg": loads,
                                                "threads": args.threads, "contexts": args.contexts,
                                                "busy_processes": args.busy}, indent=1))
        loads[-1]["after"] = os.getloadavg()
    plot(summarize(runs), args.out.with_suffix(".png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""tqedge next to llama.cpp on the same GGUF: perplexity per KV-cache type, prefill and decode
speed, KV bytes per token and peak RSS.

llama.cpp is reached through ``llama-cpp-python`` in a *separate, benchmark-only venv* (it is
not a tqedge dependency and this script imports nothing from it at import time). Build it from
the PyPI source distribution (about 8 minutes of both cores on a 2-core x86 box)::

    python3 -m venv /tmp/llama-venv
    CMAKE_ARGS="-DGGML_NATIVE=ON" /tmp/llama-venv/bin/pip install --no-binary llama-cpp-python \\
        llama-cpp-python numpy
    export OMP_WAIT_POLICY=PASSIVE        # idle OpenMP threads sleep instead of spinning

Known pitfalls (llama-cpp-python 0.3.x on x86 with AMX): the AMX extra buffer type crashed on
prompts longer than one token unless the model is loaded with ``use_extra_bufts=False``; a
quantized V cache (q8_0 / q4_0) needs ``flash_attn=True``. The worker sets both.

Then, from the tqedge venv::

    python benchmarks/vs_llamacpp.py --gguf SmolLM2-135M-Instruct.Q4_1.gguf --bundle smol-int8.tqe \\
        --llama-python /tmp/llama-venv/bin/python [--ctx 1024 --windows 8] [--contexts 512,2048,8192]
    python benchmarks/vs_llamacpp.py ... --dry-run     # print the plan, check inputs, run nothing

Every measurement runs in its own worker process (one per llama.cpp KV type, one per tqedge KV
config), so peak RSS is per configuration. Perplexity uses the same non-overlapping windows of
the same token ids on both sides and reports both the mean over all positions and over the
second half of each window (what ``llama-perplexity`` reports). Output:
``benchmarks/out/vs_llamacpp.json`` and a printed table with ratios against llama.cpp f16.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
DATA = HERE.parent.parent / "shared" / "data" / "wikitext2-valid.txt"
LLAMA_KV = {"f16": (1, 2.0), "q8_0": (8, 34 / 32), "q4_0": (2, 18 / 32)}  # ggml type id, bytes per value
TQEDGE_KV = {"exact": "exact", "tqedge-default": None, "K4V2": "4,2"}
DECODE_STEPS = 16


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def windows_of(ids: list[int], ctx: int, n: int) -> list[list[int]]:
    return [ids[i * ctx:(i + 1) * ctx] for i in range(min(n, len(ids) // ctx))]


def nll_stats(logprob_rows, targets) -> tuple[float, float, int]:
    """(sum NLL all, sum NLL second half, count second half) of one window's log-prob rows."""
    import numpy as np

    lp = np.asarray(logprob_rows, dtype=np.float64)  # (T-1, V)
    nll = -lp[np.arange(len(targets)), targets]
    first = (len(targets) + 1) // 2  # llama-perplexity: logits from position n_ctx/2 on
    return float(nll.sum()), float(nll[first:].sum()), len(nll[first:])


def _log_softmax(x):
    import numpy as np

    x = np.asarray(x, dtype=np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


# -- workers (each runs in its own process) ---------------------------------------------------
def llama_worker(args) -> dict:
    """llama.cpp side for one KV type (runs inside the llama-cpp-python venv)."""
    import inspect

    import llama_cpp

    type_id, per_value = LLAMA_KV[args.kv]
    n_ctx = max(args.ctx, max(args.contexts) + DECODE_STEPS + 8)
    kw = dict(model_path=str(args.gguf), n_ctx=n_ctx, n_batch=512, n_threads=args.threads, logits_all=True,
              type_k=type_id, type_v=type_id, flash_attn=True, verbose=False)
    if "use_extra_bufts" in inspect.signature(llama_cpp.Llama.__init__).parameters:
        kw["use_extra_bufts"] = False
    llm = llama_cpp.Llama(**kw)
    text = Path(args.text).read_text(encoding="utf-8")
    ids = llm.tokenize(text[: args.ctx * args.windows * 8].encode(), add_bos=False, special=False)
    tot = tot_h = 0.0
    n = n_h = 0
    for w in windows_of(ids, args.ctx, args.windows):
        llm.reset()
        llm.eval(w)
        lp = _log_softmax(llm.scores[: len(w) - 1])  # (T-1, V)
        a, h, c = nll_stats(lp, w[1:])
        tot, tot_h, n, n_h = tot + a, tot_h + h, n + len(w) - 1, n_h + c
    out = {"side": "llama.cpp", "kv": args.kv, "ppl": math.exp(tot / n), "ppl_second_half": math.exp(tot_h / n_h),
           "kv_bytes_per_token": _kv_values(llm) * per_value}
    llm.reset()
    t = time.perf_counter()
    llm.eval(ids[:512])
    out["prefill_tok_s"] = 512 / (time.perf_counter() - t)
    out["decode_tok_s"] = {}
    for c in args.contexts:
        llm.reset()
        llm.eval(ids[:c])
        t = time.perf_counter()
        for tok in ids[c:c + DECODE_STEPS]:
            llm.eval([tok])
        out["decode_tok_s"][str(c)] = DECODE_STEPS / (time.perf_counter() - t)
    out["peak_rss_mib"] = peak_rss_mib()
    return out


def _kv_values(llm) -> int:
    """Key + value elements one token stores over all layers, from the GGUF metadata."""
    md = llm.metadata
    arch = md.get("general.architecture", "llama")
    heads = int(md[f"{arch}.attention.head_count"])
    kv_heads = int(md.get(f"{arch}.attention.head_count_kv", heads))
    return 2 * int(md[f"{arch}.block_count"]) * int(md[f"{arch}.embedding_length"]) // heads * kv_heads


def tqedge_worker(args) -> dict:
    """tqedge side for one KV config (runs in the tqedge venv)."""
    import tqedge
    from tqedge.runtime.eval_ppl import KVConfig, build_cache, evaluate, text_windows

    model = tqedge.load(args.bundle, threads=args.threads, verify="none")
    kv_bits = TQEDGE_KV[args.kv]
    cfg = KVConfig(args.kv, kv_bits)
    text = Path(args.text).read_text(encoding="utf-8")
    (r,) = evaluate(model, text_windows(model, text, args.ctx, args.windows), [cfg])
    out = {"side": "tqedge", "kv": args.kv, "ppl": r["ppl"], "ppl_second_half": r["ppl_second_half"],
           "kv_bytes_per_token": r["bytes_per_token"]}
    ids = model.tokenizer.encode(text[: max(args.contexts) * 8], add_special_tokens=False).ids
    cache, _ = build_cache(model, cfg, 600)
    t = time.perf_counter()
    model.forward(ids[:512], cache)
    out["prefill_tok_s"] = 512 / (time.perf_counter() - t)
    out["decode_tok_s"] = {}
    for c in args.contexts:
        cache, _ = build_cache(model, cfg, c + DECODE_STEPS + 1)
        for a in range(0, c, 512):
            model.forward(ids[a:min(c, a + 512)], cache)
        t = time.perf_counter()
        for tok in ids[c:c + DECODE_STEPS]:
            model.forward([tok], cache)
        out["decode_tok_s"][str(c)] = DECODE_STEPS / (time.perf_counter() - t)
    out["peak_rss_mib"] = peak_rss_mib()
    return out


# -- parent -----------------------------------------------------------------------------------
def plan(args) -> list[dict]:
    """The worker runs: (python executable, side, kv)."""
    jobs = [{"python": str(args.llama_python), "side": "llama", "kv": kv} for kv in LLAMA_KV]
    jobs += [{"python": sys.executable, "side": "tqedge", "kv": kv} for kv in TQEDGE_KV]
    return jobs


def check_inputs(args) -> list[str]:
    problems = [f"{name} not found: {p}" for name, p in (("--gguf", args.gguf), ("--bundle", args.bundle),
                                                          ("--text", args.text)) if p is None or not Path(p).exists()]
    if args.llama_python is None or not Path(args.llama_python).exists():
        problems.append("--llama-python (the llama-cpp-python venv's python) not found; see this script's docstring")
    return problems


def table(rows: list[dict]) -> str:
    base = next((r for r in rows if r["side"] == "llama.cpp" and r["kv"] == "f16"), None)
    lines = ["| side | KV | PPL | PPL 2nd half | KV bytes/token | prefill tok/s | decode tok/s | peak RSS MiB |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        dec = " / ".join(f"{k}: {v:.1f}" for k, v in r["decode_tok_s"].items())
        ratio = f" ({r['ppl'] / base['ppl']:.3f}×)" if base else ""
        lines.append(f"| {r['side']} | {r['kv']} | {r['ppl']:.3f}{ratio} | {r['ppl_second_half']:.3f} | "
                     f"{r['kv_bytes_per_token']} | {r['prefill_tok_s']:.1f} | {dec} | {r['peak_rss_mib']:.0f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gguf", type=Path)
    ap.add_argument("--bundle", type=Path)
    ap.add_argument("--text", type=Path, default=DATA)
    ap.add_argument("--llama-python", type=Path, default=None)
    ap.add_argument("--ctx", type=int, default=1024)
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--contexts", type=lambda s: [int(x) for x in s.split(",")], default=[512, 2048, 8192])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=HERE / "out" / "vs_llamacpp.json")
    ap.add_argument("--dry-run", action="store_true", help="check inputs and print the plan; run nothing")
    ap.add_argument("--worker", choices=["llama", "tqedge"], help=argparse.SUPPRESS)
    ap.add_argument("--kv", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        print(json.dumps((llama_worker if args.worker == "llama" else tqedge_worker)(args)))
        return 0
    jobs, problems = plan(args), check_inputs(args)
    if args.dry_run:
        print(json.dumps({"jobs": jobs, "problems": problems, "ctx": args.ctx, "windows": args.windows,
                          "contexts": args.contexts}, indent=1))
        return 0
    if problems:
        raise SystemExit("; ".join(problems))
    rows = []
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    common = ["--gguf", str(args.gguf), "--bundle", str(args.bundle), "--text", str(args.text), "--ctx",
              str(args.ctx), "--windows", str(args.windows), "--contexts", ",".join(map(str, args.contexts)),
              "--threads", str(args.threads)]
    for job in jobs:
        cmd = [job["python"], str(Path(__file__).resolve()), "--worker", job["side"], "--kv", job["kv"], *common]
        res = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
        if res.returncode:
            raise SystemExit(f"{job['side']} {job['kv']} failed:\n{res.stderr[-2000:]}")
        rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
        print(f"done {job['side']} {job['kv']}", file=sys.stderr)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"rows": rows, "ctx": args.ctx, "windows": args.windows}, indent=1))
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""tqedge next to llama.cpp on the same GGUF: perplexity per KV-cache type, prefill and decode
speed, KV bytes per token and peak RSS.

llama.cpp is reached through ``llama-cpp-python`` in a *separate, benchmark-only venv* (it is
not a tqedge dependency and this script imports nothing from it at import time). Build it from
the PyPI source distribution (about 8 minutes of both cores on a 2-core x86 box)::

    python3 -m venv /tmp/llama-venv
    CMAKE_ARGS="-DGGML_NATIVE=ON" /tmp/llama-venv/bin/pip install --no-binary llama-cpp-python \\
        llama-cpp-python numpy

Known pitfalls (llama-cpp-python 0.3.x on x86 with AMX): the AMX extra buffer type crashed on
prompts longer than one token unless the model is loaded with ``use_extra_bufts=False``; a
quantized V cache (q8_0 / q4_0) needs ``flash_attn=True``. The worker sets both. On a Sapphire
Rapids VM that lists AMX but does not grant it (round 37), a ``GGML_NATIVE`` build dies by
SIGSEGV on its first evaluation: build it for the host's AVX-512 without AMX, and with
``--no-cache-dir`` (pip otherwise reuses the wheel it built before, whatever ``CMAKE_ARGS`` say)::

    CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON \
        -DGGML_BMI2=ON -DGGML_AVX_VNNI=ON -DGGML_AVX512=ON -DGGML_AVX512_VBMI=ON \
        -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF \
        -DGGML_AMX_BF16=OFF" pip install --no-cache-dir --no-binary llama-cpp-python llama-cpp-python

Then, from the tqedge venv::

    python benchmarks/vs_llamacpp.py --gguf SmolLM2-135M-Instruct.Q4_1.gguf --bundle smol-int8.tqe \\
        --llama-python /tmp/llama-venv/bin/python [--ctx 1024 --windows 8] [--contexts 512,2048,8192]
    python benchmarks/vs_llamacpp.py ... --dry-run     # print the plan, check inputs, run nothing

With ``--og-python /work/og-venv/bin/python --og-model /tmp/og/model`` the speed phase also runs
onnxruntime-genai (its int4 build of the same weights; setup in ``benchmarks/peers.py``) and the
table gains ratios against it (speed, and peak RSS: tqedge / genai).

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
import subprocess
import sys
import time
from pathlib import Path

import peers  # onnxruntime-genai peer (stdlib only at import time, like this file)


def worker_failed(what: str, res: subprocess.CompletedProcess) -> str:
    """One message for a worker that failed: its exit code, or the signal that killed it (SIGILL:
    the side's build uses an instruction this CPU or hypervisor does not allow; llama.cpp built with
    ``GGML_NATIVE`` on a Sapphire Rapids VM that lists AMX but does not grant it died so in
    ``tileloadd``: rebuild it with ``GGML_NATIVE=OFF`` and the host's AVX-512 options), then stderr's tail."""
    import signal

    how = f"killed by {signal.Signals(-res.returncode).name}" if res.returncode < 0 else f"exit {res.returncode}"
    return f"{what} failed ({how}):\n{res.stderr[-2000:]}"

HERE = Path(__file__).resolve().parent
DATA = HERE.parent.parent / "shared" / "data" / "wikitext2-valid.txt"
LLAMA_KV = {"f16": (1, 2.0), "q8_0": (8, 34 / 32), "q4_0": (2, 18 / 32)}  # ggml type id, bytes per value
TQEDGE_KV = ["exact", "tqedge-default", "K4V2"]  # default --tqedge-kv; any quality.py name works too
DECODE_STEPS = 16


def peak_rss_mib() -> float:
    """Peak RSS of this worker (:func:`tqedge.runtime.memory.peak_rss`, pure Python: the llama.cpp
    venv reads it from the source tree)."""
    sys.path.insert(0, str(HERE.parent))
    from tqedge.runtime.memory import peak_rss

    return peak_rss() / 2**20


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
def ids_digest(ids) -> str:
    """Short hash of token ids, so the table can show both sides scored the same tokens."""
    import hashlib

    return hashlib.sha256(",".join(map(str, ids)).encode()).hexdigest()[:12]


def timed_contexts(prefill, step, ids: list[int], contexts: list[int]) -> dict:
    """Prefill ``c`` tokens (timed), then decode DECODE_STEPS tokens one by one (each timed).

    Args:
        prefill: ``prefill(c)`` resets the state and feeds ``ids[:c]``.
        step: ``step(token)`` feeds one token.

    Returns:
        {"prefill_tok_s": {c: ...}, "decode_tok_s": {c: 1 / median step time}, "decode_ms": {c: [...]}}.
    """
    import statistics

    out: dict = {"prefill_tok_s": {}, "decode_tok_s": {}, "decode_ms": {}}
    for c in contexts:
        t = time.perf_counter()
        prefill(c)
        out["prefill_tok_s"][str(c)] = c / (time.perf_counter() - t)
        steps = []
        for tok in ids[c:c + DECODE_STEPS]:
            t = time.perf_counter()
            step(tok)
            steps.append(time.perf_counter() - t)
        out["decode_tok_s"][str(c)] = 1 / statistics.median(steps)
        out["decode_ms"][str(c)] = [round(1000 * s, 2) for s in steps]
    return out


def llama_worker(args) -> dict:
    """llama.cpp side for one KV type (runs inside the llama-cpp-python venv).

    ``--phase ppl`` scores the windows (logits for every position); ``--phase speed`` times
    prefill and decode at each context with logits for the last position only, so its peak RSS
    is what a chat at that context costs.
    """
    import inspect

    import llama_cpp

    type_id, per_value = LLAMA_KV[args.kv]
    speed = args.phase == "speed"
    n_ctx = max(args.contexts) + DECODE_STEPS + 8 if speed else args.ctx
    kw = dict(model_path=str(args.gguf), n_ctx=n_ctx, n_batch=512, n_threads=args.threads,
              n_threads_batch=args.threads, logits_all=not speed, type_k=type_id, type_v=type_id,
              flash_attn=True, verbose=False)
    if "use_extra_bufts" in inspect.signature(llama_cpp.Llama.__init__).parameters:
        kw["use_extra_bufts"] = False
    llm = llama_cpp.Llama(**kw)
    text = Path(args.text).read_text(encoding="utf-8")
    out = {"side": "llama.cpp", "kv": args.kv, "phase": args.phase, "kv_bytes_per_token": _kv_values(llm) * per_value,
           "system_info": llama_cpp.llama_print_system_info().decode(errors="replace").strip()}  # CPU features used
    if speed:
        ids = llm.tokenize(text[: max(args.contexts) * 8].encode(), add_bos=False, special=False)

        def prefill(c):
            llm.reset()
            llm.eval(ids[:c])

        out.update(timed_contexts(prefill, lambda tok: llm.eval([tok]), ids, args.contexts))
        out["speed_ids"] = ids_digest(ids[: max(args.contexts) + DECODE_STEPS])
    else:
        ids = llm.tokenize(text[: args.ctx * args.windows * 8].encode(), add_bos=False, special=False)
        tot = tot_h = 0.0
        n = n_h = 0
        wins = windows_of(ids, args.ctx, args.windows)
        for w in wins:
            llm.reset()
            llm.eval(w)
            lp = _log_softmax(llm.scores[: len(w) - 1])  # (T-1, V)
            a, h, c = nll_stats(lp, w[1:])
            tot, tot_h, n, n_h = tot + a, tot_h + h, n + len(w) - 1, n_h + c
        out.update({"ppl": math.exp(tot / n), "ppl_second_half": math.exp(tot_h / n_h),
                    "ids": ids_digest(sum(wins, []))})
    out["peak_rss_mib"] = peak_rss_mib()
    return out


def _kv_values(llm) -> int:
    """Key + value elements one token stores over all layers, from the GGUF metadata."""
    md = llm.metadata
    arch = md.get("general.architecture", "llama")
    heads = int(md[f"{arch}.attention.head_count"])
    kv_heads = int(md.get(f"{arch}.attention.head_count_kv", heads))
    return 2 * int(md[f"{arch}.block_count"]) * int(md[f"{arch}.embedding_length"]) // heads * kv_heads


def tqedge_config(name: str):
    """KVConfig of a tqedge KV name: ``exact``, ``tqedge-default`` or a quality.py name (``K4V3+L0@K8V4``)."""
    from tqedge.runtime.eval_ppl import KVConfig

    if name in ("exact", "tqedge-default"):
        return KVConfig(name, "exact" if name == "exact" else None)
    sys.path.insert(0, str(HERE))
    import quality

    cfg = quality.parse_name(name)
    if cfg is None:
        raise SystemExit(f"unknown tqedge KV config {name!r}")
    return cfg


def tqedge_worker(args) -> dict:
    """tqedge side for one KV config (runs in the tqedge venv); phases as in :func:`llama_worker`."""
    import tqedge
    from tqedge.runtime.eval_ppl import build_cache, evaluate, text_windows
    from tqedge.runtime.footprint import PREFILL_CHUNK

    backend = None if args.backend in (None, "default") else args.backend
    spin = bool(backend and backend.endswith("+spin"))  # "native+spin": tqedge.load(spin=True)
    if spin:
        backend = backend.removesuffix("+spin") or None
    model = tqedge.load(args.bundle, threads=args.threads, verify="none", backend=backend, spin=spin)
    cfg = tqedge_config(args.kv)
    text = Path(args.text).read_text(encoding="utf-8")
    kv = args.kv if args.backend in (None, "default") else f"{args.kv} [{args.backend}]"
    out = {"side": "tqedge", "kv": kv, "phase": args.phase, "backend": model.backend_name}
    if args.phase == "speed":
        ids = model.tokenizer.encode(text[: max(args.contexts) * 8], add_special_tokens=False).ids
        cache, out["kv_bytes_per_token"] = build_cache(model, cfg, max(args.contexts) + DECODE_STEPS + 1)

        def prefill(c):  # in the chunks tqedge.generate feeds (runtime/footprint.py)
            cache.reset()
            for a in range(0, c, PREFILL_CHUNK):
                model.forward(ids[a:min(c, a + PREFILL_CHUNK)], cache)

        out.update(timed_contexts(prefill, lambda tok: model.forward([tok], cache), ids, args.contexts))
        out["kv_cache_mib"] = cache.nbytes / 2**20
        out["speed_ids"] = ids_digest(ids[: max(args.contexts) + DECODE_STEPS])
    else:
        wins = text_windows(model, text, args.ctx, args.windows)
        (r,) = evaluate(model, wins, [cfg])
        out.update({"ppl": r["ppl"], "ppl_second_half": r["ppl_second_half"], "kv_bytes_per_token": r["bytes_per_token"],
                    "ids": ids_digest(sum(wins, []))})
    out["peak_rss_mib"] = peak_rss_mib()
    return out


# -- parent -----------------------------------------------------------------------------------
def plan(args) -> list[dict]:
    """The worker runs, one process each: (python executable, side, kv, phase)."""
    jobs = []
    for phase in args.phases:
        jobs += [{"python": str(args.llama_python), "side": "llama", "kv": kv, "phase": phase} for kv in args.llama_kv]
        jobs += [{"python": sys.executable, "side": "tqedge", "kv": kv, "phase": phase, "backend": b}
                 for kv in args.tqedge_kv for b in args.tqedge_backends]
        if args.og_python and phase == "speed":
            jobs.append({"python": str(args.og_python), "side": "og", "kv": "fp32", "phase": phase})
    return jobs


def check_inputs(args) -> list[str]:
    problems = [f"{name} not found: {p}" for name, p in (("--gguf", args.gguf), ("--bundle", args.bundle),
                                                          ("--text", args.text)) if p is None or not Path(p).exists()]
    if args.llama_python is None or not Path(args.llama_python).exists():
        problems.append("--llama-python (the llama-cpp-python venv's python) not found; see this script's docstring")
    og_model = Path(args.og_model or "", "genai_config.json")
    if args.og_python and not (Path(args.og_python).exists() and og_model.exists()):
        problems.append("--og-python / --og-model (genai venv, built model) not found; see benchmarks/peers.py")
    return problems


def merge_rows(results: list[dict]) -> list[dict]:
    """One row per (side, kv): the ppl and speed phases' fields together (peak RSS from speed)."""
    rows: dict = {}
    for r in results:
        row = rows.setdefault((r["side"], r["kv"]), {})
        row.update({k: v for k, v in r.items() if k not in ("phase", "peak_rss_mib")})
        row[f"peak_rss_mib_{r['phase']}"] = r.get("peak_rss_mib")
    return list(rows.values())


def ratios(rows: list[dict], peer: str = "llama.cpp") -> list[dict]:
    """tqedge speed / the peer's fastest row (llama.cpp: KV type), per context, for decode and
    prefill; peak RSS (speed phase) / the peer's smallest.

    Returns:
        one dict per tqedge row: {"kv", "vs", "decode": {ctx: ratio}, "prefill": {ctx: ratio}, "rss": ratio | None}.
    """
    others = [r for r in rows if r["side"] == peer and "decode_tok_s" in r]
    out = []
    for r in rows:
        if r["side"] != "tqedge" or "decode_tok_s" not in r or not others:
            continue
        entry = {"kv": r["kv"], "vs": peer}
        for key in ("decode", "prefill"):
            entry[key] = {c: v / max(o[f"{key}_tok_s"][c] for o in others)
                          for c, v in r[f"{key}_tok_s"].items()}
        rss = [o.get("peak_rss_mib_speed") for o in others]
        entry["rss"] = (r["peak_rss_mib_speed"] / min(rss) if r.get("peak_rss_mib_speed") and all(rss) else None)
        out.append(entry)
    return out


def table(rows: list[dict]) -> str:
    """Markdown: one row per side × KV type, speed columns per context, then the ratio rows."""
    ctxs = list(next((r["decode_tok_s"] for r in rows if "decode_tok_s" in r), {}))
    head = ("| side | KV | PPL | PPL 2nd half | KV bytes/token | " + " | ".join(f"prefill {c}" for c in ctxs) +
            " | " + " | ".join(f"decode {c}" for c in ctxs) + " | peak RSS MiB |")
    lines = [head, "|" + "---|" * (6 + 2 * len(ctxs))]
    f = lambda r, k, fmt: format(r[k], fmt) if k in r else "–"  # noqa: E731
    for r in rows:
        speed = [f"{r[key][c]:.1f}" if key in r else "–" for key in ("prefill_tok_s", "decode_tok_s") for c in ctxs]
        lines.append(f"| {r['side']} | {r['kv']} | {f(r, 'ppl', '.3f')} | {f(r, 'ppl_second_half', '.3f')} | "
                     f"{r['kv_bytes_per_token']:.0f} | " + " | ".join(speed) +
                     f" | {r.get('peak_rss_mib_speed') or r.get('peak_rss_mib_ppl') or 0:.0f} |")
    for q in ratios(rows) + ratios(rows, peers.SIDE):
        cells = [f"{q['prefill'][c]:.2f}x" for c in ctxs] + [f"{q['decode'][c]:.2f}x" for c in ctxs]
        rss = f"{q['rss']:.2f}x" if q["rss"] else ""
        lines.append(f"| ratio vs {q['vs']}'s fastest | {q['kv']} | | | | " + " | ".join(cells) + f" | {rss} |")
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
    ap.add_argument("--tqedge-kv", type=lambda s: s.split(";"), default=TQEDGE_KV,
                    help="tqedge KV configs, ';'-separated (exact, tqedge-default, K4V2, K4V3+L3,4@K4V2, ...)")
    ap.add_argument("--phases", type=lambda s: s.split(","), default=["ppl", "speed"], help="ppl,speed")
    ap.add_argument("--tqedge-backends", type=lambda s: s.split(","), default=["default"],
                    help="tqedge backends to run: 'default' (what tqedge.load picks) and/or names (onnx,native; "
                         "'native+spin' loads with spin=True)")
    ap.add_argument("--llama-kv", type=lambda s: s.split(","), default=list(LLAMA_KV), help="llama.cpp KV types")
    ap.add_argument("--og-python", type=Path, default=None, help="onnxruntime-genai venv's python (peers.py)")
    ap.add_argument("--og-model", type=Path, default=None, help="onnxruntime-genai model folder (its builder's output)")
    ap.add_argument("--out", type=Path, default=HERE / "out" / "vs_llamacpp.json")
    ap.add_argument("--dry-run", action="store_true", help="check inputs and print the plan; run nothing")
    ap.add_argument("--worker", choices=["llama", "tqedge", "og"], help=argparse.SUPPRESS)
    ap.add_argument("--kv", help=argparse.SUPPRESS)
    ap.add_argument("--phase", choices=["ppl", "speed"], help=argparse.SUPPRESS)
    ap.add_argument("--backend", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker == "og":
        print(json.dumps(peers.og_worker(args, timed_contexts, DECODE_STEPS, peak_rss_mib, ids_digest)))
        return 0
    if args.worker:
        print(json.dumps((llama_worker if args.worker == "llama" else tqedge_worker)(args)))
        return 0
    jobs, problems = plan(args), check_inputs(args)
    if args.dry_run:
        print(json.dumps({"jobs": jobs, "problems": problems, "ctx": args.ctx, "windows": args.windows,
                          "contexts": args.contexts}, indent=1))
        return 0
    if problems:
        raise SystemExit("; ".join(problems))
    results = []
    # every side in its own default environment: no OMP_WAIT_POLICY set for llama.cpp (PASSIVE cut
    # its decode 2-3.5x here) nor for tqedge (its kernels do not spin by default)
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    common = ["--gguf", str(args.gguf), "--bundle", str(args.bundle), "--text", str(args.text), "--ctx",
              str(args.ctx), "--windows", str(args.windows), "--contexts", ",".join(map(str, args.contexts)),
              "--threads", str(args.threads), *(["--og-model", str(args.og_model)] if args.og_model else [])]
    for job in jobs:
        cmd = [job["python"], str(Path(__file__).resolve()), "--worker", job["side"], "--kv", job["kv"],
               "--phase", job["phase"], *common, *(["--backend", job["backend"]] if job.get("backend") else [])]
        res = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
        if res.returncode:
            raise SystemExit(worker_failed(f"{job['side']} {job['kv']} {job['phase']}", res))
        results.append(json.loads(res.stdout.strip().splitlines()[-1]))
        print(f"done {job['side']} {job['kv']} {job['phase']}", file=sys.stderr)
        rows = merge_rows(results)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        ids = {r["speed_ids"] for r in rows if "speed_ids" in r}  # every speed side fed the same token ids?
        args.out.write_text(json.dumps({"rows": rows, "ratios": ratios(rows), "ratios_vs_og": ratios(rows, peers.SIDE),
                                        "same_speed_ids": len(ids) <= 1, "ctx": args.ctx, "windows": args.windows,
                                        "threads": args.threads}, indent=1))
    if len(ids) > 1:
        print(f"warning: the speed sides tokenized the text differently: {sorted(ids)}", file=sys.stderr)
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Peak RSS of ``tqedge generate`` against context, measured by the kernel for each child process.

Each point is one ``tqedge generate BUNDLE --raw --json --threads 2 --max-tokens 8`` run on a
prompt of N wikitext tokens, in its own process; the peak is ``wait4``'s ``ru_maxrss``
(:func:`tqedge.runtime.memory.wait_child`; the whole
process: interpreter, libraries, onnxruntime, weights, KV cache, temporaries). ``--src`` runs the
code of another checkout (e.g. ``git archive`` of the commit before a change) for a before/after
pair in one run; every side at its defaults, nothing set in the environment.

    python benchmarks/memory.py --bundle smol-int4.tqe --label after [--src DIR] [--contexts 40,512,2048,8192]
    python benchmarks/memory.py --plot benchmarks/out/memory_before.json benchmarks/out/memory_after.json

Output: ``benchmarks/out/memory_<label>.json``; ``--plot`` writes ``benchmarks/out/memory.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
OUT = HERE / "out"


def prompt_of(bundle: Path, n: int) -> str:
    """About ``n`` tokens of the shipped WikiText-2 excerpt, as text."""
    from tokenizers import Tokenizer

    sys.path.insert(0, str(ROOT))
    from tqedge.data import read_text

    tok = Tokenizer.from_file(str(bundle / "tokenizer.json"))
    ids = tok.encode(read_text("wikitext2")).ids
    if len(ids) < n:
        raise SystemExit(f"the excerpt has only {len(ids)} tokens, fewer than {n}")
    return tok.decode(ids[: n - 1])


def run_point(bundle: Path, src: Path, n: int, threads: int, extra: list[str]) -> dict:
    """One child ``tqedge generate`` on an n-token prompt; its stats and kernel-measured peak RSS."""
    sys.path.insert(0, str(ROOT))
    from tqedge.runtime.memory import wait_child

    cmd = [sys.executable, "-m", "tqedge.cli", "generate", str(bundle), "--raw", "--json", "--threads",
           str(threads), "--max-tokens", "8", *extra]
    env = {**os.environ, "PYTHONPATH": str(src)}
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env=env, cwd=str(src))
    p.stdin.write(prompt_of(bundle, n))
    p.stdin.close()
    out = p.stdout.read()
    err = p.stderr.read()
    status, peak, _ = wait_child(p.pid)
    if status != 0:
        return {"context": n, "error": err.strip().splitlines()[-1] if err.strip() else f"status {status}"}
    stats = json.loads(out)["stats"]
    return {"context": n, "prompt_tokens": stats["prompt_tokens"], "peak_rss_mib": peak / 2**20,
            "prefill_tps": stats["prefill_tps"], "decode_tps": stats["decode_tps"],
            "kv_capacity_mib": stats["kv_capacity_bytes"] / 2**20, "wall_s": time.perf_counter() - t0}


def plot(paths: list[Path]) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4))
    for path in paths:
        r = json.loads(path.read_text())
        pts = [p for p in r["points"] if "peak_rss_mib" in p]
        ax.plot([p["prompt_tokens"] for p in pts], [p["peak_rss_mib"] for p in pts], "o-", label=r["label"])
    ax.set_xscale("log", base=2)
    ax.set_xlabel("context (prompt tokens)")
    ax.set_ylabel("peak RSS of tqedge generate (MiB)")
    ax.set_title(f"{r['bundle']}, {r['threads']} threads")
    ax.grid(alpha=0.3)
    ax.legend()
    out = OUT / "memory.png"
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bundle", type=Path)
    ap.add_argument("--label", default="after")
    ap.add_argument("--src", type=Path, default=ROOT, help="checkout whose code runs (PYTHONPATH)")
    ap.add_argument("--contexts", default="40,512,2048,8192")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--extra", default="", help="more generate options, e.g. '--kv-bits exact'")
    ap.add_argument("--plot", nargs="+", type=Path, help="JSON files to plot (no runs)")
    a = ap.parse_args()
    if a.plot:
        print(plot(a.plot))
        return
    OUT.mkdir(exist_ok=True)
    points = []
    for n in (int(c) for c in a.contexts.split(",")):
        points.append(run_point(a.bundle.resolve(), a.src.resolve(), n, a.threads, a.extra.split()))
        print(json.dumps(points[-1]), flush=True)
    result = {"label": a.label, "bundle": a.bundle.name, "src": str(a.src), "threads": a.threads,
              "extra": a.extra, "machine": platform.machine(), "load_before": os.getloadavg(), "points": points}
    path = OUT / f"memory_{a.label}.json"
    path.write_text(json.dumps(result, indent=1))
    print(path)


if __name__ == "__main__":
    main()

"""First-token latency on a cold and a warm install: the kernels' compile, measured end to end.

Each run is a fresh process (as ``tqedge generate`` would be): import tqedge, load the bundle,
stream a greedy completion of a short prompt (the first lines of the shipped wikitext); it records the time from process start to
the loaded model and to the first token (wall and CPU time, its children's included — the
warm-up compiles in a child process: on a shared machine the CPU time is what an idle one would
wait), its peak RSS and its children's, and every decode step after it (a lazily compiled
kernel shows up as a stalled step: the parallel twins when the context grows, the window's
backlog encode every 128 tokens). A variant is ``label=SRC[:VAR=VALUE,...]`` as in
``benchmarks/threads.py``; "cold" empties the variant's kernel cache first (``--cache-dir`` for
this tree: ``TQEDGE_CACHE_DIR``; for an older tree whose Numba cache sits next to its sources,
its ``__pycache__`` *.nbi/*.nbc files), "warm" runs again right after.

    python benchmarks/cold_start.py --bundle /tmp/int4.tqe --variant now=. --variant before=/tmp/base
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

T_START = time.perf_counter()
HERE = Path(__file__).resolve().parent
PROMPT_CHARS = 200


def cpu_s() -> float:
    """CPU seconds of this process and its reaped children (the warm-up compiles in a child)."""
    import resource

    c = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + c.ru_utime + c.ru_stime


def worker(bundle: str, max_tokens: int) -> dict:
    import resource

    import tqedge
    from tqedge.data import read_text
    from tqedge.runtime.generate import stream_generate

    model = tqedge.load(bundle, verify="none")
    t_loaded, cpu_loaded = time.perf_counter(), cpu_s()
    prompt = read_text()[:PROMPT_CHARS]
    steps, last, first = [], t_loaded, None
    for _ in stream_generate(model, prompt, max_tokens=max_tokens, temperature=0):
        now = time.perf_counter()
        if first is None:
            first, cpu_first = now, cpu_s()
        else:
            steps.append(now - last)
        last = now
    return {"load_s": t_loaded - T_START, "first_token_s": first - T_START, "first_token_after_load_s": first - t_loaded,
            "load_cpu_s": cpu_loaded, "first_token_cpu_s": cpu_first, "total_cpu_s": cpu_s(),
            "steps": len(steps), "max_step_s": max(steps, default=0.0), "median_step_s": sorted(steps)[len(steps) // 2],
            "total_s": last - T_START,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,  # Linux: KiB
            "children_peak_rss_mib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}


def clear(src: Path, cache_dir: Path) -> None:
    shutil.rmtree(cache_dir, ignore_errors=True)
    for pattern in ("*.nbi", "*.nbc"):  # an older tree caches next to its sources
        for f in src.rglob(pattern):
            f.unlink()


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bundle", required=True)
    p.add_argument("--variant", action="append", default=[], help="label=SRC[:VAR=VALUE,...] (repeatable)")
    p.add_argument("--max-tokens", type=int, default=140)
    p.add_argument("--cache-dir", default="/tmp/tqedge-cold-start-cache", help="TQEDGE_CACHE_DIR of the runs")
    p.add_argument("--out", default=str(HERE / "out" / "cold_start.json"))
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.bundle, args.max_tokens)))
        return
    sys.path.insert(0, str(HERE))
    from threads import CLEAN, parse_variant

    results, load_before = {}, os.getloadavg()
    for label, src, env_extra in [parse_variant(v) for v in args.variant] or [("now", ".", {})]:
        src_path = Path(src).resolve()
        env = {k: v for k, v in os.environ.items() if k not in (*CLEAN, "NUMBA_CACHE_DIR")}
        env.update(env_extra, PYTHONPATH=str(src_path), TQEDGE_CACHE_DIR=args.cache_dir)
        clear(src_path, Path(args.cache_dir))
        results[label] = {}
        for state in ("cold", "warm"):
            cmd = [sys.executable, __file__, "--worker", "--bundle", args.bundle, "--max-tokens", str(args.max_tokens)]
            out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True, timeout=3600)
            r = results[label][state] = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"{label:10s} {state}: load {r['load_s']:7.1f} s  first token {r['first_token_s']:7.1f} s "
                  f"(CPU {r['first_token_cpu_s']:6.1f} s)  peak RSS {r['peak_rss_mib']:5.0f} MiB "
                  f"(children {r['children_peak_rss_mib']:5.0f})  "
                  f"worst later step {r['max_step_s']:6.2f} s  median step {1e3 * r['median_step_s']:6.1f} ms  "
                  f"total {r['total_s']:7.1f} s", flush=True)
    data = {"bundle": args.bundle, "machine": platform.platform(), "cpus": os.cpu_count(), "prompt_chars": PROMPT_CHARS,
            "max_tokens": args.max_tokens, "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
            "results": results}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

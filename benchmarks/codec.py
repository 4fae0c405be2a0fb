"""Codec benchmark: distortion vs theory and the optimum, and decode-attention kernel speed.

    python benchmarks/codec.py --out benchmarks/out/codec.json          # full (several minutes)
    python benchmarks/codec.py --quick --out benchmarks/out/codec.json  # < 60 s on an idle 2-core box

Distortion (random unit vectors, independent of the codec's own numbers):
- D_mse = E‖x − x̂‖² for b = 1..4 at d = 64 and 128, plain and corrected norm, next to the
  paper's rounded values and the optimal Lloyd–Max distortion for the coordinate density,
  computed here independently by plain Lloyd on Monte-Carlo coordinates of random unit vectors;
- D_prod = d · E(<y, x> − est)² for TurboQuant_prod (qjl) with b = 1..4 total bits, next to
  the paper's 1.57, 0.56, 0.18, 0.047 (all /d).

Speed: one decode step of GQA attention (H = 3 KV heads, G = 3 query heads each, d = 64) over
N keys, compressed (project query, scores kernel, NumPy softmax, value-sum kernel, unproject)
vs NumPy float32 dense attention (q @ K.T, softmax, p @ V), both cycling through a working set
of layers the size of SmolLM2's cache at that context (30 layers × 3 KV heads, capped by
--max-ws-gib) so neither runs from CPU caches. Each (path, thread count) runs in its own
subprocess with NUMBA_NUM_THREADS / OPENBLAS_NUM_THREADS / OMP_NUM_THREADS set (threadpoolctl
is not a dependency): dense gives BLAS the threads; compressed gives Numba the threads and keeps
BLAS (tiny query projections only) at one, so idle BLAS workers do not spin against the kernels.
Times are medians over repeats of a full sweep over the layers; the process CPU time is recorded
too (with 1 thread it is robust to other jobs on a busy machine), and so is the load average.
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

import numpy as np

PAPER_MSE = {1: 0.36, 2: 0.117, 3: 0.03, 4: 0.009}
PAPER_PROD = {1: 1.57, 2: 0.56, 3: 0.18, 4: 0.047}  # × 1/d
H, G, D, LAYERS = 3, 3, 64, 30


def unit_vectors(n: int, d: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def monte_carlo_lloyd(d: int, bits: int, n: int, seed: int = 123, iters: int = 3000) -> float:
    """Optimal D_mse by plain Lloyd on coordinates of random unit vectors (no density formula)."""
    xs = np.sort(unit_vectors(n, d, seed).astype(np.float64).reshape(-1))
    s1 = np.concatenate(([0.0], np.cumsum(xs)))
    levels = 1 << bits
    c = np.quantile(xs, (np.arange(levels) + 0.5) / levels)
    for _ in range(iters):
        cut = np.concatenate(([0], np.searchsorted(xs, 0.5 * (c[1:] + c[:-1])), [xs.size]))
        c = (s1[cut[1:]] - s1[cut[:-1]]) / np.diff(cut)
    idx = np.searchsorted(0.5 * (c[1:] + c[:-1]), xs)
    return d * float(np.mean((xs - c[idx]) ** 2))


def distortion(n: int) -> dict:
    from tqedge.codec.quantizer import CodecConfig, TurboQuant

    rows_mse, rows_prod = [], []
    for d in (64, 128):
        x = unit_vectors(n, d, seed=d)
        y = unit_vectors(n, d, seed=d + 1)
        for b in (1, 2, 3, 4):
            opt = monte_carlo_lloyd(d, b, max(n, 5000 if n < 10000 else 20000))
            row = {"d": d, "bits": b, "paper": PAPER_MSE[b], "optimal_mc": opt}
            for norm in ("plain", "corrected"):
                tq = TurboQuant(CodecConfig(dim=d, bits=b, norm=norm, seed=7))
                xh = tq.decode(*tq.encode(x))
                row[norm] = float(np.mean(np.sum((x - xh) ** 2, axis=1)))
                row[f"{norm}_ip_rmse"] = float(np.sqrt(np.mean(np.sum(y * (x - xh), axis=1) ** 2)))
            row["plain_vs_optimal"] = row["plain"] / opt - 1
            rows_mse.append(row)
            true = np.sum(x * y, axis=1)  # (n,)
            prod = {"d": d, "bits": b, "paper_x_d": PAPER_PROD[b]}
            for norm in ("plain", "corrected"):  # plain = the paper's MSE stage
                tq = TurboQuant(CodecConfig(dim=d, bits=b, qjl=True, norm=norm, seed=7))
                c, s = tq.encode(x)
                est = np.einsum("ng,ng->n", tq.project_query(y), tq.dequantize_projected(c[None], s[None])[0])
                err = est - true
                prod[f"{norm}_x_d"] = d * float(np.mean(err**2))
                prod[f"{norm}_mean_error"] = float(np.mean(err))
                prod[f"{norm}_mean_error_se"] = float(np.std(err) / np.sqrt(n))
            rows_prod.append(prod)
    return {"vectors": n, "mse": rows_mse, "prod": rows_prod}


# -- speed (runs inside a child process with the thread count fixed by env) -----------------
def _softmax(s: np.ndarray) -> np.ndarray:
    p = np.exp(s - s.max(axis=-1, keepdims=True))  # (H, G, N)
    p /= p.sum(axis=-1, keepdims=True)
    return p


def speed_child(which: str, ns: list[int], reps: int, max_ws: float, kbits: float, vbits: float) -> list[dict]:
    """Time one path ("dense" or "compressed") for each N; runs in a child with fixed threads."""
    import numba

    from tqedge.codec import kernels
    from tqedge.codec.quantizer import CodecConfig, TurboQuant

    tk = TurboQuant(CodecConfig(dim=D, bits=kbits, seed=1))
    tv = TurboQuant(CodecConfig(dim=D, bits=vbits, seed=2))
    rng = np.random.default_rng(0)
    results = []
    for n in ns:
        per_layer = H * n * (2 * D * 4 + tk.bytes_per_vector + tv.bytes_per_vector)  # both paths' data
        layers = int(max(2, min(LAYERS, max_ws * 2**30 // per_layer)))
        k = rng.standard_normal((H, n, D)).astype(np.float32)  # (H, N, D)
        v = rng.standard_normal((H, n, D)).astype(np.float32)
        q = (rng.standard_normal((H, G, D)) / 8).astype(np.float32)  # (H, G, D)
        ref = np.matmul(_softmax(np.matmul(q, k.transpose(0, 2, 1))), v)  # (H, G, D)
        if which == "dense":
            data = [(k.copy(), v.copy()) for _ in range(layers)]  # distinct memory per layer

            def run_dense(i):
                kk, vv = data[i]
                return np.matmul(_softmax(np.matmul(q, kk.transpose(0, 2, 1))), vv)  # (H, G, D)

            fns = {"dense": run_dense}
            rel_err = 0.0
        else:
            kc, ks = tk.encode(k.reshape(-1, D))
            vc, vs = tv.encode(v.reshape(-1, D))
            data = [(kc.reshape(H, n, -1).copy(), ks.reshape(H, n, -1).copy(),
                     vc.reshape(H, n, -1).copy(), vs.reshape(H, n, -1).copy()) for _ in range(layers)]
            pw = np.full((H, G, n), 1.0 / n, np.float32)

            def run_comp(i):
                a, b, c, d = data[i]
                p = _softmax(tk.scores(tk.project_query(q), a, b))  # (H, G, N)
                return tv.unproject(tv.value_sum(p, c, d))  # (H, G, D)

            def run_scores(i):
                return tk.scores(tk.project_query(q), data[i][0], data[i][1])

            def run_values(i):
                return tv.value_sum(pw, data[i][2], data[i][3])

            fns = {"compressed": run_comp, "scores": run_scores, "values": run_values}
            rel_err = float(np.abs(run_comp(0) - ref).max() / np.abs(ref).max())
        for f in fns.values():
            f(0)  # compile / warm up
        times = {name: [] for name in fns}
        cpu = {name: [] for name in fns}
        for _ in range(reps):
            for name, f in fns.items():
                t0, c0 = time.perf_counter(), time.process_time()
                for i in range(layers):
                    f(i)
                times[name].append((time.perf_counter() - t0) / layers)
                cpu[name].append((time.process_time() - c0) / layers)
        row = {"N": n, "layers_in_working_set": layers, "working_set_mib": round(layers * per_layer / 2**20, 1)}
        if which != "dense":
            row.update(backend=kernels.BACKEND, numba_threads=numba.get_num_threads(), output_rel_err_vs_dense=rel_err)
        for name in fns:
            row[f"{name}_ns_per_key"] = round(float(np.median(times[name])) * 1e9 / (H * n), 2)
            row[f"{name}_cpu_ns_per_key"] = round(float(np.median(cpu[name])) * 1e9 / (H * n), 2)
        results.append(row)
        del data
    return results


def _child(which: str, t: int, args: list) -> list[dict]:
    # dense: BLAS gets the threads. compressed: Numba gets them and BLAS (only the tiny query
    # projections) stays single-threaded, so no idle BLAS worker spins against the kernels.
    blas = t if which == "dense" else 1
    env = {**os.environ, "NUMBA_NUM_THREADS": str(t), "OPENBLAS_NUM_THREADS": str(blas),
           "OMP_NUM_THREADS": str(blas), "MKL_NUM_THREADS": str(blas)}
    cmd = [sys.executable, __file__, "--child", json.dumps([which, *args])]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def speed(ns, reps, threads, max_ws, kbits, vbits) -> list[dict]:
    out = []
    for t in threads:
        args = [ns, reps, max_ws, kbits, vbits]
        rows = [{**d, **c} for d, c in zip(_child("dense", t, args), _child("compressed", t, args))]
        for r in rows:
            r["threads"] = t
            r["speedup_vs_dense"] = round(r["dense_ns_per_key"] / r["compressed_ns_per_key"], 3)
            r["cpu_time_ratio_dense_over_compressed"] = round(r["dense_cpu_ns_per_key"] / r["compressed_cpu_ns_per_key"], 3)
            print(f"  threads={t} N={r['N']:>6}  dense {r['dense_ns_per_key']:8.1f}  compressed "
                  f"{r['compressed_ns_per_key']:8.1f} ns/key-head  (scores {r['scores_ns_per_key']:.1f}, values "
                  f"{r['values_ns_per_key']:.1f})  speedup {r['speedup_vs_dense']:.2f}x (cpu time "
                  f"{r['cpu_time_ratio_dense_over_compressed']:.2f}x)  [{r['layers_in_working_set']} "
                  f"layers, {r['working_set_mib']} MiB]", flush=True)
        out += rows
    return out


def plot(report: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not importable: no plot")
        return
    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    for d in (64, 128):
        rows = [r for r in report["distortion"]["mse"] if r["d"] == d]
        ax[0].semilogy([r["bits"] for r in rows], [r["plain"] for r in rows], "o-", label=f"ours d={d}")
        ax[0].semilogy([r["bits"] for r in rows], [r["optimal_mc"] for r in rows], "x--", label=f"optimal d={d}")
    ax[0].semilogy(list(PAPER_MSE), list(PAPER_MSE.values()), "k:", label="paper")
    ax[0].set(xlabel="bits", ylabel="D_mse", title="MSE distortion")
    ax[0].legend()
    for t in sorted({r["threads"] for r in report["speed"]}):
        rows = [r for r in report["speed"] if r["threads"] == t]
        ax[1].loglog([r["N"] for r in rows], [r["dense_ns_per_key"] for r in rows], "x--", label=f"dense {t}t")
        ax[1].loglog([r["N"] for r in rows], [r["compressed_ns_per_key"] for r in rows], "o-",
                     label=f"TurboQuant {t}t")
    ax[1].set(xlabel="keys N", ylabel="ns per key and KV head", title="decode attention")
    ax[1].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("benchmarks/out/codec.json"))
    ap.add_argument("--quick", action="store_true", help="small sizes, finishes in < 60 s")
    ap.add_argument("--max-ws-gib", type=float, default=2.0, help="cap on the speed working set per path")
    ap.add_argument("--bits", default="4,3", help="key,value bits for the speed runs")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(speed_child(*json.loads(a.child))))
        return
    kbits, vbits = (float(b) for b in a.bits.split(","))
    ns = [1024, 4096] if a.quick else [1024, 4096, 16384, 65536]
    reps = 3 if a.quick else 7
    max_ws = min(a.max_ws_gib, 0.1) if a.quick else a.max_ws_gib
    t0 = time.time()
    load0 = list(os.getloadavg())  # other jobs on the machine skew wall-clock speed numbers
    print("distortion ...", flush=True)
    dist = distortion(2000 if a.quick else 10000)
    print(f"{'d':>4} {'b':>2} {'paper':>7} {'optimal':>9} {'plain':>9} {'corrected':>9} {'plain/opt-1':>11}")
    for r in dist["mse"]:
        print(f"{r['d']:>4} {r['bits']:>2} {r['paper']:>7} {r['optimal_mc']:>9.5f} {r['plain']:>9.5f} "
              f"{r['corrected']:>9.5f} {r['plain_vs_optimal']:>+10.2%}")
    print(f"{'d':>4} {'b':>2} {'paper·d':>8} {'plain·d':>8} {'corr.·d':>8} {'mean err':>9} {'± se':>8}")
    for r in dist["prod"]:
        print(f"{r['d']:>4} {r['bits']:>2} {r['paper_x_d']:>8} {r['plain_x_d']:>8.4f} {r['corrected_x_d']:>8.4f} "
              f"{r['plain_mean_error']:>+9.5f} {r['plain_mean_error_se']:>8.5f}")
    print(f"speed (d={D}, {H} KV heads x {G} query heads, keys {kbits:g} bits, values {vbits:g} bits) ...", flush=True)
    sp = speed(ns, reps, [1, 2], max_ws, kbits, vbits)
    report = {"quick": a.quick, "seconds": round(time.time() - t0, 1), "machine": platform.machine(),
              "load_average_at_start": load0, "load_average_at_end": list(os.getloadavg()),
              "cpu_count": os.cpu_count(), "key_bits": kbits, "value_bits": vbits, "distortion": dist, "speed": sp}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {a.out} in {report['seconds']} s")
    plot(report, a.out.with_suffix(".png"))


if __name__ == "__main__":
    main()

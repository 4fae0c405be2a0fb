"""A decode step's linears alone: the GGUF's own Q4_1 blocks through tqedge's vector kernel
(:func:`tqedge.codec.kernels_linear.q4_1_gemv`) against onnxruntime's ``MatMulNBits`` (MLAS,
``accuracy_level`` 4: int8 activations, what an int4 bundle runs) on the same weights, one input
row, one thread each, then two (MLAS's pool; tqedge: each linear's rows in halves on two threads,
joined once per step, so what it gives is the kernels' share without a per-linear barrier).

Both sides take SmolLM2's 30 layers of Q4_1 linears from the GGUF, fused as the bundle fuses them
(q/k/v 960 × 576, output 576 × 576, gate/up 3,072 × 576, down 576 × 1,536). MLAS gets the codes
reordered into its nibble order, the float16 ``d`` as float32 scales and zero point 0 (the ``m``
part is the bundle's separate ``AddBlockOffsets`` op, not timed here: MLAS's side is given that
for free); tqedge reads the 20-byte blocks as the file stores them (``d`` and ``m`` included).
Each round times ``--steps`` calls of all 120 linears per side after 5 untimed ones, the sides
alternating; medians over rounds. Prints and writes JSON (ms per step, GB/s of weights read).

    python benchmarks/linear_q4.py --gguf SmolLM2-135M-Instruct.Q4_1.gguf [--rounds 5] [--steps 50] \\
        [--out benchmarks/out/linear_q4.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

PARTS = {"qkv": ("attn_q", "attn_k", "attn_v"), "o": ("attn_output",), "gate_up": ("ffn_gate", "ffn_up"),
         "down": ("ffn_down",)}


def load_layers(path: str) -> dict[str, np.ndarray]:
    """{fused linear: (layers, N, nb·20) uint8} of the GGUF's Q4_1 linears."""
    from gguf import GGMLQuantizationType, GGUFReader

    tensors = {t.name: t for t in GGUFReader(path).tensors}
    n_layers = 1 + max(int(n.split(".")[1]) for n in tensors if n.startswith("blk."))
    out = {}
    for fused, parts in PARTS.items():
        layers = []
        for i in range(n_layers):
            rows = []
            for p in parts:
                t = tensors[f"blk.{i}.{p}.weight"]
                if t.tensor_type != GGMLQuantizationType.Q4_1:
                    raise SystemExit(f"blk.{i}.{p}.weight is {t.tensor_type.name}, not Q4_1")
                rows.append(np.asarray(t.data).reshape(int(t.shape[1]), -1))
            layers.append(np.concatenate(rows, 0))
        out[fused] = np.ascontiguousarray(np.stack(layers))
    return out


def mlas_model(layers: dict[str, np.ndarray]):
    """One graph with every linear as a MatMulNBits node (inputs x576, x1536; one output each)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    nodes, inits, outs = [], [], []
    for fused, w in layers.items():
        for i, wl in enumerate(w):
            n, nbytes = wl.shape
            nb = nbytes // 20
            blocks = wl.reshape(n, nb, 20)
            d = blocks[..., 0:2].copy().view(np.float16).reshape(n, nb).astype(np.float32)
            qs = blocks[..., 4:]
            q = np.concatenate([qs & 15, qs >> 4], axis=2)  # (n, nb, 32) in input order
            b = (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8)
            zp = np.zeros((n, (nb + 1) // 2), np.uint8)
            name = f"{fused}{i}"
            inits += [numpy_helper.from_array(b, name + ".B"), numpy_helper.from_array(d.reshape(-1), name + ".s"),
                      numpy_helper.from_array(zp.reshape(-1), name + ".zp")]
            nodes.append(helper.make_node("MatMulNBits", [f"x{nb * 32}", name + ".B", name + ".s", name + ".zp"],
                                          [name], domain="com.microsoft", K=nb * 32, N=n, bits=4, block_size=32,
                                          accuracy_level=4))
            outs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, ["T", n]))
    ins = [helper.make_tensor_value_info(f"x{k}", TensorProto.FLOAT, ["T", k]) for k in (576, 1536)]
    graph = helper.make_graph(nodes, "linears", ins, outs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gguf", required=True)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--prompt-rows", type=int, default=256, help="rows of the prompt phase (a prefill chunk); 0: none")
    ap.add_argument("--out", default=str(Path(__file__).parent / "out" / "linear_q4.json"))
    a = ap.parse_args()

    import numba
    import onnxruntime as ort

    from tqedge.codec import simd
    from tqedge.codec.kernels_linear import group_q4_1, q4_1_gemm, q4_1_gemv, quantize_rows_q8
    from tqedge.codec.numba_runtime import njit

    layers = load_layers(a.gguf)
    nbytes = sum(w.nbytes for w in layers.values())
    rng = np.random.default_rng(0)
    x = {k: rng.standard_normal(k).astype(np.float32) for k in (576, 1536)}
    model = mlas_model(layers).SerializeToString()
    sessions = {}
    for t in (1, 2):
        so = ort.SessionOptions()
        so.intra_op_num_threads = t
        so.inter_op_num_threads = 1
        sessions[t] = ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])
    sess = sessions[1]
    feeds = {f"x{k}": v[None] for k, v in x.items()}
    names = [o.name for o in sess.get_outputs()]
    ws = [layers[f] for f in PARTS]
    outs = [np.empty(w.shape[1], np.float32) for w in ws]

    @njit(warm=False, nogil=True)
    def half(n, part, parts):
        return (n // 4 * part // parts) * 4, (n // 4 * (part + 1) // parts) * 4

    @njit(warm=False, nogil=True)
    def step4(wq, wo, wg, wd, x576, x1536, yq, yo, yg, yd, part, parts):
        for i in range(wq.shape[0]):
            q4_1_gemv(wq[i], x576, yq, *half(yq.shape[0], part, parts))
            q4_1_gemv(wo[i], x576, yo, *half(yo.shape[0], part, parts))
            q4_1_gemv(wg[i], x576, yg, *half(yg.shape[0], part, parts))
            q4_1_gemv(wd[i], x1536, yd, *half(yd.shape[0], part, parts))

    ws4 = [np.stack([group_q4_1(wl) for wl in w]) for w in ws]
    outs4 = [np.empty_like(o) for o in outs]

    def ours4():
        step4(*ws4, x[576], x[1536], *outs4, 0, 1)

    pool = ThreadPoolExecutor(1)

    def ours4_2threads():  # each linear's rows in two halves, one per thread, joined once per step (no per-linear sync)
        other = pool.submit(step4, *ws4, x[576], x[1536], *outs4, 1, 2)
        step4(*ws4, x[576], x[1536], *outs4, 0, 2)
        other.result()

    def mlas():
        sess.run(names, feeds)

    def mlas_2threads():
        sessions[2].run(names, feeds)

    T = a.prompt_rows
    X = {k: rng.standard_normal((max(T, 1), k)).astype(np.float32) for k in (576, 1536)}
    pfeeds = {f"x{k}": v for k, v in X.items()}
    pouts = [np.empty((max(T, 1), w.shape[1]), np.float32) for w in ws]

    def scratch():
        return [(np.empty((max(T, 1), 2 * k), np.int8), np.empty((max(T, 1), k // 32), np.float32),
                 np.empty((max(T, 1), k // 32), np.float32)) for k in (576, 1536)]

    bufs = [scratch(), scratch()]  # one set per thread: each quantizes the inputs it reads

    @njit(warm=False, nogil=True)
    def prompt4(wq, wo, wg, wd, x576, x1536, yq, yo, yg, yd, b576, b1536, part, parts):
        for i in range(wq.shape[0]):
            for w, x, y, b in ((wq[i], x576, yq, b576), (wo[i], x576, yo, b576), (wg[i], x576, yg, b576),
                               (wd[i], x1536, yd, b1536)):
                quantize_rows_q8(x, b[0], b[1], b[2])
                q4_1_gemm(w, b[0], b[1], b[2], y, *half(y.shape[1], part, parts))

    def prompt_ours():
        prompt4(*ws4, X[576], X[1536], *pouts, *bufs[0], 0, 1)

    def prompt_ours_2threads():
        other = pool.submit(prompt4, *ws4, X[576], X[1536], *pouts, *bufs[1], 1, 2)
        prompt4(*ws4, X[576], X[1536], *pouts, *bufs[0], 0, 2)
        other.result()

    def prompt_mlas():
        sess.run(names, pfeeds)

    def prompt_mlas_2threads():
        sessions[2].run(names, pfeeds)

    # the same products: the last layer's outputs agree to int8-activation accuracy once the m part
    # (the bundle's AddBlockOffsets) is added to MatMulNBits' output
    ours4()
    outs = [o.copy() for o in outs4]
    ours4_2threads()
    if not all(np.array_equal(a, b) for a, b in zip(outs, outs4)):
        raise SystemExit("two threads gave other bits")
    theirs = dict(zip(names, sess.run(names, feeds)))
    n_layers = ws[0].shape[0]
    agree = {}
    for j, (f, w) in enumerate(zip(PARTS, ws)):
        blocks = w[-1].reshape(w.shape[1], -1, 20)
        m = blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float64)  # (n, nb)
        xf = x[blocks.shape[1] * 32]
        full = theirs[f"{f}{n_layers - 1}"][0] + m @ xf.reshape(-1, 32).sum(1, dtype=np.float64)
        agree[f] = float(np.max(np.abs(outs[j] - full)) / np.max(np.abs(full)))
    print("max |ours - (MatMulNBits + m)| / max |MatMulNBits + m|, last layer:", agree)

    def timed(fn, steps):
        for _ in range(min(5, steps)):
            fn()
        t = []
        for _ in range(steps):
            t0 = time.perf_counter()
            fn()
            t.append(time.perf_counter() - t0)
        return statistics.median(t) * 1e3

    sides = {"tqedge_q4_1_x4": ours4, "onnxruntime_matmulnbits": mlas,
             "tqedge_q4_1_x4_2threads": ours4_2threads, "onnxruntime_matmulnbits_2threads": mlas_2threads}
    if T:
        prompt_ours_2threads()
        for i in range(T):  # the tile's rows are the one-row kernel's bits
            one = np.empty_like(outs4[0])
            step4(*ws4, X[576][i], X[1536][i], one, *outs4[1:], 0, 1)
            if not np.array_equal(one, pouts[0][i]):
                raise SystemExit("the prompt tile gave other bits than the one-row kernel")
        sides |= {"prompt_tqedge_q4_1_x4": prompt_ours, "prompt_onnxruntime_matmulnbits": prompt_mlas,
                  "prompt_tqedge_q4_1_x4_2threads": prompt_ours_2threads,
                  "prompt_onnxruntime_matmulnbits_2threads": prompt_mlas_2threads}
    rounds: dict[str, list] = {k: [] for k in sides}
    for r in range(a.rounds):
        for k, fn in sides.items():
            rounds[k].append(timed(fn, a.steps if not k.startswith("prompt") else max(3, a.steps // 10)))
        print(f"round {r}: " + ", ".join(f"{k} {v[-1]:.3f} ms" for k, v in rounds.items()), flush=True)
    med = {k: statistics.median(v) for k, v in rounds.items()}
    res = {
        "what": "SmolLM2-135M's 30 layers of Q4_1 linears (fused as the bundle): one input row (a decode "
                "step) and a prompt chunk, on one and two threads",
        "host": {"machine": platform.machine(), "simd_mode": simd.MODE, "numba": numba.__version__,
                 "onnxruntime": ort.__version__, "loadavg": os.getloadavg()},
        "weights_bytes_q4_1": nbytes,
        "rounds": rounds, "median_ms": med,
        "ratio_matmulnbits_over_tqedge": {
            "1 thread, interleaved": med["onnxruntime_matmulnbits"] / med["tqedge_q4_1_x4"],
            "2 threads, interleaved": med["onnxruntime_matmulnbits_2threads"] / med["tqedge_q4_1_x4_2threads"]},
        "weights_gb_per_s": {k: nbytes / med[k] / 1e6 for k in sides if not k.startswith("prompt")},
        "prompt_rows": T,
        "prompt_rows_per_s": {k: T / med[k] * 1e3 for k in sides if k.startswith("prompt")},
        "relative_diff_last_layer": agree,
    }
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    if T:
        res["ratio_matmulnbits_over_tqedge"] |= {
            f"prompt of {T} rows, 1 thread": med["prompt_onnxruntime_matmulnbits"] / med["prompt_tqedge_q4_1_x4"],
            f"prompt of {T} rows, 2 threads":
                med["prompt_onnxruntime_matmulnbits_2threads"] / med["prompt_tqedge_q4_1_x4_2threads"]}
    Path(a.out).write_text(json.dumps(res, indent=2))
    print(json.dumps({k: res[k] for k in ("median_ms", "ratio_matmulnbits_over_tqedge", "weights_gb_per_s",
                                          "prompt_rows_per_s") if k in res}))


if __name__ == "__main__":
    main()

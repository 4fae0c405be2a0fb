"""llama.cpp peer of ``benchmarks/quality.py``: perplexity, KL and top-1 agreement of llama.cpp's
quantized KV caches (q8_0, q4_0 …) against its f16 cache, on token windows given as ids.

Runs under the llama.cpp venv (llama-cpp-python), not the tqedge one; ``quality.py --llamacpp``
starts it in a subprocess with the windows its bundle tokenizer cut, so both sides score the
same tokens. Every KV type is its own context on the same GGUF, fed the same ids chunk by chunk
in lock step (one ``llama_decode`` of ``--chunk`` tokens with every position's logits); the
metrics are :class:`tqedge.runtime.eval_ppl.Tally`'s, the f16 context playing the exact cache.
Flash attention is on for every context (llama.cpp needs it for a quantized V cache).

    /work/llama-venv/bin/python benchmarks/llamacpp_ppl.py --gguf G --windows W.json \\
        --types f16,q8_0,q4_0 --threads 1

Prints JSON lines: first ``{"system_info": ..., "llama_cpp_python": ...}``, then one per window:
a list of per-config results (:meth:`Tally.result` plus config, kv_bits, bytes_per_token).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tqedge.runtime.eval_ppl import Tally  # noqa: E402  (numpy-only module)

BLOCK = {"f32": (1, 4), "f16": (1, 2), "q8_0": (32, 34), "q5_0": (32, 22), "q4_0": (32, 18)}  # (values, bytes)


def kv_bytes_per_token(name: str, layers: int, kv_heads: int, head_dim: int) -> float:
    """Bytes one token costs in ``layers`` layers' K and V at GGML type ``name``."""
    n, b = BLOCK[name]
    return 2 * layers * kv_heads * head_dim * b / n


def open_ctx(gguf: str, kind: str, ctx: int, chunk: int, threads: int):
    import llama_cpp

    t = getattr(llama_cpp, f"GGML_TYPE_{kind.upper()}")
    return llama_cpp.Llama(gguf, n_ctx=ctx, n_batch=chunk, n_ubatch=chunk, n_threads=threads,
                           n_threads_batch=threads, type_k=t, type_v=t, flash_attn=True, logits_all=False,
                           verbose=False)


def chunk_logits(llm, ids: list[int], n_past: int) -> np.ndarray:
    """Decode ``ids`` at positions ``n_past…`` and return every position's logits (T, V) float32."""
    llm._batch.set_batch(batch=ids, n_past=n_past, logits_all=True)
    llm._ctx.decode(llm._batch)
    flat = np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(len(ids) * llm.n_vocab(),))
    return flat.reshape(len(ids), -1).copy()


def score_window(ctxs: dict, ids: list[int], chunk: int) -> dict[str, Tally]:
    """Tallies of every non-f16 context against the f16 one over one window."""
    base, tallies = "f16", {k: Tally() for k in ctxs if k != "f16"}
    for llm in ctxs.values():
        llm._ctx.kv_cache_clear()
        llm.reset()
    ids_np, n = np.asarray(ids, dtype=np.int64), len(ids)
    for a in range(0, n - 1, chunk):
        b = min(a + chunk, n - 1)
        targets, tpos = ids_np[a + 1:b + 1], np.arange(a + 1, b + 1)
        lq, h2 = tpos >= n - n // 4, tpos > n // 2
        ref = chunk_logits(ctxs[base], ids[a:b], a)
        for k, tally in tallies.items():
            tally.add(chunk_logits(ctxs[k], ids[a:b], a), ref, targets, lq, h2)
    for t in tallies.values():
        t.per_window.append(100 * (math.exp(t.nll / t.tokens - t.nll_exact / t.tokens) - 1))
    return tallies


def main(argv=None) -> int:
    import llama_cpp

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gguf", required=True)
    ap.add_argument("--windows", type=Path, required=True, help="JSON: list of token-id lists")
    ap.add_argument("--types", default="f16,q8_0,q4_0", help="GGML KV types; f16 is the reference")
    ap.add_argument("--chunk", type=int, default=512)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--paying", type=int, required=True, help="layers that pay per token (full attention)")
    ap.add_argument("--kv-heads", type=int, required=True)
    ap.add_argument("--head-dim", type=int, required=True)
    a = ap.parse_args(argv)
    windows = json.loads(a.windows.read_text())
    ctx = max(len(w) for w in windows)
    kinds = ["f16"] + [k for k in a.types.split(",") if k != "f16"]
    ctxs = {k: open_ctx(a.gguf, k, ctx, a.chunk, a.threads) for k in kinds}
    print(json.dumps({"system_info": llama_cpp.llama_print_system_info().decode(),
                      "llama_cpp_python": llama_cpp.__version__, "flash_attn": True,
                      "swa_full": bool(ctxs["f16"].context_params.swa_full)}), flush=True)
    for ids in windows:
        tallies = score_window(ctxs, ids, a.chunk)
        rows = []
        for k, t in tallies.items():
            per = kv_bytes_per_token(k, a.paying, a.kv_heads, a.head_dim)
            rows.append({**t.result(), "config": f"llama.cpp {k}", "settings": {"type_k": k, "type_v": k},
                         "kv_bits": k, "bytes_per_token": per, "fixed_bytes": 0, "windows": 1,
                         "values_per_token": 2 * a.paying * a.kv_heads * a.head_dim, "tokens_in_32mib": None})
        print(json.dumps(rows), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

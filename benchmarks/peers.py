"""onnxruntime-genai as a peer of :mod:`vs_llamacpp`: the ONNX runtime a user would otherwise pick.

A *benchmark-only* dependency, in its own venv (never a tqedge dependency; this module imports
nothing from it at import time). Setup, from the same GGUF the other sides run::

    python3 -m venv /work/og-venv
    /work/og-venv/bin/pip install onnxruntime-genai==0.18.0    # pulls the onnxruntime it pins
    /work/og-venv/bin/pip install torch==2.13.0 transformers==5.24.0 onnx onnx-ir  # for its builder

    # 1. the GGUF's weights, dequantized to float32 by transformers, as a HF folder (tqedge venv)
    python benchmarks/peers.py hf-folder --gguf SmolLM2-135M-Instruct.Q4_1.gguf --out /tmp/og/hf
    # 2. onnxruntime-genai's model builder at its defaults for int4 on the CPU
    #    (MatMulNBits, block 32, accuracy level 4; GroupQueryAttention with a float32 KV cache)
    /work/og-venv/bin/python -m onnxruntime_genai.models.builder -i /tmp/og/hf -o /tmp/og/model \\
        -p int4 -e cpu -c /tmp/og/cache

``hf-folder`` raises ``max_position_embeddings`` to ``--max-positions`` (8,448 by default): the
builder sizes its RoPE cos/sin tables and genai's context limit from it, and an 8K-context
measurement decodes past SmolLM2's 8,192 (default RoPE: the values at each position are unchanged).
Then pass ``--og-python /work/og-venv/bin/python --og-model /tmp/og/model`` to vs_llamacpp.py.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

SIDE = "onnxruntime-genai"


def hf_folder(gguf: Path, out: Path, max_positions: int) -> None:
    """Write ``gguf``'s weights (dequantized by transformers) and tokenizer as a HF folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model.hf_quantizer = None  # weights are float32 already; transformers refuses to save "gguf-quantized"
    del model.config.quantization_config
    model.config.max_position_embeddings = max(max_positions, model.config.max_position_embeddings)
    model.save_pretrained(out)
    tok.save_pretrained(out)


def og_worker(args, timed_contexts, decode_steps: int, peak_rss_mib, ids_digest) -> dict:
    """onnxruntime-genai side, speed phase only (runs inside the genai venv).

    The same protocol as the llama.cpp worker: a new ``Generator`` per context (KV buffer of
    ``max(contexts) + decode_steps + 8`` tokens, as llama.cpp's ``n_ctx``), ``append_tokens`` of the
    ``c`` first ids (one prefill call, genai's default), then each of the next ids appended alone:
    one forward each, no sampling. CPU provider; ``intra_op_num_threads = --threads`` (inter-op 1)
    through the config's decoder session options; everything else at genai's defaults.
    """
    import onnxruntime_genai as og

    if args.phase != "speed":
        raise SystemExit(f"{SIDE} runs the speed phase only (perplexity is llama.cpp's and tqedge's)")
    og.disable_telemetry_events()
    cfg = og.Config(str(args.og_model))
    cfg.clear_providers()
    cfg.overlay(json.dumps({"model": {"decoder": {"session_options": {
        "intra_op_num_threads": args.threads, "inter_op_num_threads": 1}}}}))
    model = og.Model(cfg)
    text = Path(args.text).read_text(encoding="utf-8")
    ids = [int(i) for i in og.Tokenizer(model).encode(text[: max(args.contexts) * 8])]
    genai = json.loads((Path(args.og_model) / "genai_config.json").read_text())["model"]["decoder"]
    kv_bytes = 2 * genai["num_hidden_layers"] * genai["num_key_value_heads"] * genai["head_size"] * 4  # float32 KV
    state = {}

    def prefill(c):
        state.pop("gen", None)  # free the previous context's KV buffer first
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=max(args.contexts) + decode_steps + 8, batch_size=1)
        state["gen"] = og.Generator(model, params)
        state["gen"].append_tokens(ids[:c])

    out = {"side": SIDE, "kv": "fp32", "phase": "speed", "kv_bytes_per_token": kv_bytes,
           "og_version": og.__version__, "speed_ids": ids_digest(ids[: max(args.contexts) + decode_steps])}
    out.update(timed_contexts(prefill, lambda tok: state["gen"].append_tokens([tok]), ids, args.contexts))
    out["peak_rss_mib"] = peak_rss_mib()
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    hf = sub.add_parser("hf-folder", help="GGUF -> HF folder for onnxruntime-genai's builder (tqedge venv)")
    hf.add_argument("--gguf", type=Path, required=True)
    hf.add_argument("--out", type=Path, required=True)
    hf.add_argument("--max-positions", type=int, default=8448)
    args = ap.parse_args(argv)
    hf_folder(args.gguf, args.out, args.max_positions)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""SmolLM2-135M: the LiteRT backend against the ONNX backend on one bundle holding both graphs.

fp32 weights, exact cache: the same 32 greedy tokens on three prompts, last-position logits
within 1e-3 at every step. int8 (per-channel hybrid FULLY_CONNECTED): top-1 agreement with the
fp32 graph over 256 wikitext tokens (printed, asserted ≥ 90 %).
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("ai_edge_litert")
pytest.importorskip("onnx")

import tqedge.runtime.model as runtime_model  # noqa: E402
from tqedge.exporters.export import export  # noqa: E402

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,"]
STEPS = 32


@pytest.fixture(scope="module")
def bundles(smollm2_gguf, tmp_path_factory):
    """An fp32 bundle with both graphs and an int8 tflite-only bundle (``export --format``)."""
    root = tmp_path_factory.mktemp("smol")
    fp32, int8 = root / "fp32.tqe", root / "int8.tqe"
    export(smollm2_gguf, fp32, weights="fp32", formats="onnx,tflite")
    export(smollm2_gguf, int8, weights="int8", formats="tflite")
    return fp32, int8


def _greedy(model, ids, cache):
    logits = model.forward(ids, cache)  # (vocab,)
    toks, last = [], []
    for _ in range(STEPS):
        toks.append(int(logits.argmax()))
        last.append(logits)
        logits = model.forward([toks[-1]], cache)
    return toks, np.stack(last)  # (STEPS, vocab)


@pytest.mark.slow
def test_tflite_matches_onnx_greedy_exact_cache(bundles):
    fp32, _ = bundles
    onnx = runtime_model.load(fp32, backend="onnx", verify="none")
    lite = runtime_model.load(fp32, backend="tflite", verify="none")
    for prompt in PROMPTS:
        ids = onnx.encode(prompt)
        t_onnx, l_onnx = _greedy(onnx, ids, onnx.new_cache(kv_bits="exact", kv_budget="64MiB"))
        t_lite, l_lite = _greedy(lite, ids, lite.new_cache(kv_bits="exact", kv_budget="64MiB"))
        gap = np.abs(l_onnx - l_lite).max()
        print(f"{prompt!r}: max |logit gap| {gap:.2e}")
        assert t_lite == t_onnx, prompt
        assert gap < 1e-3, (prompt, gap)


@pytest.mark.slow
def test_tflite_matches_onnx_default_turboquant_cache(bundles):
    fp32, _ = bundles
    onnx = runtime_model.load(fp32, backend="onnx", verify="none")
    lite = runtime_model.load(fp32, backend="tflite", verify="none")
    ids = onnx.encode(PROMPTS[0])
    t_onnx, l_onnx = _greedy(onnx, ids, onnx.new_cache(kv_budget="64MiB"))
    t_lite, l_lite = _greedy(lite, ids, lite.new_cache(kv_budget="64MiB"))
    first = next((i for i, (a, b) in enumerate(zip(t_onnx, t_lite)) if a != b), None)
    print(f"TurboQuant cache: first divergence {first}, max |logit gap| {np.abs(l_onnx - l_lite).max():.2e}")
    assert first is None


@pytest.mark.slow
def test_int8_top1_agreement_on_wikitext(bundles, wikitext):
    fp32, int8 = bundles
    ref = runtime_model.load(fp32, backend="tflite", verify="none")
    q8 = runtime_model.load(int8, backend="tflite", verify="none")
    ids = ref.encode(wikitext[:4000])[:256]
    assert len(ids) == 256
    a = ref.forward(ids, ref.new_cache(kv_bits="exact", kv_budget="64MiB"), logits="all")  # (256, vocab)
    b = q8.forward(ids, q8.new_cache(kv_bits="exact", kv_budget="64MiB"), logits="all")
    agree = float((a.argmax(-1) == b.argmax(-1)).mean())
    print(f"int8 vs fp32 top-1 agreement over 256 wikitext tokens: {agree:.3f}")
    assert agree >= 0.9

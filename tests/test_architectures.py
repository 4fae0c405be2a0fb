"""More architectures on tiny random Hugging Face checkpoints built here with transformers (no
download): Qwen3 (QK-norm), Llama 3.x RoPE scaling, Qwen2.5 (q/k/v biases), Gemma 3 (QK-norm,
post-norms, GeGLU, scaled embeddings, sliding + global layers with their own RoPE bases, a query
scale that is not 1/sqrt(head_dim)). Each is exported through the HF-folder path and compared
with transformers on fp32 logits (≤ 1e-4), Gemma past its sliding window, in prefill and decode.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import tqedge  # noqa: E402
from test_export import VOCAB, tiny_tokenizer_json  # noqa: E402

ATOL = 1e-4
WINDOW = 16  # Gemma's sliding window here: the prompts run to 4x past it
COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-6, initializer_range=0.3,
              bos_token_id=1, eos_token_id=2)


def _qwen3():
    return transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**COMMON, head_dim=32))


def _llama3():
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16}
    cfg = transformers.LlamaConfig(**COMMON, rope_theta=500000.0, rope_scaling=scaling, tie_word_embeddings=True)
    return transformers.LlamaForCausalLM(cfg)


def _qwen25():
    m = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**COMMON, rope_theta=1e6, tie_word_embeddings=True))
    with torch.no_grad():  # random (not zero) q/k/v biases so they matter
        for layer in m.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.normal_(0, 0.3)
    return m


def _gemma3():
    cfg = transformers.Gemma3TextConfig(
        **{**COMMON, "num_hidden_layers": 3, "num_key_value_heads": 1}, head_dim=32, pad_token_id=0,
        sliding_window=WINDOW, query_pre_attn_scalar=24,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1e6},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}})
    return transformers.Gemma3ForCausalLM(cfg)


BUILDERS = {"qwen3": _qwen3, "llama3-rope": _llama3, "qwen2.5": _qwen25, "gemma3": _gemma3}


def build(folder: Path, kind: str) -> Path:
    torch.manual_seed(0)
    model = BUILDERS[kind]()
    with torch.no_grad():  # non-trivial norms (Gemma's are 1 + w: w around 0)
        for n, p in model.named_parameters():
            if "norm" in n:
                p.uniform_(-0.5, 0.5) if kind == "gemma3" else p.uniform_(0.5, 1.5)
    model.save_pretrained(folder, safe_serialization=True)
    (folder / "tokenizer.json").write_text(tiny_tokenizer_json())
    return folder


@pytest.fixture(scope="module", params=sorted(BUILDERS))
def tiny(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    src = build(root / "hf", request.param)
    manifest = tqedge.export(src, root / "bundle.tqe")
    ids = np.random.default_rng(1).integers(3, VOCAB, 4 * WINDOW).tolist()
    ref_model = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = ref_model(torch.tensor([ids])).logits[0].numpy()  # (T, V)
    assert ref.std() > 0.1  # not degenerate: a wrong graph would show
    return request.param, tqedge.load(root / "bundle.tqe"), manifest, ids, ref


def test_prefill_logits_match_transformers(tiny):
    _, model, _, ids, ref = tiny
    got = model.forward(ids, model.new_cache(kv_bits="exact", kv_budget="1MiB"), logits="all")
    np.testing.assert_allclose(got, ref, atol=ATOL, rtol=0)


def test_chunked_prefill_and_decode_match_transformers(tiny):
    """Chunks and single tokens cross the sliding window (Gemma): every step equals the
    full-sequence reference, so the local layers read exactly their window."""
    _, model, _, ids, ref = tiny
    cache = model.new_cache(kv_bits="exact", kv_budget="1MiB")
    got = [model.forward(ids[:5], cache, logits="all"), model.forward(ids[5:27], cache, logits="all")]
    got += [model.forward([t], cache)[None] for t in ids[27:]]
    np.testing.assert_allclose(np.concatenate(got), ref, atol=ATOL, rtol=0)
    assert cache.offset == len(ids)


def test_backend_choice(tiny):
    """The native session is the default where it runs: every family here, Gemma's sliding-window
    layers included (runtime/native_sliding.py), so the parity tests above ran it."""
    from tqedge.runtime.backends import runs

    kind, model, _, _, _ = tiny
    assert runs("native", model.manifest)
    assert model.backend_name == "native"


def test_manifest_records_the_architecture(tiny):
    kind, _, manifest, _, _ = tiny
    a = manifest.architecture
    assert a.name == {"qwen3": "qwen3", "llama3-rope": "llama", "qwen2.5": "qwen2", "gemma3": "gemma3"}[kind]
    assert a.qk_norm == (kind in ("qwen3", "gemma3"))
    assert a.attention_bias == (kind == "qwen2.5")
    if kind == "gemma3":
        assert (a.post_norms, a.hidden_act, a.sliding_window, a.rope_local_theta) == (True, "gelu_tanh", WINDOW, 1e4)
        assert a.embed_scale == pytest.approx(8.0) and a.query_pre_attn_scalar == 24
        assert [n.scale for n in manifest.graphs["onnx"].attention] == [pytest.approx(24 ** -0.5)] * 3
    if kind == "llama3-rope":
        assert a.rope_scaling["rope_type"] == "llama3"


def test_default_kv_bits_are_per_architecture(tiny):
    """An export that names no --kv-bits records the architecture's measured default: Gemma 3
    (head_dim 256, one KV head) needs 8-bit keys to stay within 1 % PPL, the others keep K4V3
    (docs/RESULTS.md)."""
    kind, _, manifest, _, _ = tiny
    want = (8.0, 4.0) if kind == "gemma3" else (4.0, 3.0)
    assert (manifest.kv.key_bits, manifest.kv.value_bits, manifest.kv.layer_bits) == (*want, None)


def test_explicit_kv_bits_override_the_architecture_default(tmp_path):
    src = build(tmp_path / "hf", "gemma3")
    m = tqedge.export(src, tmp_path / "g.tqe", kv_bits="K4V3+L1@K8V8")
    assert (m.kv.key_bits, m.kv.value_bits, m.kv.layer_bits) == (4.0, 3.0, {"1": [8.0, 8.0]})
    assert tqedge.load(tmp_path / "g.tqe").manifest.kv == m.kv


def test_tflite_is_refused_for_new_families(tmp_path):
    src = build(tmp_path / "hf", "qwen3")
    with pytest.raises(tqedge.TqedgeError, match="tflite graphs are not built for qwen3"):
        tqedge.export(src, tmp_path / "x.tqe", formats="onnx,tflite")
    assert not (tmp_path / "x.tqe").exists()


def test_gemma_config_refusals(tmp_path):
    src = build(tmp_path / "hf", "gemma3")
    cfg = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**cfg, "final_logit_softcapping": 30.0}))
    with pytest.raises(tqedge.TqedgeError, match="final_logit_softcapping"):
        tqedge.export(src, tmp_path / "x.tqe")

"""TFLite emitter + LiteRT backend on tiny random models, against transformers as the oracle.

The tiny models cover both architecture flavours the emitter handles: Llama (tied embeddings,
GQA, no biases) and Qwen2 (q/k/v biases, untied LM head). The graphs run through the real
backend with the exact cache; logits must match transformers' for prefill (in two chunks of
different length, so the dynamic first dimension is resized) and for decode steps.
"""

from __future__ import annotations

import math
import sys

import numpy as np
import pytest

pytest.importorskip("ai_edge_litert")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from flatbuffers import flexbuffers  # noqa: E402

from tqedge.bundle import ArchSpec, GraphSpec, Manifest, TokenizerSpec, WeightSpec  # noqa: E402
from tqedge.errors import TqedgeError  # noqa: E402
from tqedge.exporters.tflite_builder import ALIGN, schema  # noqa: E402
from tqedge.exporters.tflite_emitter import CUSTOM_OP, TFLITE_FILE, build_model  # noqa: E402
from tqedge.exporters.tflite_layers import WeightStore, quantize_per_channel  # noqa: E402
from tqedge.runtime.backends.litert import LiteRTBackend  # noqa: E402
from tqedge.runtime.cache import ExactKVCache  # noqa: E402
from test_memory import _resident_kib  # noqa: E402

VOCAB, HIDDEN, FFN, LAYERS, HEADS, KV_HEADS = 101, 64, 96, 2, 4, 2


LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16}


def _tiny(kind: str):
    """A random tiny HF model, its ArchSpec and its canonical (HF-named) float32 weights.
    ``kind``: "llama", "llama3rope" (Llama 3.1 rope scaling) or "qwen2"."""
    torch.manual_seed(0)
    scaling = LLAMA3_ROPE if kind == "llama3rope" else None
    kind = "llama" if kind == "llama3rope" else kind
    common = dict(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=LAYERS,
                  num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, rms_norm_eps=1e-5,
                  max_position_embeddings=512)
    theta = 10000.0 if kind == "llama" else 1e6
    if kind == "llama":
        cfg = transformers.LlamaConfig(rope_theta=theta, tie_word_embeddings=True, rope_scaling=scaling, **common)
        model = transformers.LlamaForCausalLM(cfg)
    else:
        cfg = transformers.Qwen2Config(rope_theta=theta, tie_word_embeddings=False, **common)
        model = transformers.Qwen2ForCausalLM(cfg)
    model.eval()
    with torch.no_grad():  # larger than the default init so logits are O(1); non-trivial norms, biases
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.08)
            elif "norm" in name:
                p.uniform_(0.5, 1.5)
            else:  # q/k/v biases (Qwen2)
                p.normal_(0.0, 0.3)
    arch = ArchSpec(name=kind, vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=FFN, num_layers=LAYERS,
                    num_heads=HEADS, num_kv_heads=KV_HEADS, head_dim=HIDDEN // HEADS, rms_norm_eps=1e-5,
                    rope_theta=theta, max_position_embeddings=512,
                    tie_word_embeddings=cfg.tie_word_embeddings, attention_bias=kind == "qwen2",
                    rope_scaling=scaling)
    weights = {k: v.detach().numpy().astype(np.float32) for k, v in model.state_dict().items()}
    if arch.tie_word_embeddings:
        weights.pop("lm_head.weight", None)
    return model, arch, weights


def _backend(tmp_path, arch, weights, fmt="fp32"):
    mb, graph = build_model(arch, weights, fmt)
    path = tmp_path / TFLITE_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    mb.write(path)
    manifest = Manifest(name="tiny", architecture=arch, tokenizer=TokenizerSpec(), weights=WeightSpec(fmt),
                        graphs={"tflite": graph})
    return LiteRTBackend(tmp_path, manifest, threads=1), path


def _run(backend, arch, ids, chunks):
    """Feed ``ids`` in chunks through the backend with an exact cache; logits for every position."""
    cache = ExactKVCache(arch.num_layers, arch.num_kv_heads, arch.head_dim, capacity=64)
    out = []
    for t in chunks:
        step = ids[cache.offset: cache.offset + t]
        cache.prepare(t)
        pos = np.arange(cache.offset, cache.offset + t)
        out.append(backend.forward(step, pos, np.arange(t), cache))  # (t, vocab)
        cache.commit()
    return np.concatenate(out)


def _buffer_bytes(path) -> int:
    """Bytes of constant data stored in a .tflite file."""
    m = schema.Model.GetRootAs(path.read_bytes(), 0)
    return sum(m.Buffers(b).Size() for b in range(m.BuffersLength()))


def _reference(model, ids):
    with torch.no_grad():
        return model(torch.tensor(ids)[None]).logits[0].numpy()  # (T, vocab)


@pytest.mark.parametrize("kind", ["llama", "llama3rope", "qwen2"])
def test_fp32_matches_transformers_prefill_and_decode(tmp_path, kind):
    model, arch, weights = _tiny(kind)
    backend, _ = _backend(tmp_path, arch, weights)
    ids = np.random.default_rng(1).integers(0, VOCAB, 40)
    got = _run(backend, arch, ids, [17, 19, 1, 1, 1, 1])  # two prefill chunks, 4 decode steps
    ref = _reference(model, ids)
    assert np.abs(ref).max() > 0.5
    np.testing.assert_allclose(got, ref, atol=2e-4, rtol=0)


def test_logits_index_selects_rows(tmp_path):
    model, arch, weights = _tiny("llama")
    backend, _ = _backend(tmp_path, arch, weights)
    ids = np.random.default_rng(2).integers(0, VOCAB, 6)
    cache = ExactKVCache(arch.num_layers, arch.num_kv_heads, arch.head_dim, capacity=16)
    cache.prepare(6)
    got = backend.forward(ids, np.arange(6), np.array([5, 2]), cache)  # (2, vocab)
    ref = _reference(model, ids)
    np.testing.assert_allclose(got, ref[[5, 2]], atol=2e-4, rtol=0)


def _round_matrices(model, fn) -> None:
    """Replace every weight matrix of ``model`` by ``fn(w)`` (the storage rounding, in float)."""
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.copy_(torch.from_numpy(fn(p.numpy())))


def _int8_rows(w: np.ndarray) -> np.ndarray:
    s = np.abs(w).max(axis=1, keepdims=True) / 127.0
    return (np.round(w / s) * s).astype(np.float32)


def test_fp16_matches_transformers_with_fp16_rounded_weights(tmp_path):
    model, arch, weights = _tiny("llama")
    backend, path = _backend(tmp_path, arch, weights, "fp16")
    assert _buffer_bytes(path) < 0.55 * sum(w.nbytes for w in weights.values())
    _round_matrices(model, lambda w: w.astype(np.float16).astype(np.float32))
    ids = np.random.default_rng(5).integers(0, VOCAB, 10)
    got = _run(backend, arch, ids, [8, 1, 1])
    np.testing.assert_allclose(got, _reference(model, ids), atol=2e-4, rtol=0)


def test_int8_close_to_dequantized_reference(tmp_path):
    model, arch, weights = _tiny("qwen2")
    backend, path = _backend(tmp_path, arch, weights, "int8")
    assert _buffer_bytes(path) < 0.3 * sum(w.nbytes for w in weights.values())
    _round_matrices(model, _int8_rows)  # oracle: int8-per-row weights, float activations
    ids = np.random.default_rng(3).integers(0, VOCAB, 12)
    got = _run(backend, arch, ids, [9, 1, 1, 1])
    ref = _reference(model, ids)
    # hybrid kernels also quantize activations per row: close, not bit-exact
    err = np.abs(got - ref).max() / np.abs(ref).max()
    assert err < 0.03, err
    assert (got.argmax(-1) == ref.argmax(-1)).mean() >= 0.9


def test_quantize_per_channel_error_bound():
    w = np.random.default_rng(4).standard_normal((16, 40)).astype(np.float32)
    w[3] = 0.0
    q, scale = quantize_per_channel(w)
    assert q.dtype == np.int8 and scale.shape == (16,)
    assert (np.abs(q.astype(int)).max(axis=1)[np.arange(16) != 3] == 127).all()
    assert np.all(np.abs(q * scale[:, None] - w) <= scale[:, None] / 2 + 1e-7)


def test_file_layout_custom_ops_and_shared_aligned_buffers(tmp_path):
    _, arch, weights = _tiny("llama")
    _, path = _backend(tmp_path, arch, weights)
    data = path.read_bytes()
    m = schema.Model.GetRootAs(data, 0)
    # every constant lives outside the flatbuffer at a 64-byte aligned offset
    for b in range(1, m.BuffersLength()):
        buf = m.Buffers(b)
        assert buf.Offset() % ALIGN == 0 and buf.Offset() + buf.Size() <= len(data)
    # weights are stored once although the whole graph and the segments all use them
    weight_bytes = sum(w.nbytes for w in weights.values())
    assert len(data) < 1.1 * weight_bytes + 200_000
    whole = m.Subgraphs(0)
    customs = []
    for i in range(whole.OperatorsLength()):
        op = whole.Operators(i)
        code = m.OperatorCodes(op.OpcodeIndex())
        if code.BuiltinCode() == schema.BuiltinOperator.CUSTOM:
            assert code.CustomCode().decode() == CUSTOM_OP
            customs.append(flexbuffers.Loads(op.CustomOptionsAsNumpy().tobytes()))
    assert [c["layer"] for c in customs] == list(range(LAYERS))
    assert customs[0]["num_heads"] == HEADS and customs[0]["num_kv_heads"] == KV_HEADS
    assert customs[0]["head_dim"] == HIDDEN // HEADS
    assert math.isclose(customs[0]["scale"], 1 / math.sqrt(HIDDEN // HEADS), rel_tol=1e-6)
    keys = sorted(m.SignatureDefs(i).SignatureKey().decode() for i in range(m.SignatureDefsLength()))
    assert keys == [f"segment_{i:03d}" for i in range(LAYERS + 1)]


def test_unsupported_weight_format_is_refused():
    with pytest.raises(TqedgeError, match="int4"):
        WeightStore({}, "int4")


def test_backend_refuses_graph_without_its_signatures(tmp_path):
    _, arch, weights = _tiny("llama")
    _backend(tmp_path, arch, weights)
    g = GraphSpec(segments=["segment_000", "nope"], attention=[], file=TFLITE_FILE)
    manifest = Manifest(name="tiny", architecture=arch, tokenizer=TokenizerSpec(), weights=WeightSpec(),
                        graphs={"tflite": g})
    with pytest.raises(TqedgeError, match="nope"):
        LiteRTBackend(tmp_path, manifest)


def test_two_threads_share_one_backend(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    model, arch, weights = _tiny("llama")
    backend, _ = _backend(tmp_path, arch, weights)
    rng = np.random.default_rng(6)
    seqs = [rng.integers(0, VOCAB, 9) for _ in range(4)]
    with ThreadPoolExecutor(2) as pool:
        got = list(pool.map(lambda ids: _run(backend, arch, ids, [5, 1, 1, 1, 1]), seqs))
    for ids, g in zip(seqs, got):
        np.testing.assert_allclose(g, _reference(model, ids), atol=2e-4, rtol=0)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="madvise on /proc/self/maps mappings")
def test_mapped_weights_released_after_first_step_and_results_unchanged(tmp_path):
    model, arch, weights = _tiny("llama")
    backend, path = _backend(tmp_path, arch, weights)
    ids = np.random.default_rng(7).integers(0, VOCAB, 8)
    first = _run(backend, arch, ids, [8])  # the first step releases the mapping after it
    assert backend._released
    with open("/proc/self/maps") as f:
        assert str(path.resolve()) in f.read()  # still mapped, no longer resident
    assert _resident_kib(str(path.resolve())) * 1024 < path.stat().st_size // 10
    again = _run(backend, arch, ids, [8])  # pages fault back in from the file
    np.testing.assert_array_equal(first, again)
    np.testing.assert_allclose(again, _reference(model, ids), atol=2e-4, rtol=0)


def test_cli_export_both_formats_and_run_each(tmp_path):
    """``tqedge export --format onnx,tflite``: one bundle, both graphs agree with transformers."""
    from click.testing import CliRunner
    from test_export import build_tiny_hf, hf_logits

    from tqedge.cli import cli
    from tqedge.runtime.model import load

    src = build_tiny_hf(tmp_path / "hf", "qwen2")
    out = tmp_path / "both.tqe"
    r = CliRunner().invoke(cli, ["export", str(src), "-o", str(out), "--format", "onnx,tflite"])
    assert r.exit_code == 0, r.output
    ids = np.random.default_rng(8).integers(3, 96, 9).tolist()
    ref = hf_logits(src, ids)  # (T, vocab)
    for backend in ("onnx", "tflite"):
        model = load(out, backend=backend)  # full SHA-256 verification, tflite file included
        got = model.forward(ids, model.new_cache(kv_bits="exact", kv_budget="1MiB"), logits="all")
        np.testing.assert_allclose(got, ref, atol=3e-4, rtol=0, err_msg=backend)
    r = CliRunner().invoke(cli, ["export", str(src), "-o", str(tmp_path / "x.tqe"), "--format", "tflite",
                                 "--weights", "int4"])
    assert r.exit_code != 0 and "int4" in r.output and not (tmp_path / "x.tqe").exists()
    r = CliRunner().invoke(cli, ["export", str(src), "-o", str(tmp_path / "y.tqe"), "--format", "onnx,coreml"])
    assert r.exit_code != 0 and "coreml" in r.output and not (tmp_path / "y.tqe").exists()


def test_batched_rows_of_several_sequences_match_transformers(tmp_path):
    """Row concatenation (runtime/batch.py) on LiteRT: three sequences in one forward per step,
    prompts of different lengths then one decode row each; every sequence's logits match
    transformers run on that sequence alone."""
    from tqedge.runtime.batch import BatchView

    model, arch, weights = _tiny("llama")
    backend, _ = _backend(tmp_path, arch, weights)
    rng = np.random.default_rng(3)
    seqs = [rng.integers(0, VOCAB, n) for n in (9, 4, 13)]
    caches = [ExactKVCache(arch.num_layers, arch.num_kv_heads, arch.head_dim, capacity=32) for _ in seqs]
    got = [[] for _ in seqs]
    for lo, hi in ((0, -1), (-1, None)):  # all but the last token of each, then the last token
        parts = [s[lo:hi] if hi else s[lo:] for s in seqs]
        view = BatchView(caches, [len(p) for p in parts])
        pos = np.concatenate([np.arange(c.offset, c.offset + len(p)) for c, p in zip(caches, parts)])
        view.prepare(view.rows)
        out = backend.forward(np.concatenate(parts), pos, np.arange(view.rows), view)  # (T, vocab)
        view.commit()
        for i, (a, b, _) in enumerate(view.parts):
            got[i].append(out[a:b])
    for s, g in zip(seqs, got):
        np.testing.assert_allclose(np.concatenate(g), _reference(model, s), atol=2e-4, rtol=0)

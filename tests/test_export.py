"""Exporter on tiny Hugging Face checkpoints the tests create with transformers, checked against
transformers (torch) running the same weights; bad input; the CLI.

The tiny builders (``build_tiny_hf``, ``build_tiny_gguf``) are reused by test_onnx_backend.py.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import tqedge  # noqa: E402
from tqedge.bundle import EMBED_QUANTIZED, HEAD_FORMATS  # noqa: E402
from tqedge.errors import TqedgeError  # noqa: E402

VOCAB = 96
WORDS = ["hello", "world", "the", "cat", "sat", "on", "mat", "a", "dog", "ran"]


def tiny_tokenizer_json() -> str:
    """A word-level tokenizer over a few words (ids < VOCAB)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return tok.to_str()


def build_tiny_hf(folder: Path, kind: str = "llama", dtype=None, seed: int = 0, **overrides) -> Path:
    """Save a random tiny LlamaForCausalLM / Qwen2ForCausalLM with a tokenizer.json into ``folder``."""
    torch.manual_seed(seed)
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  rms_norm_eps=1e-5, initializer_range=0.3, bos_token_id=1, eos_token_id=2)
    common.update(overrides)
    if kind == "llama":
        cfg = transformers.LlamaConfig(**common)
        model = transformers.LlamaForCausalLM(cfg)
    else:
        cfg = transformers.Qwen2Config(**common)
        model = transformers.Qwen2ForCausalLM(cfg)
        with torch.no_grad():  # random (not zero) q/k/v biases so they matter
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_(0, 0.3)
    with torch.no_grad():  # non-trivial norms
        for n, p in model.named_parameters():
            if "norm" in n:
                p.uniform_(0.5, 1.5)
    if dtype is not None:
        model = model.to(dtype)
    model.save_pretrained(folder, safe_serialization=True)
    (folder / "tokenizer.json").write_text(tiny_tokenizer_json())
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": True,
         "chat_template": "{% for m in messages %}{{ m['content'] }}{% endfor %}"}))
    return folder


def hf_logits(folder: Path, ids: list[int]) -> np.ndarray:
    """Full-sequence float32 logits (T, vocab) from transformers."""
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    model.eval()
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()


def _prompt(n: int, seed: int = 1) -> list[int]:
    return np.random.default_rng(seed).integers(3, VOCAB, n).tolist()


CASES = {
    "llama": ("llama", None, {}),
    "llama-tied-llama3rope": ("llama", None, {"tie_word_embeddings": True, "rope_scaling": {
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16}}),
    "llama-bf16": ("llama", "bf16", {}),
    "qwen2": ("qwen2", None, {}),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def tiny(request, tmp_path_factory):
    kind, dt, over = CASES[request.param]
    root = tmp_path_factory.mktemp(request.param)
    src = build_tiny_hf(root / "hf", kind, dtype=torch.bfloat16 if dt else None, **over)
    manifest = tqedge.export(src, root / "bundle.tqe")
    return src, root / "bundle.tqe", manifest


def test_prefill_parity_with_transformers(tiny):
    src, bundle, _ = tiny
    ids = _prompt(64)
    ref = hf_logits(src, ids)
    assert ref[-1].std() > 0.1  # the model is not degenerate, so a wrong graph would show
    model = tqedge.load(bundle)
    got = model.forward(ids, model.new_cache(kv_bits="exact", kv_budget="1MiB"))
    np.testing.assert_allclose(got, ref[-1], atol=1e-3, rtol=0)


def test_multistep_parity_with_transformers(tiny):
    src, bundle, _ = tiny
    ids = _prompt(48, seed=2)
    ref = hf_logits(src, ids)
    model = tqedge.load(bundle)
    cache = model.new_cache(kv_bits="exact", kv_budget="1MiB")
    got = [model.forward(ids[:40], cache)]
    for t in ids[40:]:
        got.append(model.forward([t], cache))
    np.testing.assert_allclose(np.stack(got[:-1]), ref[39:47], atol=1e-3, rtol=0)
    np.testing.assert_allclose(got[-1], ref[47], atol=1e-3, rtol=0)
    assert cache.offset == 48


def test_manifest_records_model(tiny):
    src, bundle, manifest = tiny
    cfg = json.loads((src / "config.json").read_text())
    a = manifest.architecture
    assert (a.num_layers, a.num_heads, a.num_kv_heads, a.hidden_size) == (2, 4, 2, 64)
    assert a.name == {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2"}[cfg["architectures"][0]]
    assert a.attention_bias == (a.name == "qwen2")
    assert a.tie_word_embeddings == bool(cfg.get("tie_word_embeddings"))
    t = manifest.tokenizer
    assert (t.bos_token_id, t.eos_token_ids, t.add_bos_token) == (1, [2], True)
    assert t.chat_template.startswith("{% for m in messages")
    model = tqedge.load(bundle)
    assert model.encode("the cat sat") == [1, 5, 6, 7]


def _degrade(w: np.ndarray, fmt: str) -> np.ndarray:
    """The weight the graph should effectively use: fp16-rounded, or block-quantized and
    dequantized (w ≈ scale*q + min) — the graph must then match transformers exactly on it."""
    from tqedge.exporters.weights import BLOCK_SIZES, quantize_blocks

    if fmt == "fp16":
        return w.astype(np.float16).astype(np.float32)
    qb = quantize_blocks(w, {"int8": 8, "int4": 4}[fmt], BLOCK_SIZES[fmt])
    deq = qb.q.astype(np.float32) * np.repeat(qb.scale, qb.block, 1) + np.repeat(qb.min, qb.block, 1)
    return deq[:, : w.shape[1]]


@pytest.mark.parametrize("fmt", ["fp16", "int8", "int4"])
def test_weight_formats_compute_on_their_weights(tmp_path, fmt, monkeypatch):
    from tqedge.exporters import weights

    # float activations (accuracy_level 0) so the graph must equal the dequantized weights;
    # level 4 (int8 activations, the default) is covered by the SmolLM2 agreement test
    monkeypatch.setattr(weights, "ACCURACY_LEVELS", {"int8": 0, "int4": 0})
    src = build_tiny_hf(tmp_path / "hf", "llama")
    ids = _prompt(64, seed=3)
    model_ref = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    clean = model_ref(torch.tensor([ids])).logits[0].detach().numpy()
    with torch.no_grad():
        for name, p in model_ref.named_parameters():
            if name.endswith("proj.weight"):
                p.copy_(torch.from_numpy(_degrade(p.numpy(), fmt)))
            elif name == "lm_head.weight":
                p.copy_(torch.from_numpy(_degrade(p.numpy(), HEAD_FORMATS[fmt])))
            elif name == "model.embed_tokens.weight" and fmt in EMBED_QUANTIZED:  # int rows
                p.copy_(torch.from_numpy(_degrade(p.numpy(), EMBED_QUANTIZED[fmt])))
            elif name == "model.embed_tokens.weight" and fmt != "fp32":
                p.copy_(torch.from_numpy(p.numpy().astype(np.float16).astype(np.float32)))
        ref = model_ref(torch.tensor([ids])).logits[0].numpy()
    tqedge.export(src, tmp_path / f"{fmt}.tqe", weights=fmt)
    model = tqedge.load(tmp_path / f"{fmt}.tqe")
    got = model.forward(ids, model.new_cache(kv_bits="exact", kv_budget="1MiB"), logits="all")
    np.testing.assert_allclose(got, ref, atol=2e-3, rtol=0)
    assert np.abs(ref - clean).max() > 1e-3  # the format really changed the weights


GRAPHS = ["segments", "native", "native-offsets"]  # native: LinearQ4_1; native-offsets: MatMulNBits + AddBlockOffsets


def _graph_kind(kind, monkeypatch):
    import tqedge.exporters.weights as weights

    monkeypatch.setattr(weights, "NATIVE_Q4_1_LINEARS", kind == "native")
    return kind != "segments"


def _native_ops(lib):
    from tqedge.runtime import native_linear, native_offsets

    return [native_offsets.make_op(lib), native_linear.make_op(lib)]


@pytest.mark.parametrize("level", [0, 4])
@pytest.mark.parametrize("kind", GRAPHS)
def test_carried_over_q4_1_blocks_are_exact(tmp_path, level, kind, monkeypatch):
    """GGUF Q4_1 blocks (w = d*q + m, float16 d and m) vs NumPy: in a cut segment MatMulNBits +
    block-sum offset (ReduceSum, Cast, MatMul; two linears on one input share the block sums); in
    the uncut graph one LinearQ4_1 node on the blocks themselves, or (NATIVE_Q4_1_LINEARS off)
    MatMulNBits + the AddBlockOffsets op, run through the C API with the native ops."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    from tqedge.exporters.onnx_emitter import GraphBuilder
    from tqedge.exporters.spec import QuantBlocks
    from tqedge.exporters.weights import LINEAR_FORMATS, LinearArgs, WeightStore
    from tqedge.runtime import ort_capi

    native = _graph_kind(kind, monkeypatch)
    rng = np.random.default_rng(0)
    n, k = 48, 96
    qb = QuantBlocks(bits=4, block=32, q=rng.integers(0, 16, (n, k)).astype(np.uint8),
                     scale=rng.uniform(0.01, 0.1, (n, k // 32)).astype(np.float16).astype(np.float32),
                     min=rng.uniform(-0.5, 0.3, (n, k // 32)).astype(np.float16).astype(np.float32))
    qb.scale[0, 0] = 0.0  # a constant block
    w = qb.q * np.repeat(qb.scale, 32, 1) + np.repeat(qb.min, 32, 1)
    store = WeightStore(tmp_path / "weights.bin", "weights.bin")
    g = GraphBuilder(store, native=native)
    import tqedge.exporters.weights as weights

    monkeypatch.setitem(weights.ACCURACY_LEVELS, "int4", level)
    y = LINEAR_FORMATS["int4"](g, LinearArgs(name="lin", x="x", w=w, weight_key="w", quant=qb))
    # a second linear reading the same input (as k after q) shares its block sums
    qb2 = QuantBlocks(bits=4, block=32, q=qb.q[::-1].copy(), scale=qb.scale[::-1].copy(), min=-qb.min[::-1])
    w2 = qb2.q * np.repeat(qb2.scale, 32, 1) + np.repeat(qb2.min, 32, 1)
    y2 = LINEAR_FORMATS["int4"](g, LinearArgs(name="lin2", x="x", w=w2, weight_key="w2", quant=qb2))
    store.close()
    ops = [n.op_type for n in g.nodes]
    if kind == "native":
        assert ops == ["LinearQ4_1"] * 2
    elif native:
        assert ops == ["MatMulNBits", "AddBlockOffsets"] * 2
    else:
        assert ops.count("ReduceSum") == 1 and ops.count("MatMul") == 2
    model = helper.make_model(
        helper.make_graph(g.nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["T", k])],
                          [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in (y, y2)],
                          list(g.inits.values())),
        opset_imports=[helper.make_opsetid("", 23), helper.make_opsetid("com.microsoft", 1),
                       helper.make_opsetid("ai.tqedge", 1)], ir_version=10)
    (tmp_path / "m.onnx").write_bytes(model.SerializeToString())
    x = rng.standard_normal((5, k)).astype(np.float32)
    if native:
        lib = ort_capi.OrtLib()
        sess = ort_capi.Session(lib, tmp_path / "m.onnx", _native_ops(lib), threads=1)
        try:
            got = sess.run({"x": x}, [y, y2])
        finally:
            sess.close()
    else:
        got = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    for out, weight in zip(got, (w, w2)):
        ref = x @ weight.T
        # level 4 and LinearQ4_1 quantize x to int8 per block
        tol = 1e-4 if level == 0 and kind != "native" else 0.02 * np.abs(ref).max()
        np.testing.assert_allclose(out, ref, atol=tol, rtol=0)


def _q4_1(rng, n, k):
    from tqedge.exporters.spec import QuantBlocks

    qb = QuantBlocks(bits=4, block=32, q=rng.integers(0, 16, (n, k)).astype(np.uint8),
                     scale=rng.uniform(0.01, 0.1, (n, k // 32)).astype(np.float16).astype(np.float32),
                     min=rng.uniform(-0.5, 0.3, (n, k // 32)).astype(np.float16).astype(np.float32))
    return qb.q * np.repeat(qb.scale, 32, 1) + np.repeat(qb.min, 32, 1), qb


def _run_graph(tmp_path, g, k, outs, x, native):
    from onnx import TensorProto, helper

    from tqedge.runtime import ort_capi

    model = helper.make_model(
        helper.make_graph(g.nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["T", k])],
                          [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outs],
                          list(g.inits.values())),
        opset_imports=[helper.make_opsetid("", 23), helper.make_opsetid("com.microsoft", 1),
                       helper.make_opsetid("ai.tqedge", 1)], ir_version=10)
    path = tmp_path / f"m{len(list(tmp_path.glob('m*.onnx')))}.onnx"
    path.write_bytes(model.SerializeToString())
    lib = ort_capi.OrtLib()
    sess = ort_capi.Session(lib, path, _native_ops(lib) if native else [], threads=1)
    try:
        return sess.run({"x": x}, outs)
    finally:
        sess.close()


@pytest.mark.parametrize("kind", GRAPHS)
def test_fused_linears_equal_the_separate_ones(tmp_path, kind, monkeypatch):
    """q/k/v (and gate/up) read one input: the exporter concatenates their weights into one
    MatMulNBits (+ one AddBlockOffsets for Q4_1 blocks), or one LinearQ4_1 in the uncut graph, and
    splits the output back. Every output
    column is computed as before, so the parts' outputs equal the separate linears' bit for bit;
    a bias on some parts only is added with zeros for the others; parts whose blocks differ in
    kind (one carried over, one not) stay separate."""
    from types import SimpleNamespace

    from tqedge.exporters.onnx_emitter import GraphBuilder, LayerEmitter
    from tqedge.exporters.weights import WeightStore

    native = _graph_kind(kind, monkeypatch)
    rng = np.random.default_rng(3)
    k = 96
    parts = {f"{p}.weight": _q4_1(rng, n, k) for p, n in (("q", 64), ("k", 32), ("v", 32))}
    spec = SimpleNamespace(arch=None, weights={key: w for key, (w, _) in parts.items()},
                           quant={key: qb for key, (_, qb) in parts.items()})
    spec.weights["k.bias"] = rng.standard_normal(32).astype(np.float32)
    x = rng.standard_normal((5, k)).astype(np.float32)
    store = WeightStore(tmp_path / "weights.bin", "weights.bin")
    fused, separate = GraphBuilder(store, native=native), GraphBuilder(store, native=native)
    em = LayerEmitter(spec, "int4")
    names = [(f"{p}_out", f"{p}.weight") for p in "qkv"]
    outs = em.linears(fused, "x", "qkv_proj", "qkv.weight", names)
    ref = [em.linear(separate, "x", n + "_sep", key, bias=key.replace("weight", "bias")) for n, key in names]
    store.close()
    ops = [n.op_type for n in fused.nodes]
    # one Add for the bias; the segments add the Q4_1 block sums with an Add of their own
    linear = "LinearQ4_1" if kind == "native" else "MatMulNBits"
    assert ops.count(linear) == 1 and ops.count("Split") == 1 and ops.count("Add") == (1 if native else 2)
    assert ops.count("AddBlockOffsets") == (1 if kind == "native-offsets" else 0)
    got, want = _run_graph(tmp_path, fused, k, outs, x, native), _run_graph(tmp_path, separate, k, ref, x, native)
    for a, b in zip(got, want):
        np.testing.assert_array_equal(a, b)
    k_ref = x @ parts["k.weight"][0].T + spec.weights["k.bias"]
    np.testing.assert_allclose(got[1], k_ref, atol=0.02 * np.abs(k_ref).max())

    spec.quant.pop("v.weight")  # v re-quantized by the exporter, q and k carried over: no shared node
    em = LayerEmitter(spec, "int4")
    mixed = GraphBuilder(WeightStore(tmp_path / "w2.bin", "w2.bin"), native=native)
    em.linears(mixed, "x", "qkv_proj", "qkv.weight", names)
    ops = [n.op_type for n in mixed.nodes]
    assert ops.count("MatMulNBits") + ops.count("LinearQ4_1") == 3 and "Split" not in ops


@pytest.mark.parametrize("level", [0, 4])
def test_carried_over_q8_0_blocks_are_exact(tmp_path, level, monkeypatch):
    """GGUF Q8_0 blocks (w = d*q, q int8; parsed as gguf-py dequantizes them) → MatMulNBits bits 8
    in the file's blocks of 32, unsigned codes with zero point 128, no offsets: vs NumPy."""
    import gguf
    import onnxruntime as ort
    from onnx import TensorProto, helper

    import tqedge.exporters.weights as weights
    from tqedge.exporters.onnx_emitter import GraphBuilder
    from tqedge.exporters.sources.gguf import _q8_0_blocks
    from tqedge.exporters.weights import LINEAR_FORMATS, LinearArgs, WeightStore

    rng = np.random.default_rng(0)
    n, k = 40, 128
    blocks = np.zeros((n, k // 32, 34), np.uint8)
    blocks[..., :2] = rng.uniform(0.001, 0.02, (n, k // 32, 1)).astype(np.float16).view(np.uint8)
    blocks[..., 2:] = rng.integers(-128, 128, (n, k // 32, 32)).astype(np.int8).view(np.uint8)
    blocks[0, 0, :2] = np.zeros(1, np.float16).view(np.uint8)  # a block of zeros
    raw = blocks.reshape(n, -1)
    qb = _q8_0_blocks(raw, n, k)
    w = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType.Q8_0).reshape(n, k)
    assert np.array_equal(qb.q * np.repeat(qb.scale, 32, 1) + np.repeat(qb.min, 32, 1), w)
    store = WeightStore(tmp_path / "weights.bin", "weights.bin")
    g = GraphBuilder(store, native=True)
    monkeypatch.setitem(weights.ACCURACY_LEVELS, "int8", level)
    y = LINEAR_FORMATS["int8"](g, LinearArgs(name="lin", x="x", w=w, weight_key="w", quant=qb))
    store.close()
    (node,) = g.nodes
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    assert node.op_type == "MatMulNBits" and attrs["block_size"] == 32 and attrs["bits"] == 8
    model = helper.make_model(
        helper.make_graph(g.nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["T", k])],
                          [helper.make_tensor_value_info(y, TensorProto.FLOAT, None)], list(g.inits.values())),
        opset_imports=[helper.make_opsetid("", 23), helper.make_opsetid("com.microsoft", 1)], ir_version=10)
    (tmp_path / "m.onnx").write_bytes(model.SerializeToString())
    x = rng.standard_normal((5, k)).astype(np.float32)
    (got,) = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    ref = x @ w.T
    np.testing.assert_allclose(got, ref, atol=1e-5 if level == 0 else 0.01 * np.abs(ref).max(), rtol=0)


def test_carried_over_minimums_must_be_halves(tmp_path):
    """Only a GGUF's float16 minimums are carried over: a float32 one is refused, not rounded."""
    from tqedge.exporters.onnx_emitter import GraphBuilder
    from tqedge.exporters.spec import QuantBlocks
    from tqedge.exporters.weights import LINEAR_FORMATS, LinearArgs, WeightStore

    qb = QuantBlocks(bits=4, block=32, q=np.zeros((4, 32), np.uint8), scale=np.ones((4, 1), np.float32),
                     min=np.full((4, 1), 0.1, np.float32))  # 0.1 is no half
    store = WeightStore(tmp_path / "weights.bin", "weights.bin")
    try:
        with pytest.raises(ValueError, match="not float16 values"):
            LINEAR_FORMATS["int4"](GraphBuilder(store), LinearArgs(name="lin", x="x", w=np.zeros((4, 32), np.float32),
                                                                   weight_key="w", quant=qb))
    finally:
        store.close()


def test_block_quantizer_error_bound():
    from tqedge.exporters.weights import quantize_blocks

    w = np.random.default_rng(0).standard_normal((8, 80)).astype(np.float32)  # 80: padded to 96
    for bits in (4, 8):
        qb = quantize_blocks(w, bits, 32)
        assert qb.q.shape == (8, 96) and qb.q.max() < 2**bits
        scale = np.repeat(qb.scale, 32, 1)
        deq = qb.q * scale + np.repeat(qb.min, 32, 1)
        assert np.all(np.abs(deq[:, :80] - w) <= scale[:, :80] / 2 + 1e-6)


# -- bad input ---------------------------------------------------------------------------
def _assert_clean(err: TqedgeError, out: Path, *words: str) -> None:
    msg = str(err)
    assert "\n" not in msg
    for w in words:
        assert w in msg, msg
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")]


def test_unknown_architecture(tmp_path):
    src = build_tiny_hf(tmp_path / "hf")
    cfg = json.loads((src / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (src / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(TqedgeError) as e:
        tqedge.export(src, tmp_path / "out.tqe")
    _assert_clean(e.value, tmp_path / "out.tqe", "unsupported architecture", "GPT2LMHeadModel")


def _rewrite(src: Path, edit) -> None:
    from safetensors.numpy import load_file, save_file

    f = next(src.glob("*.safetensors"))
    tensors = load_file(f)
    edit(tensors)
    save_file(tensors, f)


def test_missing_tensor(tmp_path):
    src = build_tiny_hf(tmp_path / "hf")
    _rewrite(src, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(TqedgeError) as e:
        tqedge.export(src, tmp_path / "out.tqe")
    _assert_clean(e.value, tmp_path / "out.tqe", "missing tensor model.layers.1.mlp.up_proj.weight")


def test_wrong_shape(tmp_path):
    src = build_tiny_hf(tmp_path / "hf")
    _rewrite(src, lambda t: t.update({"model.layers.0.self_attn.k_proj.weight": np.zeros((16, 64), np.float32)}))
    with pytest.raises(TqedgeError) as e:
        tqedge.export(src, tmp_path / "out.tqe")
    _assert_clean(e.value, tmp_path / "out.tqe", "model.layers.0.self_attn.k_proj.weight", "(16, 64)", "(32, 64)")


def test_truncated_safetensors(tmp_path):
    src = build_tiny_hf(tmp_path / "hf")
    f = next(src.glob("*.safetensors"))
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(TqedgeError) as e:
        tqedge.export(src, tmp_path / "out.tqe")
    _assert_clean(e.value, tmp_path / "out.tqe", "truncated")


def build_tiny_gguf(path: Path, arch: str = "llama", drop: str | None = None) -> Path:
    """A tiny F32 GGUF (1 layer) written with gguf.GGUFWriter, llama.cpp tensor names."""
    import gguf

    rng = np.random.default_rng(0)
    h, f, heads, kv, d = 32, 48, 2, 1, 16
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(1)
    w.add_context_length(128)
    w.add_embedding_length(h)
    w.add_feed_forward_length(f)
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_rope_dimension_count(d)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    tokens = ["a", "b", "c", "ab", "<|end|>"] + [f"t{i}" for i in range(VOCAB - 5)]
    w.add_token_list(tokens)
    w.add_token_types([1, 1, 1, 1, 3] + [1] * (VOCAB - 5))
    w.add_token_merges(["a b"])
    w.add_eos_token_id(4)
    shapes = {"token_embd.weight": (VOCAB, h), "output_norm.weight": (h,), "blk.0.attn_norm.weight": (h,),
              "blk.0.attn_q.weight": (heads * d, h), "blk.0.attn_k.weight": (kv * d, h),
              "blk.0.attn_v.weight": (kv * d, h), "blk.0.attn_output.weight": (h, heads * d),
              "blk.0.ffn_norm.weight": (h,), "blk.0.ffn_gate.weight": (f, h), "blk.0.ffn_up.weight": (f, h),
              "blk.0.ffn_down.weight": (h, f)}
    for name, shape in shapes.items():
        if name != drop:
            w.add_tensor(name, rng.standard_normal(shape).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_tiny_gguf_exports_and_runs(tmp_path):
    src = build_tiny_gguf(tmp_path / "tiny.gguf")
    m = tqedge.export(src, tmp_path / "out.tqe")
    assert m.architecture.tie_word_embeddings and m.weights.source == "gguf:F32"
    model = tqedge.load(tmp_path / "out.tqe")
    assert model.encode("ab<|end|>") == [3, 4]  # BPE merge and the control token kept whole
    logits = model.forward([0, 1, 2], model.new_cache(kv_bits="exact", kv_budget="1MiB"))
    assert logits.shape == (VOCAB,) and np.isfinite(logits).all()


def test_gguf_inside_a_wheel(tmp_path):
    import zipfile

    gguf_file = build_tiny_gguf(tmp_path / "tiny.gguf")
    whl = tmp_path / "llm_tiny-0.1-py3-none-any.whl"
    with zipfile.ZipFile(whl, "w") as z:
        z.write(gguf_file, "llm_tiny/tiny.gguf")
        z.writestr("llm_tiny/__init__.py", "")
    m = tqedge.export(whl, tmp_path / "whl.tqe")
    assert m.source["file"] == whl.name and m.architecture.num_layers == 1
    empty = tmp_path / "empty-0.1-py3-none-any.whl"
    with zipfile.ZipFile(empty, "w") as z:
        z.writestr("empty/__init__.py", "")
    with pytest.raises(TqedgeError) as e:
        tqedge.export(empty, tmp_path / "empty.tqe")
    _assert_clean(e.value, tmp_path / "empty.tqe", "contains no .gguf")


def test_gguf_unknown_architecture(tmp_path):
    src = build_tiny_gguf(tmp_path / "tiny.gguf", arch="gpt2")
    with pytest.raises(TqedgeError) as e:
        tqedge.export(src, tmp_path / "out.tqe")
    _assert_clean(e.value, tmp_path / "out.tqe", "unsupported GGUF architecture 'gpt2'")


def test_gguf_truncated(tmp_path):
    src = build_tiny_gguf(tmp_path / "tiny.gguf")
    data = src.read_bytes()
    for cut in (len(data) - 1000, 200):  # inside the tensor data, inside the metadata
        src.write_bytes(data[:cut])
        with pytest.raises(TqedgeError) as e:
            tqedge.export(src, tmp_path / "out.tqe")
        _assert_clean(e.value, tmp_path / "out.tqe", "tiny.gguf")


def test_gguf_missing_tensor(tmp_path):
    src = build_tiny_gguf(tmp_path / "tiny.gguf", drop="blk.0.ffn_up.weight")
    with pytest.raises(TqedgeError) as e:
        tqedge.export(src, tmp_path / "out.tqe")
    _assert_clean(e.value, tmp_path / "out.tqe", "missing tensor model.layers.0.mlp.up_proj.weight")


def test_existing_output_needs_overwrite(tmp_path):
    src = build_tiny_gguf(tmp_path / "tiny.gguf")
    tqedge.export(src, tmp_path / "out.tqe")
    with pytest.raises(TqedgeError, match="output exists"):
        tqedge.export(src, tmp_path / "out.tqe")
    tqedge.export(src, tmp_path / "out.tqe", weights="int8", overwrite=True)
    assert tqedge.load(tmp_path / "out.tqe").manifest.weights.format == "int8"


# -- CLI -----------------------------------------------------------------------------------
def test_cli_export_and_inspect(tmp_path):
    from click.testing import CliRunner

    from tqedge.cli import cli

    src = build_tiny_gguf(tmp_path / "tiny.gguf")
    out = tmp_path / "cli.tqe"
    r = CliRunner().invoke(cli, ["export", str(src), "-o", str(out), "--weights", "int4", "--kv-bits", "3,2"])
    assert r.exit_code == 0, r.output
    assert "parameters" in r.output and "KV / token" in r.output
    m = tqedge.load(out).manifest
    assert (m.weights.format, m.kv.key_bits, m.kv.value_bits) == ("int4", 3.0, 2.0)
    r = CliRunner().invoke(cli, ["inspect", str(out), "--verify"])
    assert r.exit_code == 0 and "weights.bin" in r.output and "verified" in r.output
    r = CliRunner().invoke(cli, ["export", str(src), "-o", str(out)])
    assert r.exit_code == 2 and "output exists" in r.output
    shutil.rmtree(out)
    r = CliRunner().invoke(cli, ["export", str(src), "-o", str(out), "--kv-bits", "9,9"])
    assert r.exit_code == 2 and "kv bits" in r.output and not out.exists()


def test_export_records_per_layer_kv_bits(tmp_path):
    """A per-layer spec lands in the manifest and the bundle's default cache follows it."""
    from click.testing import CliRunner

    from tqedge.cli import cli

    src = build_tiny_gguf(tmp_path / "tiny.gguf")
    out = tmp_path / "layers.tqe"
    r = CliRunner().invoke(cli, ["export", str(src), "-o", str(out), "--kv-bits", "K4V3+L0@K2V2"])
    assert r.exit_code == 0, r.output
    model = tqedge.load(out)  # the tiny GGUF has one layer
    assert (model.manifest.kv.key_bits, model.manifest.kv.layer_bits) == (4.0, {"0": [2.0, 2.0]})
    cache = model.new_cache(kv_budget="1MiB")
    low = model.new_cache(kv_bits="2,2", kv_budget="1MiB")
    base = model.new_cache(kv_bits="4,3", kv_budget="1MiB")
    assert cache.k_codes[0].shape == low.k_codes[0].shape != base.k_codes[0].shape
    r = CliRunner().invoke(cli, ["inspect", str(out)])
    assert r.exit_code == 0 and "layers 0 at K2V2" in r.output, r.output
    r = CliRunner().invoke(cli, ["export", str(src), "-o", str(tmp_path / "bad.tqe"), "--kv-bits", "K4V3+L99@K2V2"])
    assert r.exit_code == 2 and "layer 99" in r.output and not (tmp_path / "bad.tqe").exists()


# -- output directory, killed exports, broken sources (issue 12) -----------------------------
def _unwritable_outputs(tmp_path: Path) -> list[Path]:
    """Outputs that cannot be created, whoever runs the tests (root ignores permission bits)."""
    (tmp_path / "a-file").write_text("x")
    outs = [tmp_path / "a-file" / "out.tqe", tmp_path / "a-file" / "deeper" / "out.tqe"]
    if Path("/sys/kernel").is_dir():  # a read-only file system, for root too
        outs.append(Path("/sys/tqedge-test/out.tqe"))
    if os.geteuid() != 0:
        ro = tmp_path / "read-only"
        ro.mkdir()
        ro.chmod(0o500)
        outs.append(ro / "out.tqe")
    return outs


def test_unwritable_output_is_refused_before_parsing(tmp_path, monkeypatch):
    import tqedge.exporters.export as E

    src = build_tiny_gguf(tmp_path / "tiny.gguf")
    parsed = []
    monkeypatch.setattr(E, "load_source", lambda p: parsed.append(p))
    for out in _unwritable_outputs(tmp_path):
        with pytest.raises(TqedgeError) as e:
            tqedge.export(src, out)
        msg = str(e.value)
        assert msg.startswith(f"cannot write {out}") and "\n" not in msg and not out.exists()
    assert parsed == []  # refused before reading the model
    assert sorted(p.name for p in tmp_path.iterdir()) in (["a-file", "tiny.gguf"],
                                                           ["a-file", "read-only", "tiny.gguf"])


_KILLED_EXPORT = """
import os, signal, sys
from tqedge.files import atomic_directory
with atomic_directory(sys.argv[1]) as tmp:
    (tmp / "weights.bin").write_bytes(b"half of a bundle")
    os.kill(os.getpid(), signal.SIGKILL)
"""


def test_a_killed_exports_partial_is_removed_by_the_next_export(tmp_path):
    import subprocess
    import sys

    out = tmp_path / "out.tqe"
    p = subprocess.Popen([sys.executable, "-c", _KILLED_EXPORT, str(out)])
    assert p.wait(120) == -9
    (stale,) = [q for q in tmp_path.iterdir() if q.name.endswith(".partial")]
    assert stale.name.startswith(f".out.tqe.{p.pid}.") and (stale / "weights.bin").is_file()
    # a concurrent export (its process alive) keeps its partial
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        running = tmp_path / f".out.tqe.{live.pid}.abcd1234.partial"
        running.mkdir()
        tqedge.export(build_tiny_gguf(tmp_path / "tiny.gguf"), out)
        assert not stale.exists() and running.is_dir()
    finally:
        live.kill()
        live.wait()
    assert tqedge.load(out).manifest.architecture.num_layers == 1
    tqedge.export(tmp_path / "tiny.gguf", out, overwrite=True)  # its process is gone now
    assert sorted(q.name for q in tmp_path.iterdir()) == ["out.tqe", "tiny.gguf"]


@pytest.mark.parametrize("kind", ["truncated-1MiB", "truncated-header", "empty", "random", "text"])
def test_broken_gguf_is_one_line_naming_the_file(tmp_path, kind, smollm2_gguf_or_tiny):
    cut = min(1 << 20, smollm2_gguf_or_tiny.stat().st_size // 2)  # 1 MiB of the real model
    with open(smollm2_gguf_or_tiny, "rb") as f:
        data = f.read(cut)
    src = tmp_path / "model.gguf"
    src.write_bytes({"truncated-1MiB": data, "truncated-header": data[:64], "empty": b"",
                     "random": np.random.default_rng(0).bytes(50_000), "text": b"GGUF is a format\n"}[kind])
    before = src.read_bytes()
    with pytest.raises(TqedgeError) as e:
        tqedge.export(src, tmp_path / "out.tqe")
    words = {"empty": ["model.gguf", "empty"], "random": ["model.gguf", "not a GGUF file"]}.get(
        kind, ["model.gguf", "truncated or corrupt"])
    _assert_clean(e.value, tmp_path / "out.tqe", *words)
    assert "out of bounds" not in str(e.value) and src.read_bytes() == before


@pytest.fixture(scope="module")
def smollm2_gguf_or_tiny(tmp_path_factory):
    """The real GGUF when present (its 1 MiB prefix is the reported case), else a tiny one
    (cut in half)."""
    from conftest import _find_gguf

    p = _find_gguf()
    if p is not None:
        return p
    return build_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf")


@pytest.mark.parametrize("config, words", [
    ({"model_type": "gpt2"}, ["unsupported architecture 'gpt2'", "LlamaForCausalLM"]),
    ({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}, ["unsupported architecture 'GPT2LMHeadModel'"]),
    ({}, ["unsupported architecture None"]),
    ({"model_type": "llama"}, ["config.json is missing 'num_attention_heads'"]),
    ({"architectures": ["LlamaForCausalLM"], "num_attention_heads": "four"}, ["config.json has a malformed value"]),
    ([1, 2], ["config.json: top level is not an object"]),
])
def test_bad_hf_config_is_one_line(tmp_path, config, words):
    src = tmp_path / "hf"
    src.mkdir()
    (src / "config.json").write_text(json.dumps(config))
    with pytest.raises(TqedgeError) as e:
        tqedge.export(src, tmp_path / "out.tqe")
    _assert_clean(e.value, tmp_path / "out.tqe", *words)


def test_hf_folder_without_tokenizer(tmp_path):
    src = build_tiny_hf(tmp_path / "hf")
    (src / "tokenizer.json").unlink()
    with pytest.raises(TqedgeError) as e:
        tqedge.export(src, tmp_path / "out.tqe")
    _assert_clean(e.value, tmp_path / "out.tqe", "tokenizer.json is missing")

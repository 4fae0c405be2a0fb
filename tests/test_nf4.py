"""NF4 weights (``--weights nf4`` / ``nf4-dq``): the code table against the published
NormalFloat values, the double-quantized scales, onnxruntime's MatMulBnb4 against NumPy, tiny
exports against transformers on the same dequantized weights, and a real SmolLM2 export."""

from __future__ import annotations

import numpy as np
import pytest

from tqedge.errors import TqedgeError

# The 16 NormalFloat-4 values as published with QLoRA (Dettmers et al. 2023, appendix E;
# bitsandbytes ``get_4bit_type("nf4")``) — the oracle, written out independently of the code.
PUBLISHED_NF4 = [
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
]


def oracle_nf4(w: np.ndarray, block: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Brute-force NF4: per flat block of ``block``, absmax, nearest published value (codes, absmax)."""
    table = np.array(PUBLISHED_NF4, np.float64)
    flat = w.reshape(-1).astype(np.float64)
    nb = -(-flat.size // block)
    codes = np.empty(flat.size, np.int64)
    absmax = np.empty(nb)
    for b in range(nb):
        x = flat[b * block:(b + 1) * block]
        absmax[b] = np.abs(x).max()
        codes[b * block:(b + 1) * block] = np.abs(x[:, None] / absmax[b] - table[None]).argmin(1)
    return codes, absmax


def oracle_dequant(codes: np.ndarray, absmax: np.ndarray, shape, block: int = 64) -> np.ndarray:
    return (np.array(PUBLISHED_NF4)[codes] * np.repeat(absmax, block)[: codes.size]).reshape(shape)


def _unpack(packed: np.ndarray, n: int) -> np.ndarray:
    return np.stack([packed >> 4, packed & 0xF], 1).reshape(-1)[:n].astype(np.int64)


@pytest.mark.parametrize("shape", [(48, 128), (37, 100)])  # the second: blocks straddle rows, odd count
def test_nf4_encode_decode_matches_the_published_table(shape):
    from tqedge.exporters.weights import dequantize_nf4, quantize_nf4

    w = np.random.default_rng(0).standard_normal(shape).astype(np.float32) * 0.05
    w[0, :5] = 0.0
    packed, absmax = quantize_nf4(w)
    codes, ref_absmax = oracle_nf4(w)
    n = w.size
    assert packed.shape == ((n + 1) // 2,) and absmax.shape == (-(-n // 64),)
    np.testing.assert_allclose(absmax, ref_absmax, rtol=1e-6)
    np.testing.assert_array_equal(_unpack(packed, n), codes)
    np.testing.assert_allclose(dequantize_nf4(packed, absmax, shape), oracle_dequant(codes, ref_absmax, shape),
                               rtol=1e-6, atol=1e-9)
    # quantization error is bounded by half the widest gap of the table, per block
    err = np.abs(dequantize_nf4(packed, absmax, shape) - w).reshape(-1)
    gap = np.diff(PUBLISHED_NF4).max() / 2
    assert (err <= gap * np.repeat(absmax, 64)[:n] + 1e-7).all()


def test_double_quantized_scales_round_trip(tmp_path):
    from tqedge.runtime import dq_scales

    rng = np.random.default_rng(1)
    absmax = rng.lognormal(-3, 0.5, 1000).astype(np.float32)  # like real absmax: positive, skewed
    absmax[7] = 0.0  # an all-zero block stays exactly zero
    codes, scales = dq_scales.encode(absmax)
    assert codes.dtype == np.uint8 and scales.shape == (4, 2) and codes.shape == absmax.shape
    back = dq_scales.expand(codes, scales)
    assert back[7] == 0.0
    # log-domain 8-bit code: relative error ≤ exp(step/2) - 1 with step = log-span / 254 per 256 values
    nz = absmax > 0
    for b in range(4):
        blk = slice(256 * b, 256 * (b + 1))
        a, r, m = absmax[blk], back[blk], nz[blk]
        step = np.log(a[m].max() / a[m].min()) / 254
        assert (np.abs(r[m] / a[m] - 1) <= np.expm1(step / 2) * (1 + 1e-4) + 1e-6).all()
    assert np.abs(back[nz] / absmax[nz] - 1).max() < 0.01
    # the side file: per-segment expansion, names and values preserved
    other = rng.uniform(0.1, 0.2, 300).astype(np.float32)
    dq_scales.write(tmp_path / "s.npz", {"a.absmax": (3, absmax), "b.absmax": (5, other)})
    got = dq_scales.read(tmp_path / "s.npz")
    assert sorted(got) == [3, 5] and list(got[3]) == ["a.absmax"]
    np.testing.assert_array_equal(got[3]["a.absmax"], back)
    np.testing.assert_allclose(got[5]["b.absmax"], other, rtol=0.01)
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(TqedgeError, match="double-quantized scales"):
        dq_scales.read(tmp_path / "bad.npz")


@pytest.mark.parametrize("fmt", ["nf4", "nf4-dq"])
def test_matmul_bnb4_matches_numpy(tmp_path, fmt):
    """One emitted linear run by onnxruntime's MatMulBnb4 vs x @ dequant(W).T from the oracle."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    from tqedge.exporters.onnx_emitter import GraphBuilder
    from tqedge.exporters.weights import LINEAR_FORMATS, LinearArgs, WeightStore
    from tqedge.runtime import dq_scales

    rng = np.random.default_rng(2)
    n, k = 40, 100  # 4000 weights = 62.5 blocks: the last block is partial, blocks straddle rows
    w = (rng.standard_normal((n, k)) * 0.1).astype(np.float32)
    store = WeightStore(tmp_path / "weights.bin", "weights.bin")
    g = GraphBuilder(store)
    y = LINEAR_FORMATS[fmt](g, LinearArgs(name="lin", x="x", w=w, weight_key="w"))
    store.mark_segment(0, g.inits)
    store.close()
    graph = helper.make_graph(g.nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["T", k])],
                              [helper.make_tensor_value_info(y, TensorProto.FLOAT, ["T", n])],
                              initializer=list(g.inits.values()))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)],
                              ir_version=10)
    (tmp_path / "m.onnx").write_bytes(model.SerializeToString())
    assert [nd.op_type for nd in g.nodes] == ["MatMulBnb4"]
    codes, absmax = oracle_nf4(w)
    so = ort.SessionOptions()
    if fmt == "nf4-dq":
        with pytest.raises(Exception):  # a placeholder never runs unexpanded
            ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
        (expanded,) = dq_scales.read(tmp_path / dq_scales.DQ_FILE).values()
        absmax = expanded["w.nf4.absmax"].astype(np.float64)
        so.add_external_initializers(list(expanded), [ort.OrtValue.ortvalue_from_numpy(a) for a in expanded.values()])
    sess = ort.InferenceSession(str(tmp_path / "m.onnx"), so, providers=["CPUExecutionProvider"])
    x = rng.standard_normal((5, k)).astype(np.float32)
    got = sess.run(None, {"x": x})[0]
    np.testing.assert_allclose(got, x @ oracle_dequant(codes, absmax, (n, k)).T, atol=1e-4, rtol=1e-4)
    assert np.abs(got - x @ w.T).max() > 1e-4  # it really is the quantized weight


@pytest.mark.parametrize("fmt", ["nf4", "nf4-dq"])
def test_tiny_nf4_export_equals_transformers_on_dequantized_weights(tmp_path, fmt, monkeypatch):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from test_export import _degrade, _prompt, build_tiny_hf

    import tqedge
    from tqedge.bundle import EMBED_QUANTIZED, HEAD_FORMATS
    from tqedge.exporters.weights import quantize_blocks
    from tqedge.exporters import weights
    from tqedge.runtime import dq_scales

    # float activations in the int8 head (accuracy_level 0), so the graph must equal the weights
    monkeypatch.setattr(weights, "ACCURACY_LEVELS", {"int8": 0, "int4": 0})
    src = build_tiny_hf(tmp_path / "hf", "llama")
    tqedge.export(src, tmp_path / "b.tqe", weights=fmt)
    ref = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, p in ref.named_parameters():
            w = p.numpy()
            if name.endswith("proj.weight"):
                codes, absmax = oracle_nf4(w)
                if fmt == "nf4-dq":
                    absmax = dq_scales.expand(*dq_scales.encode(absmax.astype(np.float32))).astype(np.float64)
                p.copy_(torch.from_numpy(oracle_dequant(codes, absmax, w.shape).astype(np.float32)))
            elif name == "lm_head.weight":  # int8 head (HEAD_FORMATS)
                qb = quantize_blocks(w, 8, 16)
                assert HEAD_FORMATS[fmt] == "int8"
                deq = qb.q * np.repeat(qb.scale, 16, 1) + np.repeat(qb.min, 16, 1)
                p.copy_(torch.from_numpy(deq[:, : w.shape[1]].astype(np.float32)))
            elif name == "model.embed_tokens.weight":  # int8 rows, like the head (EMBED_QUANTIZED)
                assert EMBED_QUANTIZED[fmt] == "int8"
                p.copy_(torch.from_numpy(_degrade(w, "int8")))
        ids = _prompt(48, seed=4)
        want = ref(torch.tensor([ids])).logits[0].numpy()
    model = tqedge.load(tmp_path / "b.tqe")
    got = model.forward(ids, model.new_cache(kv_bits="exact", kv_budget="1MiB"), logits="all")
    np.testing.assert_allclose(got, want, atol=2e-3, rtol=0)
    m = model.manifest
    assert m.weights.format == fmt and m.weights.block_size == 64
    assert (m.weights.scales is not None) == (fmt == "nf4-dq")


def test_tflite_refuses_nf4(tmp_path):
    import tqedge

    with pytest.raises(TqedgeError, match="tflite graphs support"):
        tqedge.export(tmp_path / "missing", tmp_path / "o.tqe", weights="nf4", formats="tflite")


def test_smollm2_nf4_dq_exports_loads_and_answers(smollm2_gguf, tmp_path):
    import tqedge

    m = tqedge.export(smollm2_gguf, tmp_path / "s.tqe", weights="nf4-dq")
    files = m.files
    assert files["onnx/absmax-dq.npz"].bytes < 2.5e6  # 8-bit absmax: ~1.7 MB for 106 M NF4 weights
    assert files["onnx/weights.bin"].bytes < 100 * 2**20  # the embedding gathers the int8 head's bytes
    model = tqedge.load(tmp_path / "s.tqe", verify="size")
    text = model.generate("The capital of France is", max_tokens=8, temperature=0)
    assert "Paris" in text


def test_plan_sizes_nf4_formats():
    """tqedge plan: NF4 = 4 bits + an fp32 absmax per 64 weights (nf4-dq on disk: an 8-bit code
    + 8 B per 256 absmax), an int8 LM head, and resident the fp32 workspace of the largest weight."""
    from tqedge.bundle import ArchSpec
    from tqedge.runtime import footprint

    a = ArchSpec(name="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30,
                 num_heads=9, num_kv_heads=3, head_dim=64, rms_norm_eps=1e-5, rope_theta=1e5,
                 max_position_embeddings=8192, tie_word_embeddings=True)
    per_layer = [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)]
    n_weights = 30 * sum(n * k for n, k in per_layer)
    blocks = 30 * sum(n * k // 64 for n, k in per_layer)
    # the int8 head and the embedding rows gathered from it are int4's (exporters/weights.py)
    def rest(resident):
        int4 = footprint.WEIGHT_FORMATS["int4"]["resident" if resident else "disk"]
        return footprint.weight_bytes(a, "int4", resident=resident) - 30 * sum(int4(n, k) for n, k in per_layer)

    assert footprint.weight_bytes(a, "nf4", resident=False) == n_weights // 2 + 4 * blocks + rest(False)
    dq = 30 * sum(n * k // 64 + 8 * -(-(n * k // 64) // 256) for n, k in per_layer)
    assert footprint.weight_bytes(a, "nf4-dq", resident=False) == n_weights // 2 + dq + rest(False)
    assert footprint.weight_bytes(a, "nf4") == footprint.weight_bytes(a, "nf4-dq") == n_weights // 2 + 4 * blocks + rest(True) + 4 * 1536 * 576
    saved = footprint.weight_bytes(a, "nf4", resident=False) - footprint.weight_bytes(a, "nf4-dq", resident=False)
    assert 4.5e6 < saved < 5.5e6  # ~5 MB of absmax saved on disk for SmolLM2

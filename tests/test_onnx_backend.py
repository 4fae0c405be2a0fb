"""ONNX bundle layout and backend: the segment protocol, the uncut model.onnx, the shared
weights.bin, and the runtime's import hygiene."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
pytest.importorskip("torch")

import tqedge  # noqa: E402
from tqedge.errors import TqedgeError  # noqa: E402

from test_export import VOCAB, build_tiny_hf  # noqa: E402


@pytest.fixture(scope="module", params=["fp32", "int4"])
def bundle(request, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp(f"onnx-{request.param}")
    src = build_tiny_hf(root / "hf", "qwen2", num_hidden_layers=3)
    tqedge.export(src, root / "b.tqe", weights=request.param)
    return root / "b.tqe"


def test_segments_follow_the_protocol(bundle):
    model = tqedge.load(bundle, backend="onnx")
    g, be = model.manifest.graphs["onnx"], model.backend
    assert len(g.segments) == 4 and [n.layer for n in g.attention] == [0, 1, 2]
    available = {"input_ids", "positions", "logits_index"}
    for s, (ins, outs) in enumerate(zip(be.inputs, be.outputs)):
        assert set(ins) <= available, f"segment {s} reads {set(ins) - available}"
        available |= set(outs)
        if s < 3:
            n = g.attention[s]
            assert (n.q, n.k, n.v, n.out) == tuple(f"layers.{s}.attn.{x}" for x in ("q", "k", "v", "out"))
            assert {n.q, n.k, n.v} <= set(outs)
            available.add(n.out)
    assert be.outputs[-1] == ["logits"]
    a = model.manifest.architecture
    sess = be.sessions[1]
    shapes = {i.name: i.shape for i in sess.get_outputs()}
    assert shapes["layers.1.attn.q"] == ["T", a.num_heads, a.head_dim]
    assert shapes["layers.1.attn.k"] == ["T", a.num_kv_heads, a.head_dim]


def test_logits_index_rows(bundle):
    model = tqedge.load(bundle)
    ids = np.random.default_rng(0).integers(3, VOCAB, 10)
    all_rows = model.forward(ids, model.new_cache(kv_bits="exact", kv_budget="1MiB"), logits="all")
    last = model.forward(ids, model.new_cache(kv_bits="exact", kv_budget="1MiB"))
    assert all_rows.shape == (10, VOCAB)
    np.testing.assert_allclose(all_rows[-1], last, atol=1e-5)


def test_weights_bin_is_shared_and_aligned(bundle):
    data = bundle / "onnx" / "weights.bin"
    size = data.stat().st_size
    files = sorted((bundle / "onnx").glob("*.onnx"))
    spans = {}
    for f in files:
        m = onnx.load(f, load_external_data=False)
        for t in m.graph.initializer:
            if t.data_location == onnx.TensorProto.EXTERNAL:
                info = {e.key: e.value for e in t.external_data}
                assert info["location"] == "weights.bin"
                off, n = int(info["offset"]), int(info["length"])
                assert off % 64 == 0 and off + n <= size
                assert spans.setdefault(t.name, (off, n)) == (off, n)  # one name, one place
    assert sum(n for _, n in spans.values()) <= size < sum(n for _, n in spans.values()) + 64 * len(spans)
    assert sum(f.stat().st_size for f in files) < 0.1 * size + 200_000


def test_model_onnx_is_the_uncut_graph(bundle):
    """Replace each TurboQuantAttention node of model.onnx with standard ONNX causal Attention
    (opset 23, GQA) and run the whole graph in onnxruntime: it must give the segmented logits."""
    import onnxruntime as ort
    from onnx import helper

    model = tqedge.load(bundle)
    a = model.manifest.architecture
    m = onnx.load(bundle / "onnx" / "model.onnx", load_external_data=False)
    customs = [n for n in m.graph.node if n.op_type == "TurboQuantAttention"]
    assert [n.domain for n in customs] == ["ai.tqedge"] * a.num_layers
    attrs = {a_.name: helper.get_attribute_value(a_) for a_ in customs[1].attribute}
    assert attrs["layer"] == 1 and attrs["num_heads"] == a.num_heads and attrs["num_kv_heads"] == a.num_kv_heads
    assert attrs["head_dim"] == a.head_dim and attrs["scale"] == pytest.approx(a.head_dim ** -0.5)
    assert sum(n.op_type == "RotaryQKV" for n in m.graph.node) == a.num_layers  # split + RoPE as one op
    nodes = []
    for n in m.graph.node:
        if n.op_type == "RotaryQKV":
            nodes += _standard_spelling(n, a)
            continue
        if n.op_type != "TurboQuantAttention":
            nodes.append(n)
            continue
        q, k, v, desc = n.input
        assert desc == "kv_desc"  # the cache descriptor (runtime/kv_descriptor.py); unused by standard Attention
        p = n.name
        nodes += [helper.make_node("Transpose", [x], [f"{p}.{x}.t"], perm=[1, 0, 2]) for x in (q, k, v)]
        nodes += [helper.make_node("Unsqueeze", [f"{p}.{x}.t", "zero_axis"], [f"{p}.{x}.4d"]) for x in (q, k, v)]
        nodes.append(helper.make_node("Attention", [f"{p}.{q}.4d", f"{p}.{k}.4d", f"{p}.{v}.4d"], [f"{p}.o4"],
                                      is_causal=1, scale=attrs["scale"]))
        nodes.append(helper.make_node("Squeeze", [f"{p}.o4", "zero_axis"], [f"{p}.o3"]))
        nodes.append(helper.make_node("Transpose", [f"{p}.o3"], [n.output[0]], perm=[1, 0, 2]))
    del m.graph.node[:]
    m.graph.node.extend(nodes)
    m.graph.initializer.append(onnx.numpy_helper.from_array(np.array([0], np.int64), "zero_axis"))
    half = a.head_dim // 2
    for name, values in (("rope_split", [half, half]), ("heads_q", [-1, a.num_heads, a.head_dim]),
                         ("heads_kv", [-1, a.num_kv_heads, a.head_dim]),
                         ("qkv_split", [a.num_heads * a.head_dim] + [a.num_kv_heads * a.head_dim] * 2)):
        m.graph.initializer.append(onnx.numpy_helper.from_array(np.array(values, np.int64), name))
    inputs = [i for i in m.graph.input if i.name != "kv_desc"]
    del m.graph.input[:]
    m.graph.input.extend(inputs)
    keep = [o for o in m.opset_import if o.domain != "ai.tqedge"]
    del m.opset_import[:]
    m.opset_import.extend(keep)
    path = bundle / "onnx" / "standard_attention.onnx"
    onnx.save(m, path)
    try:
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        ids = np.random.default_rng(1).integers(3, VOCAB, 12).astype(np.int64)
        (whole,) = sess.run(["logits"], {"input_ids": ids, "positions": np.arange(12), "logits_index": np.arange(12)})
    finally:
        path.unlink()
    seg = model.forward(ids, model.new_cache(kv_bits="exact", kv_budget="1MiB"), logits="all")
    np.testing.assert_allclose(whole, seg, atol=1e-4, rtol=0)


def _standard_spelling(n, a) -> list:
    """A RotaryQKV node (docs/FORMAT.md) as the standard ONNX nodes it stands for."""
    from onnx import helper

    p, mk = n.name, helper.make_node
    qkv, cos, sin = n.input
    parts = [f"{p}.{x}" for x in "qkv"]
    out = [mk("Split", [qkv, "qkv_split"], parts, axis=-1)]
    for x, part, shape, dst in zip("qkv", parts, ("heads_q", "heads_kv", "heads_kv"), n.output):
        if x == "v":
            out.append(mk("Reshape", [part, shape], [dst]))
            continue
        h = f"{part}.h"
        out += [mk("Reshape", [part, shape], [h]), mk("Split", [h, "rope_split"], [f"{h}.1", f"{h}.2"], axis=-1),
                mk("Neg", [f"{h}.2"], [f"{h}.n"]), mk("Concat", [f"{h}.n", f"{h}.1"], [f"{h}.rot"], axis=-1),
                mk("Mul", [h, cos], [f"{h}.c"]), mk("Mul", [f"{h}.rot", sin], [f"{h}.s"]),
                mk("Add", [f"{h}.c", f"{h}.s"], [dst])]
    return out


def test_runtime_does_not_import_exporter_packages(bundle):
    code = (
        "import sys, numpy as np, tqedge\n"
        f"m = tqedge.load({str(bundle)!r})\n"
        "m.forward([3, 4, 5], m.new_cache(kv_bits='exact', kv_budget='1MiB'))\n"
        "bad = sorted({n.split('.')[0] for n in sys.modules} & {'onnx', 'gguf', 'safetensors', 'torch', 'transformers'})\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_missing_segment_is_a_clear_error(tmp_path):
    src = build_tiny_hf(tmp_path / "hf", "llama")
    tqedge.export(src, tmp_path / "b.tqe")
    (tmp_path / "b.tqe" / "onnx" / "segment_001.onnx").unlink()
    with pytest.raises(TqedgeError, match="segment_001.onnx"):
        tqedge.load(tmp_path / "b.tqe", verify="none", backend="onnx")
    with pytest.raises(TqedgeError, match="segment_001.onnx"):
        tqedge.load(tmp_path / "b.tqe")
    (tmp_path / "b.tqe" / "onnx" / "model.onnx").unlink()  # what the native backend runs
    with pytest.raises(TqedgeError, match="model.onnx"):
        tqedge.load(tmp_path / "b.tqe", verify="none", backend="native")


def test_threads_option(bundle):
    model = tqedge.load(bundle, threads=1)
    ids = [3, 4, 5, 6]
    a = model.forward(ids, model.new_cache(kv_bits="exact", kv_budget="1MiB"))
    b = tqedge.load(bundle).forward(ids, model.new_cache(kv_bits="exact", kv_budget="1MiB"))
    np.testing.assert_allclose(a, b, atol=1e-5)

"""RotaryQKV: a layer's q/k/v split and RoPE as one native op (tqedge/codec/kernels_rope.py,
runtime/native_rope.py).

The kernel bit for bit against the standard ops' float32 spelling and, to float32 accuracy,
against the rotation written from the spec in float64 (HF rotate-half: pairs j and j + D/2 turned
by each position's angle); the op in a session, bad shapes included. The exporter's use of it
(model.onnx expanded back into standard ops against the segments) is tested in
tests/test_onnx_backend.py, SmolLM2's int4 graph in tests/test_parity_smollm2.py."""

from __future__ import annotations

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
pytest.importorskip("numba")

from tqedge.codec.kernels_rope import rope_qkv  # noqa: E402
from tqedge.errors import TqedgeError  # noqa: E402
from tqedge.runtime import native_rope, ort_capi  # noqa: E402


def _tables(rng, t, d):
    ang = rng.uniform(0, 100, (t, d // 2)).astype(np.float32)
    emb = np.concatenate([ang, ang], -1)
    return np.cos(emb).astype(np.float32), np.sin(emb).astype(np.float32)


def _rope_f32(x, cos, sin):
    """The standard ops' spelling in float32: x*cos + concat(-x2, x1)*sin (two products, one sum)."""
    half = x.shape[-1] // 2
    rot = np.concatenate([-x[..., half:], x[..., :half]], -1)
    return (x * cos[:, None, :]) + (rot * sin[:, None, :])


def _split(qkv, hq, hkv, d):
    t = qkv.shape[0]
    return (qkv[:, :hq * d].reshape(t, hq, d), qkv[:, hq * d:(hq + hkv) * d].reshape(t, hkv, d),
            qkv[:, (hq + hkv) * d:].reshape(t, hkv, d))



@pytest.mark.parametrize("t,hq,hkv,d", [(1, 9, 3, 64), (5, 4, 1, 256), (3, 2, 2, 8)])
def test_rope_kernel_gives_the_standard_spelling_bits(t, hq, hkv, d):
    rng = np.random.default_rng(d)
    qkv = rng.standard_normal((t, (hq + 2 * hkv) * d)).astype(np.float32) * 3
    cos, sin = _tables(rng, t, d)
    q, k, v = (np.full((t, h, d), np.nan, np.float32) for h in (hq, hkv, hkv))
    rope_qkv(qkv, cos, sin, q, k, v)
    Q, K, V = _split(qkv, hq, hkv, d)
    np.testing.assert_array_equal(q, _rope_f32(Q, cos, sin))
    np.testing.assert_array_equal(k, _rope_f32(K, cos, sin))
    np.testing.assert_array_equal(v, V)
    # and the rotation itself, in float64 from the angles (rotate-half pairs j and j + D/2)
    ang = np.arctan2(sin[:, : d // 2].astype(np.float64), cos[:, : d // 2].astype(np.float64))[:, None, :]
    x1, x2 = Q[..., : d // 2].astype(np.float64), Q[..., d // 2:].astype(np.float64)
    want = np.concatenate([x1 * np.cos(ang) - x2 * np.sin(ang), x2 * np.cos(ang) + x1 * np.sin(ang)], -1)
    np.testing.assert_allclose(q, want, rtol=1e-5, atol=1e-4)


def _graph(path, op, inputs, outputs, **attrs):
    from onnx import TensorProto, helper

    f = lambda name, s: helper.make_tensor_value_info(name, TensorProto.FLOAT, s)  # noqa: E731
    node = helper.make_node(op, [n for n, _ in inputs], [n for n, _ in outputs], domain="ai.tqedge", **attrs)
    g = helper.make_graph([node], op, [f(n, s) for n, s in inputs], [f(n, s) for n, s in outputs])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("ai.tqedge", 1)]),
              str(path))
    return path


def _rope_graph(path, hq):
    return _graph(path, "RotaryQKV", [("qkv", ["T", "W"]), ("cos", ["T", 1, "D"]), ("sin", ["T", 1, "D"])],
                  [("q", ["T", "Hq", "D"]), ("k", ["T", "Hkv", "D"]), ("v", ["T", "Hkv", "D"])], num_heads=hq)


def test_rotary_qkv_in_a_session(tmp_path):
    rng = np.random.default_rng(0)
    hq, hkv, d = 9, 3, 64
    lib = ort_capi.OrtLib()
    sess = ort_capi.Session(lib, _rope_graph(tmp_path / "m.onnx", hq), [native_rope.make_op(lib)], threads=1)
    try:
        for t in (1, 6):
            qkv = rng.standard_normal((t, (hq + 2 * hkv) * d)).astype(np.float32)
            cos, sin = _tables(rng, t, d)
            q, k, v = sess.run({"qkv": qkv, "cos": cos[:, None], "sin": sin[:, None]}, ["q", "k", "v"])
            Q, K, V = _split(qkv, hq, hkv, d)
            np.testing.assert_array_equal(q, _rope_f32(Q, cos, sin))
            np.testing.assert_array_equal(k, _rope_f32(K, cos, sin))
            np.testing.assert_array_equal(v, V)
    finally:
        sess.close()


def test_op_refuses_shapes_that_disagree(tmp_path):
    """qkv whose width is not (Hq + 2 Hkv)·D for the node's num_heads, tables of another width or
    rows: a one-line error naming the op; shapes that agree run."""
    lib = ort_capi.OrtLib()
    sess = ort_capi.Session(lib, _rope_graph(tmp_path / "r.onnx", 4), [native_rope.make_op(lib)], threads=1)
    try:
        cos = np.ones((2, 1, 8), np.float32)
        for qkv, c in ((np.zeros((2, 8 * 7), np.float32), cos), (np.zeros((2, 8 * 5), np.float32), cos),
                       (np.zeros((2, 8 * 6), np.float32), np.ones((2, 1, 10), np.float32)),
                       (np.zeros((3, 8 * 6), np.float32), cos)):
            with pytest.raises(TqedgeError, match="RotaryQKV: qkv") as e:
                sess.run({"qkv": qkv, "cos": c, "sin": c}, ["q", "k", "v"])
            assert "\n" not in str(e.value)
        q, k, v = sess.run({"qkv": np.ones((2, 8 * 6), np.float32), "cos": cos, "sin": 0 * cos}, ["q", "k", "v"])
        assert q.shape == (2, 4, 8) and k.shape == v.shape == (2, 1, 8) and (q == 1).all()
    finally:
        sess.close()

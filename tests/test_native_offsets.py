"""AddBlockOffsets: the block minimums of carried-over Q4_1 linears (runtime/native_offsets.py).

The kernel against the formula in NumPy float64 (from the spec: ``y + blocksum(x) @ mins``), and
the op in a session against the same, bad shapes included. The exporter's use of it (a graph of
two linears, segments and native) is tested in tests/test_export.py; SmolLM2's whole graph in
tests/test_onnx_backend.py."""

from __future__ import annotations

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
pytest.importorskip("numba")

from tqedge.codec.kernels_linear import add_block_offsets  # noqa: E402
from tqedge.errors import TqedgeError  # noqa: E402
from tqedge.runtime import native_offsets, ort_capi  # noqa: E402


def _reference(x, y, mins16):
    nb = mins16.shape[0]
    sums = x.astype(np.float64).reshape(x.shape[0], nb, -1).sum(-1)  # (T, nb)
    return y.astype(np.float64) + sums @ mins16.astype(np.float64)


def _halves(rng, shape):
    m = (rng.standard_normal(shape) * 0.05).astype(np.float16)
    flat = m.reshape(-1)
    flat[:4] = np.array([0.0, -0.0, 6e-8, -3e-5], np.float16)  # zeros and subnormal halves
    return m


@pytest.mark.parametrize("t,k,n,block", [(1, 576, 1536, 32), (7, 96, 40, 32), (3, 64, 24, 16)])
def test_kernel_matches_the_formula(t, k, n, block):
    rng = np.random.default_rng(t)
    x = rng.standard_normal((t, k)).astype(np.float32) * 3
    y = rng.standard_normal((t, n)).astype(np.float32)
    mins = _halves(rng, (k // block, n))
    out = np.full((t, n), np.nan, np.float32)
    add_block_offsets(x, y, mins.view(np.uint16), out)
    np.testing.assert_allclose(out, _reference(x, y, mins), rtol=2e-6, atol=2e-5)


def _graph(path, k, n, nb, mins=None):
    from onnx import TensorProto, helper, numpy_helper

    f = lambda name, s: helper.make_tensor_value_info(name, TensorProto.FLOAT, s)  # noqa: E731
    inits = [numpy_helper.from_array(mins, "mins")] if mins is not None else []
    ins = [f("y", ["T", n]), f("x", ["T", k])]
    if mins is None:
        ins.append(helper.make_tensor_value_info("mins", TensorProto.FLOAT16, [nb, n]))
    node = helper.make_node("AddBlockOffsets", ["y", "x", "mins"], ["out"], domain="ai.tqedge")
    g = helper.make_graph([node], "offsets", ins, [f("out", ["T", n])], initializer=inits)
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("ai.tqedge", 1)]),
              str(path))
    return path


def test_op_in_a_session(tmp_path):
    rng = np.random.default_rng(0)
    k, n, nb = 96, 40, 3
    mins = _halves(rng, (nb, n))
    lib = ort_capi.OrtLib()
    sess = ort_capi.Session(lib, _graph(tmp_path / "m.onnx", k, n, nb, mins), [native_offsets.make_op(lib)],
                            threads=1)
    try:
        for t in (1, 5):
            x, y = rng.standard_normal((t, k)).astype(np.float32), rng.standard_normal((t, n)).astype(np.float32)
            (got,) = sess.run({"y": y, "x": x}, ["out"])
            np.testing.assert_allclose(got, _reference(x, y, mins), rtol=2e-6, atol=2e-5)
    finally:
        sess.close()


def test_op_refuses_shapes_that_disagree(tmp_path):
    """Minimums whose rows do not divide K, or whose columns are not N, or rows of x and y that
    differ: a one-line error from the op, nothing written."""
    lib = ort_capi.OrtLib()
    sess = ort_capi.Session(lib, _graph(tmp_path / "m.onnx", "K", "N", "nb"), [native_offsets.make_op(lib)],
                            threads=1)
    rng = np.random.default_rng(1)
    good = {"y": np.zeros((2, 8), np.float32), "x": np.ones((2, 64), np.float32),
            "mins": rng.standard_normal((2, 8)).astype(np.float16)}
    try:
        (out,) = sess.run(good, ["out"])
        np.testing.assert_allclose(out, _reference(good["x"], good["y"], good["mins"]), rtol=1e-6)
        for bad in ({"mins": np.zeros((3, 8), np.float16)}, {"mins": np.zeros((2, 7), np.float16)},
                    {"y": np.zeros((3, 8), np.float32)}):
            with pytest.raises(TqedgeError, match="AddBlockOffsets: y .* agreeing shapes"):
                sess.run({**good, **bad}, ["out"])
    finally:
        sess.close()


@pytest.mark.parametrize("where", ["cooperative pool", "onnxruntime's pool"])
def test_prompt_rows_as_work_items_same_bits(tmp_path, where):
    """A prompt chunk (from MIN_ROWS rows) is split into work items of ROWS_PER_ITEM rows on a pool:
    the same bits as one thread, and the formula's values."""
    from tqedge.codec import numba_runtime
    from tqedge.runtime import coop_pool

    rng = np.random.default_rng(2)
    k, n, nb, t = 96, 40, 3, 3 * native_offsets.ROWS_PER_ITEM + 5
    assert t >= native_offsets.MIN_ROWS
    mins = _halves(rng, (nb, n))
    path = _graph(tmp_path / "m.onnx", k, n, nb, mins)
    lib = ort_capi.OrtLib()
    if where == "cooperative pool":
        op = native_offsets.make_op(lib, threads=2, pool=coop_pool.pool(2).address, lock=numba_runtime.LOCK_ADDRESS)
        pooled = ort_capi.Session(lib, path, [op], threads=1)
    else:
        op = native_offsets.make_op(lib, threads=2, parallel=True)
        pooled = ort_capi.Session(lib, path, [op], threads=2, config={"session.intra_op.allow_spinning": "1"})
    alone = ort_capi.Session(lib, path, [native_offsets.make_op(lib)], threads=1)
    x, y = rng.standard_normal((t, k)).astype(np.float32), rng.standard_normal((t, n)).astype(np.float32)
    try:
        (a,) = pooled.run({"y": y, "x": x}, ["out"])
        (b,) = alone.run({"y": y, "x": x}, ["out"])
    finally:
        pooled.close()
        alone.close()
    assert np.array_equal(a.view(np.uint32), b.view(np.uint32))
    np.testing.assert_allclose(a, _reference(x, y, mins), rtol=2e-6, atol=2e-5)

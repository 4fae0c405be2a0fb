"""LinearQ4_1: a GGUF Q4_1 linear on the file's own blocks (runtime/native_linear.py).

The op in a session against NumPy written from the spec (tests/test_linear_q4.py's reference: the
Q4_1 formula with the input quantized to int8 per block of 32), one row and prompt chunks, on the
calling thread and on the cooperative pool; bad shapes refused with one line. The exporter's use
of it is checked by tests/test_export.py and, on SmolLM2's whole graph against the segments, by
tests/test_onnx_backend.py."""

from __future__ import annotations

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
pytest.importorskip("numba")

from test_linear_q4 import random_q4_1, reference  # noqa: E402

from tqedge.codec import numba_runtime  # noqa: E402
from tqedge.codec import simd_linear as L  # noqa: E402
from tqedge.codec.kernels_linear import group_q4_1  # noqa: E402
from tqedge.errors import TqedgeError  # noqa: E402
from tqedge.runtime import coop_pool, native_linear, ort_capi  # noqa: E402


def _graph(path, k, n, w4=None):
    from onnx import TensorProto, helper, numpy_helper

    inits = [numpy_helper.from_array(w4, "w")] if w4 is not None else []
    ins = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["T", k])]
    if w4 is None:
        ins.append(helper.make_tensor_value_info("w", TensorProto.UINT8, ["G", "B"]))
    node = helper.make_node("LinearQ4_1", ["x", "w"], ["y"], domain="ai.tqedge")
    g = helper.make_graph([node], "linear", ins, [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["T", n])],
                          initializer=inits)
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("ai.tqedge", 1)]),
              str(path))
    return path


def _session(lib, path, where):
    if where == "calling thread":
        return ort_capi.Session(lib, path, [native_linear.make_op(lib)], threads=1)
    if where == "cooperative pool":
        op = native_linear.make_op(lib, threads=2, pool=coop_pool.pool(2).address, lock=numba_runtime.LOCK_ADDRESS)
        return ort_capi.Session(lib, path, [op], threads=1)
    op = native_linear.make_op(lib, threads=2, parallel=True)
    return ort_capi.Session(lib, path, [op], threads=2, config={"session.intra_op.allow_spinning": "1"})


@pytest.mark.parametrize("where", ["calling thread", "cooperative pool", "onnxruntime's pool"])
def test_op_in_a_session(tmp_path, where):
    """One row and prompt chunks: the formula's values, and on a pool (row groups as work items, the
    last one short) the same bits as on the calling thread."""
    rng = np.random.default_rng(0)
    n, k = L.ROWS * (2 * native_linear.GROUPS_PER_ITEM + 6), 96
    w = random_q4_1(rng, n, k)
    path = _graph(tmp_path / "m.onnx", k, n, group_q4_1(w))
    lib = ort_capi.OrtLib()
    sess, alone = _session(lib, path, where), _session(lib, path, "calling thread")
    try:
        for t in (1, 6):
            x = rng.standard_normal((t, k)).astype(np.float32)
            (got,) = sess.run({"x": x}, ["y"])
            (one,) = alone.run({"x": x}, ["y"])
            assert got.shape == (t, n)
            assert np.array_equal(got.view(np.uint32), one.view(np.uint32))
            for i in range(t):
                ref, mag, _, _, _ = reference(w, x[i])
                assert np.all(np.abs(got[i] - ref) <= 1e-5 * mag + 1e-6)
    finally:
        sess.close()
        alone.close()


def test_op_refuses_shapes_that_disagree(tmp_path):
    """A weight whose row length is not K / 32 blocks of 16 interleaved rows: one line, no output."""
    lib = ort_capi.OrtLib()
    sess = ort_capi.Session(lib, _graph(tmp_path / "m.onnx", "K", "N"), [native_linear.make_op(lib)], threads=1)
    try:
        x = np.zeros((1, 64), np.float32)
        with pytest.raises(TqedgeError, match="LinearQ4_1: x .* must be 2-D with agreeing shapes"):
            sess.run({"x": x, "w": np.zeros((3, 320), np.uint8)}, ["y"])  # K = 64 needs 2 blocks: 640 bytes
        with pytest.raises(TqedgeError, match="agreeing shapes"):
            sess.run({"x": np.zeros((1, 60), np.float32), "w": np.zeros((3, 640), np.uint8)}, ["y"])
    finally:
        sess.close()

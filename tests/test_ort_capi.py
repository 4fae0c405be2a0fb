"""The C-API route: a graph with a custom ``ai.tqedge`` node computed by a Numba cfunc, run
through onnxruntime's C API via ctypes (no ``import onnxruntime``), checked against NumPy."""

from __future__ import annotations

import sys

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
pytest.importorskip("numba")

from numba import carray, cfunc, types  # noqa: E402

from tqedge.errors import TqedgeError  # noqa: E402
from tqedge.runtime import ort_capi  # noqa: E402
from tqedge.runtime.ort_numba import CustomOp, as_ptr, fail, kernel_ext, tensor_in, tensor_out  # noqa: E402


@cfunc(types.intp(types.intp, types.intp), nogil=True)
def spike_compute(kernel, ctx):
    """y = 2·x + state; state += x, where state is a float32 buffer named by the descriptor
    (address, length) — the cache-descriptor pattern in miniature."""
    ext, layer, table = kernel_ext(kernel)
    dims = np.zeros(4, np.int64)
    xa, xn, st = tensor_in(table, ctx, 0, dims)
    if st != 0:
        return st
    n = dims[0]
    da, dn, st = tensor_in(table, ctx, 1, dims)
    if st != 0:
        return st
    if xn != 1 or dn != 1 or dims[0] != 2:
        return fail(ext, table, 1)
    desc = carray(as_ptr(da, np.int64), (2,))
    if desc[1] != n:
        return fail(ext, table, 2)
    x = carray(as_ptr(xa, np.float32), (n,))
    state = carray(as_ptr(desc[0], np.float32), (n,))
    dims[0] = n
    ya, st = tensor_out(table, ctx, 0, dims, 1)
    if st != 0:
        return st
    y = carray(as_ptr(ya, np.float32), (n,))
    for i in range(n):
        y[i] = 2 * x[i] + state[i] + layer
        state[i] += x[i]
    return 0


def _graph(path, layers=(0,)):
    from onnx import TensorProto, helper

    nodes, prev = [], "x"
    for i, layer in enumerate(layers):
        out = "y" if i == len(layers) - 1 else f"h{i}"
        nodes.append(helper.make_node("TqSpike", [prev, "desc"], [out], domain="ai.tqedge", layer=layer))
        prev = out
    g = helper.make_graph(nodes, "spike",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n"]),
                           helper.make_tensor_value_info("desc", TensorProto.INT64, [2])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n"])])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("ai.tqedge", 1)])
    onnx.save(m, str(path))
    return path


@pytest.fixture(scope="module")
def lib():
    return ort_capi.OrtLib()


def _op(lib, kernels=1):
    return CustomOp(lib, "TqSpike", [ort_capi.FLOAT, ort_capi.INT64], [ort_capi.FLOAT], spike_compute,
                    kernels=kernels, messages=["TqSpike: bad descriptor rank", "TqSpike: descriptor length != n"])


def test_api_table_indices(lib):
    # CreateStatus / GetErrorCode / GetErrorMessage / ReleaseStatus round-trip: wrong indices fail here
    st = lib.fn("CreateStatus")(2, b"probe message")
    assert lib.fn("GetErrorCode")(st) == 2
    assert lib.fn("GetErrorMessage")(st) == b"probe message"
    with pytest.raises(TqedgeError, match="probe message"):
        lib.check(st)
    assert lib.version.split(".")[0] == "1"


def test_custom_op_matches_numpy_and_mutates_state(lib, tmp_path):
    op = _op(lib, kernels=3)
    sess = ort_capi.Session(lib, _graph(tmp_path / "g.onnx", layers=(0, 2)), [op], threads=1)
    assert sess.inputs == ["x", "desc"] and sess.outputs == ["y"]
    rng = np.random.default_rng(0)
    x = rng.normal(size=37).astype(np.float32)
    state = rng.normal(size=37).astype(np.float32)
    s0 = state.copy()
    desc = np.array([state.ctypes.data, len(state)], np.int64)
    (y,) = sess.run({"x": x, "desc": desc}, ["y"])
    # oracle: layer 0 then layer 2, each y = 2·x + state + layer; state += x
    h = 2 * x + s0 + 0
    s1 = s0 + x
    expect = 2 * h + s1 + 2
    np.testing.assert_allclose(y, expect, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(state, s1 + h, rtol=1e-6, atol=1e-6)
    sess.close()


def test_kernel_error_is_a_status_not_a_crash(lib, tmp_path):
    op = _op(lib)
    sess = ort_capi.Session(lib, _graph(tmp_path / "g.onnx"), [op])
    state = np.zeros(4, np.float32)
    x = np.ones(5, np.float32)
    with pytest.raises(TqedgeError, match="descriptor length != n"):
        sess.run({"x": x, "desc": np.array([state.ctypes.data, 4], np.int64)}, ["y"])
    assert np.all(state == 0)
    # the session still works after a failed run
    (y,) = sess.run({"x": x[:4], "desc": np.array([state.ctypes.data, 4], np.int64)}, ["y"])
    np.testing.assert_allclose(y, 2 * x[:4])


def test_layer_attribute_out_of_range_is_refused(lib, tmp_path):
    op = _op(lib, kernels=1)
    with pytest.raises(TqedgeError, match="out of range"):
        ort_capi.Session(lib, _graph(tmp_path / "g.onnx", layers=(3,)), [op])


def test_onnxruntime_python_module_not_imported(tmp_path):
    """The C-API route loads libonnxruntime alone: the Python module (its own copy) stays out."""
    import subprocess

    path = _graph(tmp_path / "g.onnx")
    code = ("import sys, numpy as np\n"
            "from tqedge.runtime import ort_capi\n"
            "from tests.test_ort_capi import _op\n"
            "lib = ort_capi.OrtLib()\n"
            f"s = ort_capi.Session(lib, {str(path)!r}, [_op(lib)])\n"
            "st = np.zeros(3, np.float32)\n"
            "y, = s.run({'x': np.ones(3, np.float32), 'desc': np.array([st.ctypes.data, 3])}, ['y'])\n"
            "assert y.tolist() == [2.0, 2.0, 2.0] and st.tolist() == [1.0, 1.0, 1.0]\n"
            "print(sorted(m for m in sys.modules if m.startswith('onnxruntime')))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         cwd=str(__import__("pathlib").Path(__file__).resolve().parents[1]))
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"

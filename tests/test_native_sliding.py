"""The native op on a model with sliding-window layers (runtime/native_sliding.py, the layered
descriptor of runtime/kv_descriptor.py): a graph of three TurboQuantAttention nodes (sliding,
full, sliding) run through the C API against the segment path's ``LayeredKVCache.attend``
(runtime/sliding_cache.py) and against a NumPy oracle written from the rule (a sliding query at t
sees keys at 0 ≤ t − p < W), over prompts shorter and longer than the window, decode across it,
exact and TurboQuant caches, serial and parallel prefill, and a batch descriptor over several
caches against each cache run alone."""

from __future__ import annotations

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
pytest.importorskip("numba")

from tqedge.errors import TqedgeError  # noqa: E402
from tqedge.runtime import kv_descriptor as KD  # noqa: E402
from tqedge.runtime import native_op, ort_capi  # noqa: E402
from tqedge.runtime.cache import make_cache  # noqa: E402

from test_sliding_cache import D, HKV, HQ, SCALE, TYPES, W, manifest, oracle  # noqa: E402

N_LAYERS = len(TYPES)


@pytest.fixture(scope="module")
def session(tmp_path_factory):
    """Three TurboQuantAttention nodes (layers 0, 1, 2) in one graph, one Run for all."""
    from onnx import helper

    f = lambda n, h: helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, ["T", h, D])  # noqa: E731
    nodes, inputs, outputs = [], [], []
    for i in range(N_LAYERS):
        nodes.append(helper.make_node("TurboQuantAttention", [f"q{i}", f"k{i}", f"v{i}", "kv_desc"], [f"out{i}"],
                                      domain="ai.tqedge", layer=i))
        inputs += [f(f"q{i}", HQ), f(f"k{i}", HKV), f(f"v{i}", HKV)]
        outputs.append(f(f"out{i}", HQ))
    inputs.append(helper.make_tensor_value_info("kv_desc", onnx.TensorProto.INT64, ["n"]))
    g = helper.make_graph(nodes, "layers", inputs, outputs)
    path = tmp_path_factory.mktemp("op") / "layers.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("ai.tqedge", 1)]),
              str(path))
    lib = ort_capi.OrtLib()
    op = native_op.make_op(lib, [SCALE] * N_LAYERS)
    sess = ort_capi.Session(lib, path, [op], threads=1)
    yield sess
    sess.close()


def _qkv(n, seed):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((N_LAYERS, n, HQ, D)).astype(np.float32),
            rng.standard_normal((N_LAYERS, n, HKV, D)).astype(np.float32),
            rng.standard_normal((N_LAYERS, n, HKV, D)).astype(np.float32))


def _native(sess, cache, q, k, v, chunks):
    out, start = np.zeros(q.shape, np.float32), 0
    for n in chunks:
        sl = slice(start, start + n)
        cache.prepare(n)
        feeds = {"kv_desc": cache.descriptor()}
        for i in range(N_LAYERS):
            feeds[f"q{i}"], feeds[f"k{i}"], feeds[f"v{i}"] = q[i, sl], k[i, sl], v[i, sl]
        got = sess.run(feeds, [f"out{i}" for i in range(N_LAYERS)])
        cache.commit()
        for i in range(N_LAYERS):
            out[i, sl] = got[i]
        start += n
    return out


def _segments(cache, q, k, v, chunks):
    out, start = np.zeros(q.shape, np.float32), 0
    for n in chunks:
        sl = slice(start, start + n)
        cache.prepare(n)
        for i in range(N_LAYERS):
            out[i, sl] = cache.attend(i, q[i, sl], k[i, sl], v[i, sl], SCALE)
        cache.commit()
        start += n
    return out


# chunks shorter and longer than the window (W = 8), single tokens crossing it
CHUNKS = [[3, 1, 1, 9, 1, 1, 1, 1, 12, 1, 1], [1] * 13, [21, 2, 1, 1], [5, 5, 5, 5, 5]]


@pytest.mark.parametrize("chunks", CHUNKS)
def test_exact_layered_matches_oracle_and_segments(session, chunks):
    n = sum(chunks)
    q, k, v = _qkv(n, seed=len(chunks))
    mk = lambda: make_cache(manifest(), "1MiB", kv_bits="exact")  # noqa: E731
    ours, ref = mk(), mk()
    got = _native(session, ours, q, k, v, chunks)
    np.testing.assert_allclose(got, _segments(ref, q, k, v, chunks), atol=1e-5, rtol=0)
    for i, t in enumerate(TYPES):  # the rule itself, independently of the cache code
        expect = oracle(q[i], k[i], v[i], W if t == "sliding_attention" else None)
        np.testing.assert_allclose(got[i], expect, atol=1e-5, rtol=0)
    assert np.array_equal(ours.rings.keys, ref.rings.keys) and np.array_equal(ours.rings.values, ref.rings.values)
    assert np.array_equal(ours.full.keys, ref.full.keys)


@pytest.mark.parametrize("threads", [1, 2])
def test_turboquant_layered_matches_segments(session, threads):
    """fp16 rings beside a TurboQuant full layer (codes, sinks, window); prefill chunks longer than
    the sliding window, serial and through the parallel entry."""
    from tqedge.codec import numba_runtime

    chunks = [40, 1, 1, 30, 2] + [1] * 12
    q, k, v = _qkv(sum(chunks), seed=7)
    mk = lambda: make_cache(manifest(), "1MiB", kv_bits="4,3", window=16, sinks=4)  # noqa: E731
    numba_runtime.set_threads(threads)
    try:
        ours, ref = mk(), mk()
        got = _native(session, ours, q, k, v, chunks)
    finally:
        numba_runtime.set_threads(None)
    np.testing.assert_allclose(got, _segments(ref, q, k, v, chunks), atol=1e-4, rtol=0)
    assert ours.rings.keys.dtype == np.float16
    assert np.array_equal(ours.rings.keys, ref.rings.keys) and np.array_equal(ours.rings.values, ref.rings.values)
    desc = ours._native_desc
    assert desc[KD.THREADS] == min(threads, numba_runtime.MAX_THREADS)  # one core under taskset: serial
    assert desc[KD.LY_PAR_PREFILL] != 0 and bool(desc[KD.LY_POOL]) == (desc[KD.THREADS] > 1)


def _refused(session, desc, n, message):
    """Running ``n`` random rows under ``desc`` is refused with a one-line error naming ``message``."""
    q, k, v = _qkv(n, seed=0)
    feeds = {"kv_desc": desc}
    for i in range(N_LAYERS):
        feeds[f"q{i}"], feeds[f"k{i}"], feeds[f"v{i}"] = q[i], k[i], v[i]
    with pytest.raises(TqedgeError, match=message) as e:
        session.run(feeds, [f"out{i}" for i in range(N_LAYERS)])
    assert "\n" not in str(e.value)


def test_bad_route_is_a_one_line_error(session):
    cache = make_cache(manifest(), "1MiB", kv_bits="exact")
    cache.prepare(2)
    desc = cache.descriptor().copy()
    desc[KD.LY_ROUTE:KD.LY_ROUTE + N_LAYERS] = [-5, 3, -9]  # sliding layers 4 and 8 of 2, full layer 3 of 1
    _refused(session, desc, 2, "layered descriptor out of range")
    assert not cache.rings.keys.any() and not cache.full.keys.any()  # nothing written


def _batched(sess, caches, seqs, steps):
    """Run several sequences' (q, k, v) through the op together, ``steps`` = rows per sequence."""
    from tqedge.runtime.batch import BatchView

    outs, starts = [np.zeros(s[0].shape, np.float32) for s in seqs], [0] * len(seqs)
    for counts in steps:
        view = BatchView(caches, counts)
        view.prepare(sum(counts))
        feeds = {"kv_desc": view.descriptor()}
        for i in range(N_LAYERS):
            for j, name in enumerate("qkv"):
                feeds[f"{name}{i}"] = np.concatenate([s[j][i, a:a + n] for s, a, n in zip(seqs, starts, counts)])
        got = sess.run(feeds, [f"out{i}" for i in range(N_LAYERS)])
        view.commit()
        for (a, b, _), o, st, n in zip(view.parts, outs, starts, counts):
            for i in range(N_LAYERS):
                o[i, st:st + n] = got[i][a:b]
        starts = [st + n for st, n in zip(starts, counts)]
    return outs


def test_batch_of_layered_caches_equals_each_alone(session):
    """A batch descriptor over an exact and a TurboQuant layered cache: prompt rows of both in one
    Run (longer than the window), then decode rows and a chunk beside a decode row; each
    sequence's outputs and cache equal the same sequence run alone, bit for bit."""
    steps = [(20, 9), (1, 1), (1, 1), (1, 12), (1, 1), (3, 1)]
    seqs = [_qkv(sum(s[j] for s in steps), seed=11 + j) for j in range(2)]
    mk = [lambda: make_cache(manifest(), "1MiB", kv_bits="exact"),
          lambda: make_cache(manifest(), "1MiB", kv_bits="4,3", window=16, sinks=4)]
    caches = [f() for f in mk]
    got = _batched(session, caches, seqs, steps)
    for j, (f, s) in enumerate(zip(mk, seqs)):
        alone = f()
        want = _native(session, alone, *s, [st[j] for st in steps])
        assert np.array_equal(got[j], want)
        assert np.array_equal(caches[j].rings.keys, alone.rings.keys)
    assert caches[0].offset == 27 and caches[1].offset == 25


def test_bad_batch_descriptor_is_a_one_line_error(session):
    from tqedge.runtime.batch import BatchView

    caches = [make_cache(manifest(), "1MiB", kv_bits="exact") for _ in range(2)]
    view = BatchView(caches, [2, 1])
    view.prepare(3)
    desc = view.descriptor().copy()
    desc[KD.B_PARTS + KD.B_PART_WORDS] = 1  # the second part's rows overlap the first's
    _refused(session, desc, 3, "batch descriptor out of range")
    assert not any(c.rings.keys.any() or c.full.keys.any() for c in caches)  # checked before anything is written

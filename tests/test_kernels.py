"""Numba kernels == NumPy kernels (codes identical, floats ≤ 1e-5 relative: the tolerance
docs/CODEC.md states, for every kernel incl. the fp16 ones), the float16 converter, backend selection, and that importing tqedge compiles nothing."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tqedge.codec import kernels_numba as knb  # numba is a base dependency: no skip without it
from tqedge.codec import kernels_numpy as knp
from tqedge.codec.quantizer import CodecConfig, TurboQuant

CONFIGS = [
    dict(dim=64, bits=1), dict(dim=64, bits=2), dict(dim=64, bits=3), dict(dim=64, bits=4),
    dict(dim=64, bits=5), dict(dim=64, bits=6), dict(dim=64, bits=7), dict(dim=64, bits=8),
    dict(dim=64, bits=3.5), dict(dim=128, bits=2.5), dict(dim=64, bits=3, qjl=True),
    dict(dim=64, bits=1, qjl=True), dict(dim=96, bits=3, rotation="dense"), dict(dim=40, bits=4.25),
]


def _rel(a, b):
    return float(np.max(np.abs(a - b)) / max(1e-30, float(np.max(np.abs(b)))))


@pytest.mark.parametrize("kw", CONFIGS, ids=lambda kw: "-".join(f"{k}{v}" for k, v in kw.items()))
@pytest.mark.parametrize("n", [37, 2100])  # serial and parallel (H·N ≥ 4096) kernels
def test_numba_equals_numpy(kw, n):
    tq = TurboQuant(CodecConfig(**kw))
    rng = np.random.default_rng(n)
    h, g, d = 2, 3, tq.dim
    x = rng.standard_normal((h * n, d)).astype(np.float32)
    # codes: quantize + pack through both backends
    u = rng.standard_normal((h * n, d)).astype(np.float32) / np.sqrt(d)
    bnd = tq.parts[0].codebook.boundaries if tq.parts[0].codebook is not None else np.zeros(1)
    c_nb, c_np = knb.quantize(u, bnd), knp.quantize(u, bnd)
    np.testing.assert_array_equal(c_nb, c_np)
    bits = int(np.log2(bnd.size + 1))
    out_nb = np.full((h * n, (d * bits + 7) // 8 + 3), 0xFF, np.uint8)
    out_np = out_nb.copy()
    knb.pack_into(c_nb, bits, out_nb, 2)
    knp.pack_into(c_np, bits, out_np, 2)
    np.testing.assert_array_equal(out_nb, out_np)

    codes, scales = tq.encode(x)
    codes, scales = codes.reshape(h, n, -1), scales.reshape(h, n, -1)
    s16 = scales.view(np.uint16)
    t = tq.segments
    qp = tq.project_query(rng.standard_normal((h, g, d)).astype(np.float32))  # (H, G, Dp)
    p = rng.random((h, g, n)).astype(np.float32)
    args = (codes, s16, t.table, t.cb, t.lut)
    assert _rel(knb.scores(qp, *args), knp.scores(qp, *args)) < 1e-5
    assert _rel(knb.value_sum(p, *args, t.dp), knp.value_sum(p, *args, t.dp)) < 1e-5
    assert _rel(knb.dequantize(*args, t.dp), knp.dequantize(*args, t.dp)) < 1e-6


def test_encode_codes_identical_across_backends(monkeypatch):
    import tqedge.codec.quantizer as qmod

    x = np.random.default_rng(5).standard_normal((500, 64)).astype(np.float32)
    for kw in (dict(bits=4), dict(bits=3.5, qjl=True)):
        tq = TurboQuant(CodecConfig(dim=64, **kw))
        c1, s1 = tq.encode(x)
        monkeypatch.setattr(qmod, "K", knp)
        c2, s2 = tq.encode(x)
        monkeypatch.undo()
        np.testing.assert_array_equal(c1, c2)
        np.testing.assert_array_equal(s1, s2)


def test_half_converter_all_patterns():
    bits = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    ref = bits.view(np.float16).astype(np.float32)
    got = knb.halves_to_float(bits)
    nan = np.isnan(ref)
    assert np.array_equal(np.isnan(got), nan)
    np.testing.assert_array_equal(got[~nan], ref[~nan])


def _run(code: str, **env) -> str:
    e = {**os.environ, **env}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=e, check=True).stdout


def test_numpy_backend_in_subprocess():
    code = """
import json, sys, numpy as np
from tqedge.codec import kernels
from tqedge.codec.quantizer import CodecConfig, TurboQuant
tq = TurboQuant(CodecConfig(dim=64, bits=3.5))
x = np.random.default_rng(0).standard_normal((64, 64)).astype(np.float32)
c, s = tq.encode(x)
q = np.random.default_rng(1).standard_normal((1, 2, 64)).astype(np.float32)
sc = tq.scores(tq.project_query(q), c[None], s[None])
ref = q[0] @ tq.decode(c, s).T
print(json.dumps({"backend": kernels.BACKEND, "numba": "numba" in sys.modules,
                  "err": float(np.abs(sc[0] - ref).max())}))
"""
    out = json.loads(_run(code, TQEDGE_KERNELS="numpy"))
    assert out == {"backend": "numpy", "numba": False, "err": pytest.approx(0, abs=1e-4)}


def test_import_tqedge_compiles_nothing():
    out = _run("import sys, tqedge, tqedge.codec, tqedge.codec.packing, tqedge.codec.config; "
               "print('numba' in sys.modules)")
    assert out.strip() == "False"


def test_row_slices_of_a_ring_buffer_need_no_copy():
    # the cache passes codes[:, a:b] of a larger buffer (not C-contiguous): same results
    tq = TurboQuant(CodecConfig(dim=64, bits=3.5))
    x = np.random.default_rng(9).standard_normal((2 * 700, 64)).astype(np.float32)
    codes, scales = (a.reshape(2, 700, -1) for a in tq.encode(x))
    sl = (codes[:, 50:650], scales[:, 50:650])
    assert not sl[0].flags.c_contiguous
    cont = (sl[0].copy(), sl[1].copy())
    qp = tq.project_query(np.random.default_rng(1).standard_normal((2, 3, 64)).astype(np.float32))
    p = np.random.default_rng(2).random((2, 3, 600)).astype(np.float32)
    np.testing.assert_array_equal(tq.scores(qp, *sl), tq.scores(qp, *cont))
    np.testing.assert_array_equal(tq.value_sum(p, *sl), tq.value_sum(p, *cont))
    np.testing.assert_array_equal(tq.dequantize_projected(*sl), tq.dequantize_projected(*cont))



# The guarantee docs/CODEC.md states ("Numba vs NumPy"): codes bit-identical; dequantize within
# 1e-6 and the summing kernels within 1e-5 of the largest |value| of their output (measured worst
# 9e-7: float32 summation order and fastmath reassociation). Greedy decoding can therefore
# differ between the backends only where two logits are that close.
TOLERANCE = {"scores": 1e-5, "value_sum": 1e-5, "dequantize": 1e-6, "fp16_scores": 1e-5, "fp16_weighted_sum": 1e-5}


@pytest.mark.parametrize("seed", range(3))
def test_documented_tolerance_every_kernel(seed):
    from tqedge.runtime import fp16_kernels as F

    if F.BACKEND != "numba":  # Numba imports (knb above): only TQEDGE_KERNELS=numpy may say otherwise
        assert os.environ.get("TQEDGE_KERNELS", "").lower() == "numpy", "fp16 kernels did not pick Numba"
        pytest.skip("TQEDGE_KERNELS=numpy: the Numba fp16 kernels are not compiled in this run")
    rng = np.random.default_rng(100 + seed)
    worst = dict.fromkeys(TOLERANCE, 0.0)
    for kw in CONFIGS:
        tq = TurboQuant(CodecConfig(**kw))
        h, g, n, d = 2, 4, int(rng.integers(1, 1500)), tq.dim
        # keys of very different norms (scales spanning e^±3), as real K/V rows have
        x = (rng.standard_normal((h * n, d)) * rng.lognormal(0, 1, (h * n, 1))).astype(np.float32)
        codes, scales = (a.reshape(h, n, -1) for a in tq.encode(x))
        t = tq.segments
        args = (codes, scales.view(np.uint16), t.table, t.cb, t.lut)
        qp = tq.project_query(rng.standard_normal((h, g, d)).astype(np.float32))
        p = rng.dirichlet(np.ones(n), (h, g)).astype(np.float32)  # softmax-like weights
        pairs = {"scores": (knb.scores(qp, *args), knp.scores(qp, *args)),
                 "value_sum": (knb.value_sum(p, *args, t.dp), knp.value_sum(p, *args, t.dp)),
                 "dequantize": (knb.dequantize(*args, t.dp), knp.dequantize(*args, t.dp))}
        for name, (a, b) in pairs.items():
            worst[name] = max(worst[name], _rel(a, b))
    for d in (64, 128):
        n = int(rng.integers(1, 700))
        qh = rng.standard_normal((2, 4, d)).astype(np.float32)
        k16 = (rng.standard_normal((2, n, d)) * 4).astype(np.float16)
        bias = np.where(rng.random(n) < 0.1, -np.inf, 0).astype(np.float32)  # masked slots
        bias[0] = 0
        dirty = k16.copy()
        dirty[:, bias == -np.inf] = np.nan  # an unwritten slot may hold any bits: never read
        a, b = F._scores_numba(qh, dirty.view(np.uint16), bias), F._scores_numpy(qh, k16, bias)
        assert np.array_equal(np.isneginf(a), np.isneginf(b))
        fin = np.isfinite(b)
        worst["fp16_scores"] = max(worst["fp16_scores"], _rel(a[fin], b[fin]))
        p = rng.dirichlet(np.ones(n), (2, 4)).astype(np.float32)
        p[:, :, bias == -np.inf] = 0.0  # softmax weights of masked slots
        worst["fp16_weighted_sum"] = max(worst["fp16_weighted_sum"],
                                         _rel(F._weighted_sum_numba(p, dirty.view(np.uint16)), F._weighted_sum_numpy(p, k16)))
    for name, tol in TOLERANCE.items():
        assert worst[name] <= tol, (name, worst[name])

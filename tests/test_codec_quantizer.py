"""TurboQuant encode/decode and the projected-domain primitives, against NumPy oracles and
the paper's theory."""

from __future__ import annotations

import math

import numpy as np
import pytest

from tqedge.codec.codebook import get_codebook
from tqedge.codec.config import select_outlier_channels
from tqedge.codec.packing import unpack
from tqedge.codec.quantizer import CodecConfig, TurboQuant
from tqedge.errors import TqedgeError


def _gauss(n, d, seed=0):
    return np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)


def _reference_decode(tq: TurboQuant, codes, scales) -> np.ndarray:
    """Decode from the documented layout with plain NumPy: unpack each run, look up, scale,
    undo the sketch (S^T) and the rotation (R^T), scatter to channels."""
    x = np.zeros((codes.shape[0], tq.dim))
    for pc in tq.parts:
        n = len(pc.channels)
        y = np.zeros((codes.shape[0], n))
        if pc.mse_seg is not None:
            s = pc.mse_seg
            idx = unpack(codes[:, s.byte_off:], s.bits, n)
            y += get_codebook(n, s.bits).centroids[idx] * scales[:, s.scale_idx, None].astype(np.float64)
        if pc.qjl_seg is not None:
            s = pc.qjl_seg
            sign = unpack(codes[:, s.byte_off:], 1, n).astype(np.float64) * 2 - 1
            gamma = scales[:, s.scale_idx, None].astype(np.float64)
            y += math.sqrt(math.pi / 2) / n * gamma * (sign @ pc.sketch.astype(np.float64))
        x[:, pc.channels] = y @ pc.rotation.matrix
    return x


CONFIGS = [dict(bits=4), dict(bits=3, norm="plain"), dict(bits=3.5), dict(bits=2.5, qjl=True),
           dict(bits=4, rotation="dense"), dict(bits=1, qjl=True), dict(bits=6)]


@pytest.mark.parametrize("kw", CONFIGS, ids=str)
def test_decode_and_kernels_match_reference(kw):
    tq = TurboQuant(CodecConfig(dim=64, **kw))
    x = _gauss(300, 64)
    codes, scales = tq.encode(x)
    assert codes.shape == (300, tq.code_bytes) and codes.dtype == np.uint8
    assert scales.shape == (300, tq.num_scales) and scales.dtype == np.float16
    assert tq.bytes_per_vector == tq.code_bytes + 2 * tq.num_scales
    ref = _reference_decode(tq, codes, scales)  # (N, d)
    np.testing.assert_allclose(tq.decode(codes, scales), ref, rtol=1e-4, atol=1e-4)
    h, g = 3, 3
    c3, s3 = codes.reshape(h, 100, -1), scales.reshape(h, 100, -1)
    q = _gauss(h * g, 64, seed=1).reshape(h, g, 64)
    sc = tq.scores(tq.project_query(q), c3, s3)  # (H, G, N)
    np.testing.assert_allclose(sc, np.einsum("hgd,hnd->hgn", q, ref.reshape(h, 100, 64)), rtol=1e-4, atol=1e-3)
    p = np.random.default_rng(2).random((h, g, 100)).astype(np.float32)
    vs = tq.unproject(tq.value_sum(p, c3, s3))  # (H, G, d)
    np.testing.assert_allclose(vs, np.einsum("hgn,hnd->hgd", p, ref.reshape(h, 100, 64)), rtol=1e-4, atol=1e-3)
    blk = tq.dequantize_projected(c3, s3)  # (H, N, Dp)
    np.testing.assert_allclose(tq.unproject(blk).reshape(300, 64), ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
@pytest.mark.parametrize("rotation", ["hadamard", "dense"])
def test_mse_matches_theory(bits, rotation):
    # Gaussian vectors rotate to exactly uniform directions: plain-norm D_mse must equal the
    # codebook's distortion (statistically). The corrected norm trades MSE for exact norms: it
    # overshoots when ‖c‖ is far below 1 (b = 1: ~11% worse) and wins from b = 3 on.
    x = _gauss(6000, 64, seed=bits)
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    err = {}
    for norm in ("plain", "corrected"):
        tq = TurboQuant(CodecConfig(dim=64, bits=bits, rotation=rotation, norm=norm, seed=3))
        xh = tq.decode(*tq.encode(unit))
        err[norm] = np.sum((unit - xh) ** 2, axis=1)
    theory = get_codebook(64, bits).mse
    assert np.mean(err["plain"]) == pytest.approx(theory, rel=4 * np.std(err["plain"]) / np.sqrt(6000) / theory + 1e-3)
    ratio = np.mean(err["corrected"]) / np.mean(err["plain"])
    assert ratio < (1.15 if bits == 1 else 1.03 if bits == 2 else 1.0)


def test_corrected_norm_is_exact():
    x = _gauss(200, 64) * 7
    tq = TurboQuant(CodecConfig(dim=64, bits=2))
    xh = tq.decode(*tq.encode(x))
    np.testing.assert_allclose(np.linalg.norm(xh, axis=1), np.linalg.norm(x, axis=1), rtol=2e-3)


def test_prod_estimator_is_unbiased():
    # fixed (x, q); randomness over the seed (rotation and sketch), as in the paper's theorem
    d, seeds = 64, 400
    rng = np.random.default_rng(11)
    x = rng.standard_normal((1, d)).astype(np.float32)
    q = (x[0] + 0.5 * rng.standard_normal(d)).astype(np.float32)  # correlated: <q, x> far from 0
    true = float(q @ x[0])
    est = {"prod": [], "mse": []}
    for s in range(seeds):
        for kind, kw in (("prod", dict(bits=2, qjl=True)), ("mse", dict(bits=1, norm="plain"))):
            tq = TurboQuant(CodecConfig(dim=d, seed=s, **kw))
            c, sc = tq.encode(x)
            est[kind].append(float(tq.scores(tq.project_query(q)[None, None], c[None], sc[None])[0, 0, 0]))
    prod = np.array(est["prod"])
    assert abs(prod.mean() - true) < 4 * prod.std() / np.sqrt(seeds)
    mse = np.array(est["mse"])  # the 1-bit MSE quantizer shrinks inner products (by ~2/pi): biased
    assert abs(mse.mean() - true) > 4 * mse.std() / np.sqrt(seeds)


def test_determinism():
    x = _gauss(50, 64)
    a = TurboQuant(CodecConfig(dim=64, bits=3.5, qjl=True, seed=5)).encode(x)
    b = TurboQuant(CodecConfig(dim=64, bits=3.5, qjl=True, seed=5)).encode(x)
    c = TurboQuant(CodecConfig(dim=64, bits=3.5, qjl=True, seed=6)).encode(x)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert not np.array_equal(a[0], c[0])


def test_fractional_split_and_outlier_channels():
    cfg = CodecConfig(dim=64, bits=3.5)
    p = cfg.parts()
    assert [(len(q.channels), q.bits) for q in p] == [(32, 4), (32, 3)] and p[0].channels == tuple(range(32))
    assert cfg.bytes_per_vector == 16 + 12 + 4 and cfg.effective_bits == 3.5
    assert [(len(q.channels), q.bits) for q in CodecConfig(dim=128, bits=2.5).parts()] == [(64, 3), (64, 2)]
    paper = CodecConfig(dim=128, bits=2.5, outlier_channels=range(96, 128))
    assert [(len(q.channels), q.bits) for q in paper.parts()] == [(32, 3), (96, 2)]
    # data with 8 loud channels: choosing them by RMS as outliers beats the default split
    rng = np.random.default_rng(4)
    loud = rng.choice(64, 8, replace=False)
    x = rng.standard_normal((3000, 64)).astype(np.float32)
    x[:, loud] *= 8
    chosen = select_outlier_channels(x[:1000], 8)
    assert set(chosen) == set(loud.tolist())
    errs = []
    for oc in (None, chosen):
        tq = TurboQuant(CodecConfig(dim=64, bits=2.125, outlier_channels=oc))
        errs.append(np.mean((tq.decode(*tq.encode(x[1000:])) - x[1000:]) ** 2))
    assert errs[1] < 0.8 * errs[0]


@pytest.mark.parametrize("kw,match", [
    (dict(dim=64, bits=9), "bits"), (dict(dim=64, bits=0.5), "bits"), (dict(dim=2, bits=4), "dim"),
    (dict(dim=64, bits=4, rotation="x"), "rotation"), (dict(dim=64, bits=4, norm="x"), "norm"),
    (dict(dim=64, bits=4, outlier_channels=[1]), "fractional"), (dict(dim=64, bits=3.5, outlier_channels=[70]), "lie in"),
])
def test_config_errors(kw, match):
    with pytest.raises(TqedgeError, match=match):
        CodecConfig(**kw)


def test_input_errors():
    tq = TurboQuant(CodecConfig(dim=64, bits=4))
    with pytest.raises(TqedgeError, match="must be"):
        tq.encode(np.zeros((3, 32), np.float32))
    with pytest.raises(TqedgeError, match="NaN"):
        tq.encode(np.full((1, 64), np.nan, np.float32))
    c, s = tq.encode(_gauss(4, 64))
    with pytest.raises(TqedgeError, match="scales"):
        tq.scores(np.zeros((1, 1, 64), np.float32), c[None], s[None].astype(np.float32))
    with pytest.raises(TqedgeError, match="projected queries"):
        tq.scores(np.zeros((1, 1, 32), np.float32), c[None], s[None])
    with pytest.raises(TqedgeError, match="outlier"):
        select_outlier_channels(np.zeros((5, 8)), 8)

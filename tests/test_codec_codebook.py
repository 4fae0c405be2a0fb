"""Lloyd–Max codebooks vs independent optima: Gaussian Lloyd–Max (large d), the exact uniform
case (d = 3), and a brute-force Lloyd on Monte-Carlo samples of a random unit vector."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import tqedge.codec.codebook as cbm
from tqedge.codec.codebook import CODEBOOK_ID, get_codebook, lloyd_max_sphere, sphere_coordinate_pdf
from tqedge.errors import TqedgeError

# Lloyd–Max distortions of N(0, 1) (Max 1960), per coordinate: the d → ∞ limit of d·D_d
GAUSS_LM = {1: 0.3634, 2: 0.1175, 3: 0.03454, 4: 0.009497}


def test_density_integrates_to_one_and_has_variance_1_over_d():
    for d in (3, 8, 64, 128):
        x = np.linspace(-1, 1, 400001)
        f = sphere_coordinate_pdf(x, d)
        assert np.trapezoid(f, x) == pytest.approx(1.0, abs=1e-6)
        assert np.trapezoid(x * x * f, x) == pytest.approx(1.0 / d, rel=1e-5)


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_large_d_matches_gaussian_lloyd_max(bits):
    cb = lloyd_max_sphere(4096, bits)
    assert cb.mse == pytest.approx(GAUSS_LM[bits], rel=2e-3)


@pytest.mark.parametrize("bits", [1, 2, 5, 8])
def test_d3_is_uniform_quantizer(bits):
    # d = 3: one coordinate is uniform on [-1, 1] (Archimedes): the optimum is the uniform grid
    cb = lloyd_max_sphere(3, bits)
    levels = 1 << bits
    np.testing.assert_allclose(cb.centroids, -1 + (2 * np.arange(levels) + 1) / levels, atol=1e-9)
    assert cb.mse == pytest.approx(3 * (2 / levels) ** 2 / 12, rel=1e-7)


def _sample_lloyd(samples: np.ndarray, levels: int, iters: int = 2000) -> tuple[np.ndarray, float]:
    """Plain Lloyd on an empirical distribution (sorted samples + prefix sums: O(L log n) a step)."""
    xs = np.sort(samples)
    s1 = np.concatenate(([0.0], np.cumsum(xs)))
    c = np.quantile(xs, (np.arange(levels) + 0.5) / levels)
    for _ in range(iters):
        cut = np.concatenate(([0], np.searchsorted(xs, 0.5 * (c[1:] + c[:-1])), [xs.size]))
        c = (s1[cut[1:]] - s1[cut[:-1]]) / np.diff(cut)
    idx = np.searchsorted(0.5 * (c[1:] + c[:-1]), xs)
    return c, float(np.mean((xs - c[idx]) ** 2))


@pytest.mark.parametrize("d,bits", [(64, 1), (64, 2), (64, 3), (256, 2), (256, 3), (256, 4)])
def test_matches_monte_carlo_lloyd(d, bits):
    g = np.random.default_rng(0).standard_normal((1_600_000 // d, d))
    samples = (g / np.linalg.norm(g, axis=1, keepdims=True)).reshape(-1)  # coordinates of random unit vectors
    c_mc, dist_mc = _sample_lloyd(samples, 1 << bits)
    cb = get_codebook(d, bits)
    np.testing.assert_allclose(cb.centroids, c_mc, atol=0.01 / np.sqrt(d))
    assert cb.mse == pytest.approx(d * dist_mc, rel=0.01)


def test_codebooks_are_sorted_symmetric_and_improve_with_bits():
    prev = np.inf
    for b in range(1, 9):
        cb = get_codebook(64, b)
        assert cb.centroids.shape == (1 << b,) and np.all(np.diff(cb.centroids) > 0)
        np.testing.assert_allclose(cb.centroids, -cb.centroids[::-1], atol=1e-15)
        assert cb.mse < prev / 3  # roughly 4x per bit
        prev = cb.mse


def test_shipped_tables_equal_recomputation():
    tables = Path(cbm.__file__).parent / "tables"
    for d in cbm.TABLE_DIMS:
        data = json.loads((tables / f"lloyd_max_sphere_v1_d{d}.json").read_text())
        assert data["codebook"] == CODEBOOK_ID and data["dim"] == d
        for b in (1, 4, 8):
            fresh = lloyd_max_sphere(d, b)
            np.testing.assert_allclose(data["levels"][str(b)]["centroids"], fresh.centroids, rtol=1e-9, atol=1e-13)
            assert data["levels"][str(b)]["mse"] == pytest.approx(fresh.mse, rel=1e-9)


def test_quantize_picks_nearest_centroid():
    cb = get_codebook(64, 3)
    u = np.random.default_rng(2).standard_normal(1000) / 8
    nearest = np.argmin(np.abs(u[:, None] - cb.centroids[None, :]), axis=1)
    np.testing.assert_array_equal(cb.quantize(u), nearest)


def test_errors():
    with pytest.raises(TqedgeError):
        lloyd_max_sphere(64, 9)
    with pytest.raises(TqedgeError):
        lloyd_max_sphere(2, 2)

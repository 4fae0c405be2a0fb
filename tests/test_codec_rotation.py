"""Rotations: orthogonal, seeded, and the Hadamard one equal to H·diag(s)/sqrt(d)."""

from __future__ import annotations

import numpy as np
import pytest

from tqedge.codec.rotation import fwht, make_rotation
from tqedge.errors import TqedgeError


def _sylvester(d: int) -> np.ndarray:
    h = np.ones((1, 1))
    while h.shape[0] < d:
        h = np.block([[h, h], [h, -h]])
    return h


@pytest.mark.parametrize("kind,d", [("hadamard", 64), ("hadamard", 128), ("dense", 64), ("dense", 96)])
def test_orthogonal_and_deterministic(kind, d):
    r = make_rotation(kind, d, seed=7)
    np.testing.assert_allclose(r.matrix @ r.matrix.T, np.eye(d), atol=1e-12)
    np.testing.assert_array_equal(r.matrix, make_rotation(kind, d, seed=7).matrix)
    assert not np.array_equal(r.matrix, make_rotation(kind, d, seed=8).matrix)
    x = np.random.default_rng(0).standard_normal((5, d)).astype(np.float32)
    np.testing.assert_allclose(r.inverse(r.apply(x)), x, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(r.apply(x), axis=1), np.linalg.norm(x, axis=1), rtol=1e-5)


def test_fwht_matches_sylvester_matrix():
    x = np.random.default_rng(1).standard_normal((3, 32))
    np.testing.assert_allclose(fwht(x), x @ _sylvester(32).T / np.sqrt(32), atol=1e-12)


def test_hadamard_is_signed_hadamard():
    r = make_rotation("hadamard", 16, seed=3)
    h = _sylvester(16) / 4.0
    signs = np.diag(h.T @ r.matrix)  # R = H diag(s): H^T R = diag(s)
    assert set(np.round(signs).tolist()) <= {-1.0, 1.0}
    np.testing.assert_allclose(r.matrix, h * signs[None, :], atol=1e-12)


def test_dense_rotation_is_haar_like():
    # the mean of the matrices over seeds → 0 (QR sign-fixing removes the bias towards +I)
    mean = np.mean([make_rotation("dense", 8, s).matrix for s in range(400)], axis=0)
    assert np.abs(mean).max() < 0.2


def test_errors():
    with pytest.raises(TqedgeError, match="power-of-two"):
        make_rotation("hadamard", 48, 0)
    with pytest.raises(TqedgeError, match="unknown rotation"):
        make_rotation("givens", 8, 0)

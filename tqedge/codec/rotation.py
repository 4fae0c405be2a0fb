"""Seeded random rotations that make the coordinates of a unit vector ~ N(0, 1/d).

Two kinds, picked by name from :data:`ROTATIONS`:

- ``"hadamard"``: ``R = H · diag(s) / sqrt(d)`` with ``s`` random signs and ``H`` the Sylvester
  Walsh–Hadamard matrix (``d`` must be a power of two). Built with the fast Walsh–Hadamard
  transform (:func:`fwht`).
- ``"dense"``: a Haar-random orthogonal matrix, the QR factor of a Gaussian matrix with the
  signs of ``diag(R)`` folded in (Mezzadri 2007), any ``d``.

Both draw from ``numpy.random.default_rng(seed)``, so the same ``(kind, dim, seed)`` always gives
the same matrix. Head dimensions are small (64–256), so :meth:`Rotation.apply` multiplies by the
materialized ``(d, d)`` matrix (one BLAS call beats ``log2 d`` NumPy passes at these sizes).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from tqedge.errors import TqedgeError


def fwht(x: np.ndarray) -> np.ndarray:
    """Normalized fast Walsh–Hadamard transform along the last axis (Sylvester order).

    Args:
        x: array (..., d) with d a power of two.

    Returns:
        float64 array (..., d): ``x @ H.T / sqrt(d)`` (``H`` symmetric, so also ``x @ H / sqrt(d)``).
    """
    y = np.array(x, dtype=np.float64, copy=True)
    d = y.shape[-1]
    if d < 1 or d & (d - 1):
        raise TqedgeError(f"Walsh–Hadamard transform needs a power-of-two length, got {d}")
    lead = y.shape[:-1]
    h = 1
    while h < d:
        y = y.reshape(*lead, d // (2 * h), 2, h)  # (..., blocks, 2, h)
        a, b = y[..., 0, :], y[..., 1, :]
        y = np.stack((a + b, a - b), axis=-2)
        h *= 2
    return y.reshape(*lead, d) / np.sqrt(d)


@dataclass
class Rotation:
    """An orthogonal map of R^d. ``matrix`` is ``R``: rotated = ``R @ x``."""

    kind: str
    dim: int
    seed: int
    matrix: np.ndarray  # (d, d) float64, orthogonal
    matrix32: np.ndarray = field(init=False, repr=False)  # (d, d) float32 copy used by apply

    def __post_init__(self) -> None:
        self.matrix32 = np.ascontiguousarray(self.matrix, dtype=np.float32)

    def apply(self, x: np.ndarray) -> np.ndarray:
        """Rotate the last axis: ``(..., d) -> (..., d)`` float32, ``R @ x`` for each row."""
        return (np.asarray(x, dtype=np.float32) @ self.matrix32.T).astype(np.float32, copy=False)

    def inverse(self, y: np.ndarray) -> np.ndarray:
        """Undo :meth:`apply`: ``(..., d) -> (..., d)`` float32, ``R^T @ y`` for each row."""
        return (np.asarray(y, dtype=np.float32) @ self.matrix32).astype(np.float32, copy=False)


def _hadamard(dim: int, rng: np.random.Generator) -> np.ndarray:
    if dim & (dim - 1):
        raise TqedgeError(f"hadamard rotation needs a power-of-two dimension, got {dim} (use rotation='dense')")
    signs = rng.choice(np.array([-1.0, 1.0]), size=dim)  # (d,)
    # R = H diag(s)/sqrt(d): column j of R is s_j * fwht(e_j); fwht of the identity gives H/sqrt(d)
    return fwht(np.eye(dim)) * signs[None, :]  # (d, d)


def _dense(dim: int, rng: np.random.Generator) -> np.ndarray:
    g = rng.standard_normal((dim, dim))  # (d, d)
    q, r = np.linalg.qr(g)
    return q * np.sign(np.diag(r))[None, :]  # Haar-distributed orthogonal (d, d)


ROTATIONS = {"hadamard": _hadamard, "dense": _dense}


def make_rotation(kind: str, dim: int, seed: int) -> Rotation:
    """Build the seeded rotation ``kind`` of R^dim.

    Args:
        kind: ``"hadamard"`` or ``"dense"``.
        dim: dimension (a power of two for ``"hadamard"``).
        seed: seed of ``numpy.random.default_rng``.

    Returns:
        The :class:`Rotation`.
    """
    build = ROTATIONS.get(kind)
    if build is None:
        raise TqedgeError(f"unknown rotation {kind!r} (use {' or '.join(ROTATIONS)})")
    if dim < 1:
        raise TqedgeError(f"rotation dimension must be positive, got {dim}")
    return Rotation(kind, int(dim), int(seed), build(int(dim), np.random.default_rng(seed)))


def gaussian_sketch(dim: int, seed: int) -> np.ndarray:
    """The QJL sketch matrix ``S`` (dim, dim) with i.i.d. N(0, 1) entries, float64, seeded."""
    return np.random.default_rng(seed).standard_normal((dim, dim))

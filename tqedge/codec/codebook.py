"""Lloyd–Max codebooks for one coordinate of a uniformly random unit vector in R^d.

After a random rotation, each coordinate ``x`` of a unit vector has the density
(TurboQuant, Lemma 1)::

    f_d(x) = Γ(d/2) / (√π Γ((d-1)/2)) · (1 - x²)^((d-3)/2),   x in [-1, 1]

(→ N(0, 1/d) for large d). For each ``b = 1..8`` we solve the scalar Lloyd–Max problem for
``f_d`` numerically: cell masses and first moments by Gauss–Legendre quadrature inside every
cell (the density is smooth; its support is cut at ``min(1, 40/√d)``, beyond which the mass is
below 1e-300), started from the Panter–Dite companding point density ``∝ f^(1/3)``, and the
Lloyd conditions (boundaries = midpoints, centroids = conditional means) solved by Newton's
method until every centroid is within 1e-13 · σ of its cell's conditional mean. Results are cached per process; tables for d = 64, 128 and 256 (Gemma 3) ship in ``tables/``
(``python -m tqedge.codec.codebook tables`` rewrites them); any other d is computed on demand
(all eight bit widths in well under a second).

The codebook id stored in bundles is :data:`CODEBOOK_ID`.
"""

from __future__ import annotations

import functools
import json
import logging
import math
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np

from tqedge.errors import TqedgeError

log = logging.getLogger(__name__)

CODEBOOK_ID = "lloyd-max-sphere-v1"
MAX_BITS = 8
TABLE_DIMS = (64, 128, 256)
_GL_NODES = 48
_TOL = 1e-13
_MAX_ITERS = 200


@dataclass(frozen=True)
class Codebook:
    """A scalar quantizer: ``2**bits`` sorted centroids and the ``2**bits - 1`` boundaries between them.

    ``mse`` is the expected squared error of a whole unit vector, ``d · E[(x - c(x))²]``
    (the paper's ``D_mse``).
    """

    dim: int
    bits: int
    centroids: np.ndarray  # (2**bits,) float64, ascending
    boundaries: np.ndarray  # (2**bits - 1,) float64, midpoints of neighbouring centroids
    mse: float

    def quantize(self, u: np.ndarray) -> np.ndarray:
        """Index of the nearest centroid for each entry of ``u`` (uint8, same shape)."""
        return np.searchsorted(self.boundaries, u, side="right").astype(np.uint8)


def sphere_coordinate_pdf(x: np.ndarray, dim: int) -> np.ndarray:
    """Density of one coordinate of a uniform random point on the unit sphere of R^dim."""
    k = (dim - 3) / 2.0
    logc = math.lgamma(dim / 2.0) - 0.5 * math.log(math.pi) - math.lgamma((dim - 1) / 2.0)
    x = np.asarray(x, dtype=np.float64)
    inside = np.clip(1.0 - x * x, 0.0, None)
    return math.exp(logc) * inside**k  # d ≥ 3, so k ≥ 0 and the density is bounded


def _support(dim: int) -> float:
    return min(1.0, 40.0 / math.sqrt(dim))


def _cell_stats(edges: np.ndarray, dim: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Gauss–Legendre nodes and weights inside each cell: returns nodes (L, n), weights·f (L, n),
    masses (L,), first moments (L,)."""
    xi, wi = np.polynomial.legendre.leggauss(_GL_NODES)
    mid = 0.5 * (edges[1:] + edges[:-1])  # (L,)
    half = 0.5 * (edges[1:] - edges[:-1])  # (L,)
    nodes = mid[:, None] + half[:, None] * xi[None, :]  # (L, n)
    w = half[:, None] * wi[None, :] * sphere_coordinate_pdf(nodes, dim)  # (L, n)
    return nodes, w, w.sum(axis=1), (w * nodes).sum(axis=1)


def _companding_init(dim: int, levels: int) -> np.ndarray:
    lim = _support(dim)
    grid = np.linspace(-lim, lim, 40001)
    g = np.cbrt(sphere_coordinate_pdf(grid, dim))  # Panter–Dite optimal point density ∝ f^(1/3)
    cdf = np.concatenate(([0.0], np.cumsum(0.5 * (g[1:] + g[:-1]) * np.diff(grid))))
    cdf /= cdf[-1]
    return np.interp((np.arange(levels) + 0.5) / levels, cdf, grid)


def _lloyd_map(c: np.ndarray, dim: int, lim: float) -> tuple[np.ndarray, np.ndarray]:
    """One Lloyd step: the conditional means of the midpoint cells of ``c``, and the Jacobian of
    that map with respect to ``c`` (tridiagonal, from Leibniz's rule on the cell integrals)."""
    t = 0.5 * (c[1:] + c[:-1])  # (L-1,) boundaries
    _, _, mass, mom = _cell_stats(np.concatenate(([-lim], t, [lim])), dim)
    safe = np.where(mass > 0, mass, 1.0)
    g = np.where(mass > 0, mom / safe, c)  # (L,) centroids of the cells
    ft = sphere_coordinate_pdf(t, dim)  # (L-1,) density at the boundaries
    levels = c.size
    dg_dt = np.zeros((levels, levels - 1))  # d g_i / d t_k: cell i has edges t_{i-1}, t_i
    idx = np.arange(levels - 1)
    dg_dt[idx, idx] = ft * (t - g[:-1]) / safe[:-1]
    dg_dt[idx + 1, idx] = ft * (g[1:] - t) / safe[1:]
    dt_dc = np.zeros((levels - 1, levels))
    dt_dc[idx, idx] = dt_dc[idx, idx + 1] = 0.5
    return g, dg_dt @ dt_dc


def lloyd_max_sphere(dim: int, bits: int) -> Codebook:
    """Compute the Lloyd–Max codebook of ``bits`` bits for the coordinate density of R^dim.

    Solves the Lloyd–Max conditions (centroid = conditional mean of its cell, boundary =
    midpoint) with Newton's method on the Lloyd map (quadratic convergence; plain Lloyd needs
    tens of thousands of steps at 7–8 bits), damped by backtracking, from the companding start.

    Args:
        dim: vector dimension d ≥ 3.
        bits: 1..8.

    Returns:
        The converged :class:`Codebook` (symmetric about 0).
    """
    if not 1 <= bits <= MAX_BITS:
        raise TqedgeError(f"codebook bits must be in 1..{MAX_BITS}, got {bits}")
    if dim < 3:
        raise TqedgeError(f"codebook dimension must be at least 3, got {dim}")
    levels = 1 << bits
    lim, sigma = _support(dim), 1.0 / math.sqrt(dim)
    c = _companding_init(dim, levels)
    g, jac = _lloyd_map(c, dim, lim)
    resid = np.max(np.abs(g - c))
    for it in range(_MAX_ITERS):
        if resid < _TOL * sigma:
            break
        step = np.linalg.solve(jac - np.eye(levels), g - c)  # Newton on F(c) = g(c) - c
        lam = 1.0
        while True:
            cand = c - lam * step
            cand = 0.5 * (cand - cand[::-1])  # the density is even: keep the codebook symmetric
            ok = np.all(np.diff(cand) > 0) and np.all(np.abs(cand) < lim)
            if ok:
                g2, jac2 = _lloyd_map(cand, dim, lim)
                r2 = np.max(np.abs(g2 - cand))
                if r2 < resid or lam < 1e-3:
                    break
            lam *= 0.5
            if lam < 1e-3:  # Newton does not help here: take a plain Lloyd step
                cand = 0.5 * (g - g[::-1])
                g2, jac2 = _lloyd_map(cand, dim, lim)
                r2 = np.max(np.abs(g2 - cand))
                break
        c, g, jac, resid = cand, g2, jac2, r2
    else:
        log.warning("Lloyd–Max d=%d b=%d stopped after %d iterations (residual %.2e)", dim, bits, _MAX_ITERS, resid)
    edges = np.concatenate(([-lim], 0.5 * (c[1:] + c[:-1]), [lim]))
    nodes, w, _, _ = _cell_stats(edges, dim)
    mse = dim * float((w * (nodes - c[:, None]) ** 2).sum())
    log.debug("Lloyd–Max d=%d b=%d: %d Newton steps, D_mse=%.6g", dim, bits, it, mse)
    return Codebook(dim, bits, c, 0.5 * (c[1:] + c[:-1]), mse)


def _table_name(dim: int) -> str:
    return f"{CODEBOOK_ID.replace('-', '_')}_d{dim}.json"


def _load_table(dim: int) -> dict | None:
    try:
        text = resources.files("tqedge.codec").joinpath("tables", _table_name(dim)).read_text()
    except (FileNotFoundError, OSError):
        return None
    data = json.loads(text)
    if data.get("codebook") != CODEBOOK_ID or data.get("dim") != dim:
        raise TqedgeError(f"codebook table {_table_name(dim)} does not hold {CODEBOOK_ID} for d={dim}")
    return data


@functools.cache
def get_codebook(dim: int, bits: int) -> Codebook:
    """The ``lloyd-max-sphere-v1`` codebook for (dim, bits): from the shipped table, else computed.

    Args:
        dim: vector dimension d ≥ 3.
        bits: 1..8.

    Returns:
        The :class:`Codebook` (cached for the process).
    """
    table = _load_table(dim) if dim in TABLE_DIMS else None
    if table is not None and str(bits) in table["levels"]:
        e = table["levels"][str(bits)]
        c = np.asarray(e["centroids"], dtype=np.float64)
        return Codebook(dim, bits, c, 0.5 * (c[1:] + c[:-1]), float(e["mse"]))
    return lloyd_max_sphere(dim, bits)


def write_table(dim: int, out_dir: Path) -> Path:
    """Compute all bit widths for ``dim`` and write ``<out_dir>/lloyd_max_sphere_v1_d<dim>.json``."""
    levels = {}
    for b in range(1, MAX_BITS + 1):
        cb = lloyd_max_sphere(dim, b)
        levels[str(b)] = {"centroids": cb.centroids.tolist(), "mse": cb.mse}
    path = Path(out_dir) / _table_name(dim)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"codebook": CODEBOOK_ID, "dim": dim, "levels": levels}, indent=1) + "\n")
    return path


if __name__ == "__main__":  # python -m tqedge.codec.codebook tables
    import sys

    if sys.argv[1:] != ["tables"]:
        raise SystemExit("usage: python -m tqedge.codec.codebook tables")
    for d in TABLE_DIMS:
        print(write_table(d, Path(__file__).parent / "tables"))

"""The sampled path of :func:`tqedge.runtime.sampling.make_sampler` in one nopython call.

Same filters, same order and the same draw as the NumPy sampler (temperature → top-k → top-p →
min-p, then the inverse CDF at ``u * total``; :mod:`tqedge.runtime.sampling`), in three
Python-level calls instead of ~55 and without the float64 softmax over the whole vocabulary
(NumPy has no SIMD float64 exp on AVX2: 1.3 ms for SmolLM2's 49K tokens here, 0.18 ms in
float32). Top-p computes the vocabulary's total mass with float32 exponentials (relative error
~1e-7, summed in float64) and float64 probabilities only for the tokens that can be in the
nucleus (:func:`_nucleus_candidates`); candidates of equal probability are ordered by token id.
So a nucleus boundary within ~1e-7 of ``p`` can fall the other way, and a draw landing exactly
on a boundary may pick the neighbour: tests/test_sampling.py checks the distribution and
agreement with the NumPy sampler draw by draw. Used when the Numba kernels are
(``tqedge.codec.kernels.BACKEND``).
"""

from __future__ import annotations

import numpy as np

from tqedge.codec.numba_runtime import njit


@njit(nogil=True)
def _softmax(x):
    e = np.exp(x - x.max())
    return e / e.sum()


@njit(nogil=True)
def _nucleus_candidates(x, mx, top_p):
    """(positions that can be in the nucleus, the vocabulary's total mass z = sum(exp(x - mx))).

    One pass of float32 exponentials (a float64 exp is ~8× slower here) gives z, summed in
    float64; the candidates are the tokens within a factor 2^-10, 2^-20, ... of the most likely
    whose (float32) mass reaches ``top_p``: no token below them can be in the nucleus, since all
    of them are more likely. The caller checks that mass again in float64."""
    n = x.shape[0]
    e = np.empty(n, np.float32)
    z = 0.0
    for i in range(n):
        e[i] = np.exp(np.float32(x[i] - mx))
        z += e[i]
    for k in range(1, 15):
        thr = np.float32(2.0 ** (-10 * k))
        mass = 0.0
        for i in range(n):
            if e[i] >= thr:
                mass += e[i]
        if mass >= top_p * z:
            return np.flatnonzero(e >= thr), z
    return np.arange(n), z


@njit(nogil=True)
def sample(logits, temperature, top_k, top_p, min_p, u):
    """A token id from ``logits`` (V,) filtered as ``sampling.candidates`` and drawn at ``u`` ∈ [0, 1)."""
    x = logits.astype(np.float64) / temperature
    idx = np.arange(x.shape[0])
    if 0 < top_k < x.shape[0]:
        kth = np.partition(x, x.shape[0] - top_k)[x.shape[0] - top_k]
        keep = np.flatnonzero(x >= kth)
        idx, x = idx[keep], x[keep]
    if top_p < 1.0:
        mx = x.max()
        cand, z = _nucleus_candidates(x, mx, top_p)
        pc = np.exp(x[cand] - mx) / z
        if pc.sum() < top_p:  # (float32 rounding at the edge) all of them
            cand = np.arange(x.shape[0])
            pc = np.exp(x - mx) / z
        order = np.argsort(-pc, kind="mergesort")  # descending, stable
        before = np.cumsum(pc[order]) - pc[order]  # the mass strictly above each token
        keep = cand[order[before < top_p]]
        idx, x = idx[keep], x[keep]
    if min_p > 0.0:
        probs = _softmax(x)
        keep = np.flatnonzero(probs >= min_p * probs.max())
        idx, x = idx[keep], x[keep]
    cdf = np.cumsum(_softmax(x))
    i = np.searchsorted(cdf, u * cdf[-1], side="right")
    return idx[min(i, idx.shape[0] - 1)]

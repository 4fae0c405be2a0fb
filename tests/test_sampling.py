"""Samplers and logits processors against independent oracles: transformers' warpers and
processors, a straightforward full-sort NumPy reference, and the empirical distribution."""

from __future__ import annotations

import numpy as np
import pytest

from tqedge.errors import TqedgeError
from tqedge.runtime import sampling as S

torch = pytest.importorskip("torch")
lp = pytest.importorskip("transformers.generation.logits_process")


def _hf(warper, logits: np.ndarray) -> np.ndarray:
    return warper(torch.zeros((1, 1), dtype=torch.long), torch.tensor(logits[None], dtype=torch.float64))[0].numpy()


def _ref_top_p(logits: np.ndarray, p: float) -> np.ndarray:
    """Full sort: keep a token when the mass strictly more likely than it is < p."""
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    order = np.argsort(-probs, kind="stable")
    before = np.concatenate([[0.0], np.cumsum(probs[order])[:-1]])
    keep = np.zeros(len(logits), bool)
    keep[order[before < p]] = True
    return np.where(keep, logits, -np.inf)


def _logits(rng, v, spread):
    return rng.normal(0, spread, v)


@pytest.mark.parametrize("k", [1, 5, 50, 999])
def test_top_k_matches_transformers(k):
    rng = np.random.default_rng(k)
    x = _logits(rng, 1000, 3.0)
    ours = S.apply_top_k(x, k)
    theirs = _hf(lp.TopKLogitsWarper(k), x)
    np.testing.assert_array_equal(np.isinf(ours), np.isinf(theirs))
    assert np.isfinite(ours).sum() == k


@pytest.mark.parametrize("p", [0.05, 0.5, 0.9, 0.99])
@pytest.mark.parametrize("spread", [0.3, 3.0])  # flat: nucleus wider than the 256 candidates
def test_top_p_matches_transformers_and_full_sort(p, spread):
    rng = np.random.default_rng(int(p * 100))
    x = _logits(rng, 5000, spread)
    ours = S.apply_top_p(x, p)
    ref = _ref_top_p(x, p)
    theirs = _hf(lp.TopPLogitsWarper(p), x)
    np.testing.assert_array_equal(np.isinf(ours), np.isinf(ref))
    np.testing.assert_array_equal(np.isinf(ours), np.isinf(theirs))
    np.testing.assert_array_equal(ours[np.isfinite(ours)], x[np.isfinite(ours)])
    probs = np.exp(x - x.max()) / np.exp(x - x.max()).sum()
    assert probs[np.isfinite(ours)].sum() >= p  # the kept set reaches the mass


@pytest.mark.parametrize("min_p", [0.01, 0.1, 0.5])
def test_min_p_matches_transformers(min_p):
    rng = np.random.default_rng(7)
    x = _logits(rng, 2000, 2.0)
    ours = S.apply_min_p(x, min_p)
    theirs = _hf(lp.MinPLogitsWarper(min_p), x)
    np.testing.assert_array_equal(np.isinf(ours), np.isinf(theirs))


def test_filter_chain_matches_transformers_chain():
    rng = np.random.default_rng(3)
    x = _logits(rng, 3000, 2.5)
    ours = S.filter_logits(x, temperature=0.7, top_k=200, top_p=0.8, min_p=0.05)
    t = _hf(lp.TemperatureLogitsWarper(0.7), x)
    for w in (lp.TopKLogitsWarper(200), lp.TopPLogitsWarper(0.8), lp.MinPLogitsWarper(0.05)):
        t = _hf(w, t)
    np.testing.assert_array_equal(np.isinf(ours), np.isinf(t))
    np.testing.assert_allclose(ours[np.isfinite(ours)], t[np.isfinite(t)], rtol=1e-12)


def test_greedy_is_argmax():
    rng = np.random.default_rng(0)
    sampler = S.make_sampler(temperature=0)
    for _ in range(20):
        x = rng.normal(size=100).astype(np.float32)
        assert sampler(x) == int(np.argmax(x))


@pytest.fixture(params=["numba", "numpy"])
def sampler_backend(request, monkeypatch):
    """make_sampler's nopython sampler (with the Numba kernels) and its NumPy twin."""
    from tqedge.codec import kernels

    if request.param == "numba":
        pytest.importorskip("numba")
    monkeypatch.setattr(kernels, "BACKEND", request.param)
    return request.param


def test_sampled_distribution_matches_filtered_softmax(sampler_backend):
    rng = np.random.default_rng(11)
    x = rng.normal(0, 1.5, 12)
    settings = dict(temperature=0.8, top_k=8, top_p=0.9, min_p=0.02)
    sampler = S.make_sampler(seed=123, **settings)
    n = 15000
    counts = np.bincount([sampler(x) for _ in range(n)], minlength=12)
    f = S.filter_logits(x, **settings)
    expected = np.exp(f - f.max())
    expected /= expected.sum()
    assert counts[expected == 0].sum() == 0  # masked tokens are never drawn
    # every kept token within 5 standard errors of its probability
    se = np.sqrt(expected * (1 - expected) / n)
    assert np.all(np.abs(counts / n - expected) <= 5 * se + 1e-12)


def test_seed_reproducible_and_seeds_differ(sampler_backend):
    rng = np.random.default_rng(5)
    xs = [rng.normal(0, 1, 500) for _ in range(50)]

    def draw(seed):
        s = S.make_sampler(temperature=1.0, top_p=0.95, seed=seed)
        return [s(x) for x in xs]

    assert draw(42) == draw(42)
    assert draw(42) != draw(43)


@pytest.mark.parametrize("penalty", [1.3, 0.7])
def test_repetition_penalty_matches_transformers(penalty):
    rng = np.random.default_rng(2)
    x = rng.normal(0, 2, 300).astype(np.float32)
    tokens = rng.integers(0, 300, 40)
    (proc,) = S.make_logits_processors(repetition_penalty=penalty)
    ours = proc(tokens, x)
    hf = lp.RepetitionPenaltyLogitsProcessor(penalty)
    theirs = hf(torch.tensor(tokens[None]), torch.tensor(x[None]))[0].numpy()
    np.testing.assert_allclose(ours, theirs, rtol=1e-6)
    assert not np.shares_memory(ours, x)


def test_repetition_penalty_context_window():
    x = np.ones(10, np.float32)
    (proc,) = S.make_logits_processors(repetition_penalty=2.0, context_size=2)
    out = proc(np.array([1, 2, 3]), x)
    np.testing.assert_array_equal(np.flatnonzero(out != 1.0), [2, 3])


def test_presence_frequency_penalties():
    x = np.zeros(5, np.float32)
    (proc,) = S.make_logits_processors(presence_penalty=0.5, frequency_penalty=0.25)
    out = proc(np.array([1, 1, 1, 3]), x)
    np.testing.assert_allclose(out, [0, -(0.5 + 0.75), 0, -(0.5 + 0.25), 0])


def test_neutral_settings_add_no_processors():
    assert S.make_logits_processors() == []
    assert S.make_logits_processors(repetition_penalty=1.0, presence_penalty=0.0) == []


@pytest.mark.parametrize("bad", [dict(temperature=-1), dict(top_k=-2), dict(top_p=0.0), dict(top_p=1.5),
                                 dict(min_p=1.0)])
def test_bad_settings_raise(bad):
    with pytest.raises(TqedgeError):
        S.make_sampler(**{"temperature": 1.0, **bad})


def test_bad_penalty_raises():
    with pytest.raises(TqedgeError, match="repetition_penalty"):
        S.make_logits_processors(repetition_penalty=0)


def test_nopython_sampler_draws_what_the_numpy_sampler_draws():
    """runtime/sampling_numba.py (the sampler when the Numba kernels run) against the NumPy
    filters drawn at the same u: random vocabularies, temperatures and filter settings."""
    pytest.importorskip("numba")
    from tqedge.runtime.sampling_numba import sample

    rng = np.random.default_rng(7)
    draws = differ = 0
    for _ in range(200):
        v = int(rng.integers(10, 50_000))
        logits = (rng.standard_normal(v) * rng.uniform(0.5, 6)).astype(np.float32)
        t = float(rng.uniform(0.2, 1.5))
        k, p, mp = int(rng.choice([0, 5, 50, 1000])), float(rng.choice([1.0, 0.99, 0.9, 0.5])), float(rng.choice([0.0, 0.05]))
        idx, x = S.candidates(logits, t, k, p, mp)
        cdf = np.cumsum(S._softmax(x))
        for u in rng.random(20):
            want = int(idx[min(int(np.searchsorted(cdf, u * cdf[-1], side="right")), len(idx) - 1)])
            draws += 1
            differ += int(sample(logits, t, k, p, mp, u)) != want
    assert draws == 4000 and differ <= 2  # only a draw on a boundary within float32 rounding may differ

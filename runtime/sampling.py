"""Turning logits into the next token: samplers and logits processors (mlx-lm style).

A *sampler* is ``sampler(logits (V,)) -> int``; a *logits processor* is
``processor(tokens (N,) int64, logits (V,)) -> logits (V,)`` where ``tokens`` is the sequence
so far (prompt + generated). Both are plain closures built once per request, so a generation
loop does no option parsing per token.

Filter semantics follow Hugging Face ``transformers`` (the order is temperature → top-k →
top-p → min-p, as in ``GenerationConfig``), so a bundle's ``generation`` defaults mean the same
thing here as on the Hub. Everything is vectorized NumPy: top-k uses ``np.partition`` and top-p
sorts only the few hundred candidates that can matter, not the whole vocabulary.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from tqedge.errors import TqedgeError

Sampler = Callable[[np.ndarray], int]
LogitsProcessor = Callable[[np.ndarray, np.ndarray], np.ndarray]

# top-p first tries the TOP_P_CANDIDATES most likely tokens; only when their mass is below
# top_p does it sort the whole vocabulary.
TOP_P_CANDIDATES = 256


def _check_sampling(temperature: float, top_k: int, top_p: float, min_p: float) -> None:
    if temperature < 0:
        raise TqedgeError(f"temperature must be ≥ 0 (0 = greedy), not {temperature}")
    if top_k < 0:
        raise TqedgeError(f"top_k must be ≥ 0 (0 = off), not {top_k}")
    if not 0.0 < top_p <= 1.0:
        raise TqedgeError(f"top_p must be in (0, 1] (1 = off), not {top_p}")
    if not 0.0 <= min_p < 1.0:
        raise TqedgeError(f"min_p must be in [0, 1) (0 = off), not {min_p}")


def _softmax(x: np.ndarray) -> np.ndarray:
    """Softmax in float64 of logits that may hold -inf."""
    e = np.exp(x - x.max())  # (n,)
    return e / e.sum()


# Each filter maps the surviving candidates (token ids ``idx`` (n,), their logits ``x`` (n,))
# to a subset, so after top-k every later step works on k values, not the vocabulary.

def _top_k(idx: np.ndarray, x: np.ndarray, k: int):
    """Keep logits ≥ the k-th largest (ties at the boundary are kept, as in HF)."""
    if k <= 0 or k >= len(x):
        return idx, x
    kth = np.partition(x, -k)[-k]
    keep = np.flatnonzero(x >= kth)
    return idx[keep], x[keep]


def _top_p(idx: np.ndarray, x: np.ndarray, p: float):
    """Nucleus: keep a token when the mass of the tokens more likely than it is below ``p``
    (the most likely token always survives); HF's ``TopPLogitsWarper`` rule. Sorts only the
    :data:`TOP_P_CANDIDATES` most likely tokens unless the nucleus is wider than those."""
    if p >= 1.0:
        return idx, x
    probs = _softmax(x)  # (n,)
    n = len(probs)
    m = min(TOP_P_CANDIDATES, n)
    cand = np.argpartition(probs, n - m)[n - m:] if m < n else np.arange(n)  # (m,)
    if probs[cand].sum() < p:  # the nucleus is wider than the candidates: sort everything
        cand = np.arange(n)
    order = cand[np.argsort(-probs[cand], kind="stable")]  # (m,) descending
    before = np.cumsum(probs[order]) - probs[order]  # mass strictly above each token
    keep = order[before < p]
    return idx[keep], x[keep]


def _min_p(idx: np.ndarray, x: np.ndarray, min_p: float):
    """Drop tokens whose probability is below ``min_p`` × the top token's probability."""
    if min_p <= 0.0:
        return idx, x
    probs = _softmax(x)
    keep = np.flatnonzero(probs >= min_p * probs.max())
    return idx[keep], x[keep]


def candidates(logits: np.ndarray, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
               min_p: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """The tokens a sampler may draw and their temperature-scaled logits.

    Filters run in Hugging Face's order: temperature → top-k → top-p → min-p.

    Args:
        logits: (V,) raw logits.
        temperature: > 0.
        top_k, top_p, min_p: filters; 0 / 1.0 / 0.0 disable them.

    Returns:
        (token ids (n,) int64, float64 logits (n,)); their softmax is the sampling distribution.
    """
    x = np.asarray(logits, dtype=np.float64) / temperature  # (V,)
    idx = np.arange(len(x))
    idx, x = _top_k(idx, x, top_k)
    idx, x = _top_p(idx, x, top_p)
    return _min_p(idx, x, min_p)


def _masked(logits: np.ndarray, idx: np.ndarray, x: np.ndarray) -> np.ndarray:
    out = np.full(np.shape(logits), -np.inf)
    out[idx] = x
    return out


def apply_top_k(logits: np.ndarray, k: int) -> np.ndarray:
    """``logits`` with everything outside the top k set to -inf."""
    return _masked(logits, *_top_k(np.arange(len(logits)), np.asarray(logits, np.float64), k))


def apply_top_p(logits: np.ndarray, p: float) -> np.ndarray:
    """``logits`` with everything outside the nucleus of mass ``p`` set to -inf."""
    return _masked(logits, *_top_p(np.arange(len(logits)), np.asarray(logits, np.float64), p))


def apply_min_p(logits: np.ndarray, min_p: float) -> np.ndarray:
    """``logits`` with tokens below ``min_p`` × the top probability set to -inf."""
    return _masked(logits, *_min_p(np.arange(len(logits)), np.asarray(logits, np.float64), min_p))


def filter_logits(logits: np.ndarray, temperature: float = 1.0, top_k: int = 0,
                  top_p: float = 1.0, min_p: float = 0.0) -> np.ndarray:
    """Temperature-scaled, filtered (V,) float64 logits, masked entries -inf (see :func:`candidates`)."""
    return _masked(logits, *candidates(logits, temperature, top_k, top_p, min_p))


def make_sampler(temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                 min_p: float = 0.0, seed: int | None = None) -> Sampler:
    """Build a sampler ``logits (V,) -> token id``.

    Args:
        temperature: 0 means greedy (argmax); otherwise the softmax temperature.
        top_k: keep the k most likely tokens (0 = off).
        top_p: nucleus mass (1.0 = off).
        min_p: drop tokens below ``min_p`` × the top probability (0 = off).
        seed: seed of the sampler's own ``numpy.random.Generator``; the same seed and logits
            give the same tokens.

    Returns:
        A callable; it keeps its random state between calls (one per request).
    """
    temperature, top_k, top_p, min_p = float(temperature), int(top_k), float(top_p), float(min_p)
    _check_sampling(temperature, top_k, top_p, min_p)
    if temperature == 0.0:
        return lambda logits: int(logits.argmax())  # (the method: one call per token, not four)
    rng = np.random.default_rng(seed)
    from tqedge.codec import kernels

    if kernels.BACKEND == "numba":  # the same filters and draw in one nopython call
        from tqedge.runtime.sampling_numba import sample as nopython

        return lambda logits: int(nopython(logits, temperature, top_k, top_p, min_p, rng.random()))

    def sample(logits: np.ndarray) -> int:
        idx, x = candidates(logits, temperature, top_k, top_p, min_p)  # (n,), (n,)
        cdf = np.cumsum(_softmax(x))
        i = int(np.searchsorted(cdf, rng.random() * cdf[-1], side="right"))
        return int(idx[min(i, len(idx) - 1)])

    return sample


# -- logits processors ----------------------------------------------------------------------

def _context(tokens: np.ndarray, size: int | None) -> np.ndarray:
    tokens = np.asarray(tokens, dtype=np.int64)
    return tokens[-size:] if size else tokens


def repetition_penalty_processor(penalty: float, context_size: int | None = None) -> LogitsProcessor:
    """Hugging Face repetition penalty (Keskar et al. 2019): for every token already in the
    sequence, a positive logit is divided by ``penalty`` and a negative one multiplied by it.

    Args:
        penalty: > 0; 1.0 is off, > 1 discourages repeats.
        context_size: only look at the last ``context_size`` tokens (None = all, as HF does).
    """
    if penalty <= 0:
        raise TqedgeError(f"repetition_penalty must be > 0, not {penalty}")

    def process(tokens: np.ndarray, logits: np.ndarray) -> np.ndarray:
        seen = np.unique(_context(tokens, context_size))
        if seen.size == 0:
            return logits
        out = np.array(logits, copy=True)
        s = out[seen]
        out[seen] = np.where(s < 0, s * penalty, s / penalty)
        return out

    return process


def presence_frequency_processor(presence: float, frequency: float,
                                 context_size: int | None = None) -> LogitsProcessor:
    """OpenAI-style penalties: subtract ``presence`` once per seen token and ``frequency`` per
    occurrence (used by the server's ``presence_penalty`` / ``frequency_penalty``)."""

    def process(tokens: np.ndarray, logits: np.ndarray) -> np.ndarray:
        ctx = _context(tokens, context_size)
        if ctx.size == 0:
            return logits
        ids, counts = np.unique(ctx, return_counts=True)
        out = np.array(logits, dtype=np.float32, copy=True)
        out[ids] -= presence + frequency * counts
        return out

    return process


def make_logits_processors(repetition_penalty: float = 1.0, presence_penalty: float = 0.0,
                           frequency_penalty: float = 0.0, context_size: int | None = None,
                           logit_bias: dict[int, float] | None = None) -> list[LogitsProcessor]:
    """The processors a request needs (neutral settings add none).

    Args:
        repetition_penalty: HF repetition penalty (1.0 = off).
        presence_penalty, frequency_penalty: OpenAI penalties (0 = off).
        context_size: how many recent tokens the penalties look at (None = all).
        logit_bias: token id → value added to its logit.

    Returns:
        A list of ``processor(tokens, logits) -> logits``, applied in order.
    """
    procs: list[LogitsProcessor] = []
    if repetition_penalty is not None and float(repetition_penalty) != 1.0:
        procs.append(repetition_penalty_processor(float(repetition_penalty), context_size))
    if presence_penalty or frequency_penalty:
        procs.append(presence_frequency_processor(float(presence_penalty or 0.0),
                                                  float(frequency_penalty or 0.0), context_size))
    if logit_bias:
        ids = np.fromiter(logit_bias.keys(), dtype=np.int64)
        vals = np.fromiter(logit_bias.values(), dtype=np.float32)

        def bias(tokens: np.ndarray, logits: np.ndarray) -> np.ndarray:
            out = np.array(logits, copy=True)
            out[ids] += vals
            return out

        procs.append(bias)
    return procs


def apply_processors(processors: Sequence[LogitsProcessor], tokens: np.ndarray,
                     logits: np.ndarray) -> np.ndarray:
    """Run ``processors`` in order on ``logits`` given the sequence ``tokens``."""
    for proc in processors:
        logits = proc(tokens, logits)
    return logits

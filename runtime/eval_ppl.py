"""Perplexity of a bundle over a text with a given KV cache, scored against the exact cache.

Every scored token's attention reads the cache the way the runtime stores it: the compressed
cache applies one read rule in decode and prefill (fp16 sinks and recent window, TurboQuant
codes beyond), so a chunked prefill with ``logits="all"`` gives, for each position, the logits
a token-by-token decode would give. The text is cut into non-overlapping windows of ``ctx``
tokens (BOS first when the tokenizer adds one); each window starts from an empty cache and
every position but the last predicts its next token.

Each window is run once with the exact float32 cache and once per configuration, chunk by
chunk in lock step, so the exact logits never have to be stored. Per configuration:

- ``ppl``: ``exp(mean NLL)`` of the scored tokens, ``ppl_exact`` the same with the exact cache;
- ``delta_pct``: ``100 · (ppl / ppl_exact − 1)``;
- ``kl``: mean ``KL(p_exact ‖ p_config)`` of the next-token distributions (nats);
- ``top1_agree``: share of positions whose argmax equals the exact cache's;
- ``ppl_last_quarter`` (and ``_exact``): the same over only the last quarter of each window,
  where most of what a token attends to lies beyond the fp16 window;
- ``ppl_second_half`` (and ``_exact``): over the second half of each window, the tokens
  ``llama-perplexity`` scores (comparable with its numbers at the same ``ctx``).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from tqedge.errors import TqedgeError

log = logging.getLogger(__name__)

EVAL_CHUNK = 512  # tokens per forward call (the runtime's prefill chunk)
EXACT = "exact"


@dataclass(frozen=True)
class KVConfig:
    """One KV-cache configuration to evaluate.

    Args:
        name: label in tables.
        kv_bits: "exact" (fp32), "fp16" (the exact cache in float16), "4,3" / "3.5,2.5"
            (TurboQuant key,value bits), or None for the bundle's default.
        window, sinks: fp16 recent window and sink tokens (None = bundle default).
        qjl: TurboQuant_prod keys (None = bundle default).
        norm: "corrected" | "plain" (None = bundle default).
        rotation: "hadamard" | "dense" (None = bundle default).
        layer_bits: per-layer ``{layer: (key_bits, value_bits)}`` overrides on top of ``kv_bits``.
        kv_budget: cache byte budget; None = large enough for the whole window (no eviction).
    """

    name: str
    kv_bits: str | None = None
    window: int | None = None
    sinks: int | None = None
    qjl: bool | None = None
    norm: str | None = None
    rotation: str | None = None
    layer_bits: dict | None = None
    kv_budget: str | int | None = None

    def describe(self) -> dict:
        """The configuration as plain JSON-able values (None fields dropped)."""
        d = {k: v for k, v in dataclasses.asdict(self).items() if v is not None}
        if self.layer_bits:
            d["layer_bits"] = {str(k): list(v) for k, v in self.layer_bits.items()}
        return d


def build_cache(model, cfg: KVConfig, tokens: int):
    """A cache for ``cfg`` holding at least ``tokens`` tokens (or sized from ``cfg.kv_budget``).

    Returns:
        (cache, bytes_per_token): the cache and its bytes per stored token beyond the fixed
        fp16 sinks/window (scales included; for exact caches, bytes per token).
    """
    from tqedge.runtime.cache import ExactKVCache, make_cache
    from tqedge.runtime.memory import kv_bytes

    a = model.manifest.architecture
    bits = (cfg.kv_bits or "").strip().lower()
    if bits in (EXACT, "fp32", "fp16"):
        dtype = np.float16 if bits == "fp16" else np.float32
        per = ExactKVCache.bytes_per_token(a.num_layers, a.num_kv_heads, a.head_dim, dtype)
        budget = _budget(cfg.kv_budget, per * (tokens + 8))
        sinks = model.manifest.kv.sinks if cfg.sinks is None else cfg.sinks
        if any(a.layer_window(i) is not None for i in range(a.num_layers)):  # sliding layers: per-layer layout
            if bits == "fp16":
                raise TqedgeError("an exact fp16 cache is not available for sliding-window models; use exact")
            cache = make_cache(model.manifest, kv_budget=budget, kv_bits="exact", sinks=sinks, policy="slide")
            return cache, cache.bytes_per_token
        cache = ExactKVCache.from_budget(budget, a.num_layers, a.num_kv_heads, a.head_dim, sinks, "slide", dtype)
        return cache, per
    manifest = model.manifest
    kv_bits = cfg.kv_bits
    if cfg.layer_bits:  # per-layer overrides go through the bundle's own KVSpec.layer_bits path
        base = _parse_bits(cfg.kv_bits) if cfg.kv_bits else (manifest.kv.key_bits, manifest.kv.value_bits)
        layer_bits = {str(k): [float(b) for b in v] for k, v in cfg.layer_bits.items()}
        kv = dataclasses.replace(manifest.kv, key_bits=base[0], value_bits=base[1], layer_bits=layer_bits)
        manifest, kv_bits = dataclasses.replace(manifest, kv=kv), None
    opts = dict(kv_bits=kv_bits, window=cfg.window, sinks=cfg.sinks, policy="slide",
                rotation=cfg.rotation, norm=cfg.norm, qjl=cfg.qjl)
    # sized from the codecs' layout, allocating nothing: a throwaway cache's zeroed buffers, freed,
    # stayed in the heap and came back touched under the real one (+37 MiB RSS at 512 tokens)
    need = kv_bytes(manifest, tokens, **opts)
    cache = make_cache(manifest, kv_budget=_budget(cfg.kv_budget, need), **opts)
    return cache, cache.bytes_per_token


def _budget(given, default: int) -> int:
    from tqedge.units import parse_bytes

    return parse_bytes(given) if given is not None else int(default)


def _parse_bits(kv_bits) -> tuple[float, float]:
    from tqedge.runtime.kv_spec import parse_kv_bits

    bits = parse_kv_bits(kv_bits)
    if bits is None:
        raise TqedgeError(f"layer_bits needs TurboQuant kv_bits, not {kv_bits!r}")
    return bits


def text_windows(model, text: str, ctx: int, windows: int | None = None) -> list[list[int]]:
    """Non-overlapping windows of ``ctx`` token ids from ``text`` (BOS first when the bundle adds it).

    Args:
        model: a loaded model (its tokenizer and manifest).
        text: the evaluation text.
        ctx: tokens per window (≥ 2).
        windows: at most this many windows (None = all that fit).

    Returns:
        A list of windows, each a list of ``ctx`` ids.
    """
    if ctx < 2:
        raise TqedgeError(f"--ctx must be at least 2 tokens, got {ctx}")
    tok = model.manifest.tokenizer
    bos = [tok.bos_token_id] if tok.add_bos_token and tok.bos_token_id is not None else []
    step = ctx - len(bos)
    need = None if windows is None else windows * step
    ids = _encode_prefix(model, text, need)
    n = len(ids) // step if windows is None else min(windows, len(ids) // step)
    if n < 1:
        raise TqedgeError(f"the text has {len(ids)} tokens, fewer than one window of {ctx}")
    if windows is not None and n < windows:
        log.warning("text holds only %d windows of %d tokens (asked for %d)", n, ctx, windows)
    return [bos + ids[i * step:(i + 1) * step] for i in range(n)]


def _encode_prefix(model, text: str, need: int | None) -> list[int]:
    """Token ids of ``text`` (without special tokens), or of a prefix long enough for ``need``."""
    if need is None:
        return model.tokenizer.encode(text, add_special_tokens=False).ids
    chars = max(4096, need * 8)
    while True:
        ids = model.tokenizer.encode(text[:chars], add_special_tokens=False).ids
        if len(ids) > need + 1 or chars >= len(text):
            return ids[:need] if chars < len(text) else ids
        chars *= 2


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise log-softmax in float64: (T, V) → (T, V)."""
    x = logits.astype(np.float64)  # (T, V)
    x -= x.max(axis=-1, keepdims=True)
    x -= np.log(np.exp(x).sum(axis=-1, keepdims=True))
    return x


@dataclass
class Tally:
    """Running sums for one configuration."""

    nll: float = 0.0
    nll_exact: float = 0.0
    kl: float = 0.0
    top1: int = 0
    tokens: int = 0
    nll_lq: float = 0.0
    nll_lq_exact: float = 0.0
    tokens_lq: int = 0
    nll_h2: float = 0.0
    nll_h2_exact: float = 0.0
    tokens_h2: int = 0
    per_window: list = field(default_factory=list)
    token_nll: list = field(default_factory=list)  # per-position NLL arrays, in order

    def add(self, logits: np.ndarray, logits_exact: np.ndarray, targets: np.ndarray,
            last_quarter: np.ndarray, second_half: np.ndarray, block: int = 128) -> None:
        """Add positions: logits (T, V) of this config and of the exact cache, targets (T,),
        last_quarter / second_half (T,) bool; in row blocks to bound the float64 work arrays."""
        for a in range(0, len(targets), block):
            s = slice(a, a + block)
            self._add(log_softmax(logits[s]), log_softmax(logits_exact[s]), targets[s], last_quarter[s],
                      second_half[s])

    def _add(self, lp, lp_exact, targets, last_quarter, second_half) -> None:
        rows = np.arange(len(targets))
        nll = -lp[rows, targets]  # (T,)
        nll_x = -lp_exact[rows, targets]
        self.token_nll.append(nll)
        self.nll += float(nll.sum())
        self.nll_exact += float(nll_x.sum())
        self.kl += float((np.exp(lp_exact) * (lp_exact - lp)).sum())
        self.top1 += int((lp.argmax(-1) == lp_exact.argmax(-1)).sum())
        self.tokens += len(targets)
        self.nll_lq += float(nll[last_quarter].sum())
        self.nll_lq_exact += float(nll_x[last_quarter].sum())
        self.tokens_lq += int(last_quarter.sum())
        self.nll_h2 += float(nll[second_half].sum())
        self.nll_h2_exact += float(nll_x[second_half].sum())
        self.tokens_h2 += int(second_half.sum())

    def result(self) -> dict:
        n, q = max(self.tokens, 1), max(self.tokens_lq, 1)
        ppl, ppl_x = math.exp(self.nll / n), math.exp(self.nll_exact / n)
        lq, lq_x = math.exp(self.nll_lq / q), math.exp(self.nll_lq_exact / q)
        return {"ppl": ppl, "ppl_exact": ppl_x, "delta_pct": 100 * (ppl / ppl_x - 1),
                "nll": self.nll / n, "nll_exact": self.nll_exact / n,
                "kl": self.kl / n, "top1_agree": self.top1 / n, "tokens": self.tokens,
                "ppl_last_quarter": lq, "ppl_last_quarter_exact": lq_x,
                "delta_last_quarter_pct": 100 * (lq / lq_x - 1),
                "ppl_second_half": math.exp(self.nll_h2 / max(self.tokens_h2, 1)),
                "ppl_second_half_exact": math.exp(self.nll_h2_exact / max(self.tokens_h2, 1)),
                "window_delta_pct": list(self.per_window)}


def evaluate(model, windows: Sequence[Sequence[int]], configs: Sequence[KVConfig],
             chunk: int = EVAL_CHUNK, progress: Callable[[int], None] | None = None,
             token_nll: bool = False) -> list[dict]:
    """Score ``configs`` against the exact cache over ``windows`` (see module docstring).

    Args:
        model: a loaded :class:`~tqedge.runtime.model.Model`.
        windows: token-id windows (each ≥ 2 tokens), e.g. from :func:`text_windows`.
        configs: configurations to score; an ``exact`` one is allowed (it scores 0 / 1).
        chunk: tokens per forward call; the compressed cache's result does not depend on it.
        progress: called with the number of tokens just processed (over all caches).
        token_nll: also return ``token_nll``, every scored position's NLL (a list).

    Returns:
        One dict per config: :meth:`Tally.result` plus ``config``, ``kv_bits``,
        ``bytes_per_token``, ``fixed_bytes`` and ``windows``.
    """
    if not configs:
        raise TqedgeError("nothing to evaluate: no KV configuration given")
    if chunk < 1:
        raise TqedgeError(f"chunk must be ≥ 1, got {chunk}")
    tallies = [Tally() for _ in configs]
    sizes: list = [None] * len(configs)
    exact_cfg = KVConfig(EXACT, kv_bits=EXACT)
    for ids in windows:
        ids = np.asarray(ids, dtype=np.int64)
        n = len(ids)
        if n < 2:
            raise TqedgeError("every window needs at least 2 tokens")
        exact, _ = build_cache(model, exact_cfg, n)
        caches = []
        for i, cfg in enumerate(configs):
            cache, per = build_cache(model, cfg, n)
            caches.append(cache)
            sizes[i] = (per, int(getattr(cache, "fixed_bytes", 0)))
        before = [(t.nll, t.nll_exact, t.tokens) for t in tallies]
        for a in range(0, n - 1, chunk):
            b = min(a + chunk, n - 1)  # positions a..b-1 predict tokens a+1..b
            targets = ids[a + 1:b + 1]  # (T,)
            tpos = np.arange(a + 1, b + 1)  # (T,) positions of the targets
            lq, h2 = tpos >= n - n // 4, tpos > n // 2  # last quarter; what llama-perplexity scores
            logits_x = model.forward(ids[a:b], exact, logits="all")  # (T, V)
            if progress:
                progress(b - a)
            for cache, tally in zip(caches, tallies):
                logits = model.forward(ids[a:b], cache, logits="all")  # (T, V)
                tally.add(logits, logits_x, targets, lq, h2)
                if progress:
                    progress(b - a)
        for (nll0, nllx0, tok0), tally in zip(before, tallies):
            k = tally.tokens - tok0
            tally.per_window.append(100 * (math.exp((tally.nll - nll0 - (tally.nll_exact - nllx0)) / k) - 1))
    out = []
    for cfg, tally, (per, fixed) in zip(configs, tallies, sizes):
        r = tally.result()
        r.update(config=cfg.name, settings=cfg.describe(), kv_bits=cfg.kv_bits or "default",
                 bytes_per_token=per, fixed_bytes=fixed, windows=len(windows))
        if token_nll:
            r["token_nll"] = np.concatenate(tally.token_nll).tolist()
        out.append(r)
    return out


def work_tokens(windows: Sequence[Sequence[int]], n_configs: int) -> int:
    """Tokens :func:`evaluate` will run (for a progress bar): the exact cache plus each config."""
    return sum(len(w) - 1 for w in windows) * (1 + n_configs)

"""Text generation over a model and a KV cache, in small named steps (gpt-fast / mlx-lm style).

    prefill(model, cache, ids)        feed a prompt in chunks the cache ring accepts → last logits
    decode_one_token(model, cache, t) feed one token → its logits
    generate_step(...)                the token loop: processors → sampler → yield → feed
    stream_generate(model, prompt)    text in, GenerationResponse pieces out (stop rules, stats)
    generate(model, prompt)           the whole completion as one string

The token loop is lazy: a sampled token is fed to the cache only when the consumer asks for
the next one, so after a generation the cache holds the prompt and every generated token but
the last (the EOS, or the token that hit max_tokens or a stop string). :class:`Chat` relies on
``cache.offset`` to know exactly which tokens the cache holds.

No lock is taken here: backends are safe to call from several threads (onnxruntime's
``InferenceSession.run`` is thread-safe and the ONNX backend keeps no per-call state; the
LiteRT backend serializes its interpreter itself), and each generation has its own cache.
See ``runtime/chat.py`` for the threading rules.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass

import numpy as np

from tqedge.errors import TqedgeError
from tqedge.runtime.detokenize import StreamingDetokenizer
from tqedge.runtime.footprint import PREFILL_CHUNK
from tqedge.runtime.memory import peak_rss
from tqedge.runtime.sampling import apply_processors, make_logits_processors, make_sampler
from tqedge.units import format_bytes

log = logging.getLogger(__name__)

FINISH_REASONS = ("stop", "length", "eos")

def _cache_attr(cache, name: str, default):
    """A cache setting (``sinks``, ``policy``) from the cache or its slot ring."""
    if hasattr(cache, name):
        return getattr(cache, name)
    return getattr(getattr(cache, "slots", None), name, default)


def max_step(cache) -> int:
    """The most tokens one forward call may add to ``cache`` (its ring, beside the sinks)."""
    return max(1, cache.capacity - int(_cache_attr(cache, "sinks", 0)))


def needed_bytes(cache, tokens: int) -> int:
    """Budget a cache like ``cache`` needs to hold ``tokens`` tokens: the cache's own
    ``needed_bytes(tokens)`` when it has one, else its bytes per slot × tokens."""
    own = getattr(cache, "needed_bytes", None)
    if callable(own):
        return int(own(tokens))
    return math.ceil(tokens * cache.nbytes / cache.capacity)


def check_room(cache, t: int, what: str = "this step") -> None:
    """Raise a clear error when ``t`` more tokens cannot fit a cache with the ``error`` policy.

    The message names the capacity and the budget that would be needed.
    """
    if _cache_attr(cache, "policy", "slide") != "error" or cache.length + t <= cache.capacity:
        return
    needed = cache.length + t
    raise TqedgeError(
        f"KV cache full: {what} needs {needed} tokens but the cache holds {cache.capacity} tokens "
        f"({format_bytes(cache.nbytes)}); a budget of at least {format_bytes(needed_bytes(cache, needed))} "
        f"is needed (--kv-budget), or use --policy slide to drop the oldest tokens"
    )


def prefill(model, cache, ids: Sequence[int], chunk: int | None = None) -> np.ndarray:
    """Feed prompt tokens to ``cache`` in chunks and return the logits after the last one.

    Args:
        model: a :class:`~tqedge.runtime.model.Model` (or anything with ``forward``).
        cache: the cache to extend (continues at ``cache.offset``).
        ids: token ids, at least one.
        chunk: tokens per forward call (default :data:`PREFILL_CHUNK`), capped at the cache
            ring so a sliding cache can always take a chunk.

    Returns:
        (vocab,) float32 logits predicting the token after ``ids``.
    """
    ids = [int(i) for i in ids]
    if not ids:
        raise TqedgeError("prefill needs at least one token")
    check_room(cache, len(ids), "the prompt")
    step = min(chunk or PREFILL_CHUNK, max_step(cache))
    if step < 1:
        raise TqedgeError(f"prefill chunk must be ≥ 1, not {chunk}")
    logits = None
    for i in range(0, len(ids), step):
        logits = model.forward(ids[i:i + step], cache)  # (V,)
    return logits


def decode_one_token(model, cache, token: int) -> np.ndarray:
    """Feed one token and return the (vocab,) logits predicting the next."""
    if cache.length >= cache.capacity:  # only a full cache can refuse (policy "error")
        check_room(cache, 1, "the reply")
    return model.forward([int(token)], cache)


def generate_step(model, cache, prompt_ids: Sequence[int], sampler=None, processors=(),
                  history: Sequence[int] = (), prefill_chunk: int | None = None
                  ) -> Iterator[tuple[int, np.ndarray]]:
    """The token loop: yields ``(token, logits)`` forever; the caller decides when to stop.

    Args:
        model: the model.
        cache: the cache; ``prompt_ids`` continue at ``cache.offset``.
        prompt_ids: tokens to prefill (≥ 1).
        sampler: ``logits -> token`` (default greedy).
        processors: logits processors ``(tokens, logits) -> logits``.
        history: tokens already in the cache before ``prompt_ids`` (seen by the processors,
            e.g. the repetition penalty over a whole conversation).
        prefill_chunk: see :func:`prefill`.

    Yields:
        (token id, the (vocab,) logits it was sampled from, after processors).
    """
    sampler = sampler or make_sampler()
    seq = [int(t) for t in history] + [int(t) for t in prompt_ids]
    logits = prefill(model, cache, prompt_ids, chunk=prefill_chunk)
    while True:
        if processors:
            logits = apply_processors(processors, np.asarray(seq, dtype=np.int64), logits)
        token = int(sampler(logits))
        seq.append(token)
        yield token, logits
        logits = decode_one_token(model, cache, token)


class StopMatcher:
    """Cuts the text stream at the first stop string and never emits any part of it.

    Text that could be the start of a stop string is held back until it is decided.
    """

    def __init__(self, stops: Sequence[str] | None):
        if isinstance(stops, str):
            stops = [stops]
        self.stops = [s for s in (stops or []) if s]
        self.held = ""

    def feed(self, piece: str) -> tuple[str, bool]:
        """Add ``piece``; return (text safe to emit, whether a stop string was hit)."""
        buf = self.held + piece
        if not self.stops:
            return buf, False
        # the stop that completes first wins (ties: the longer one), however text is split
        hits = [(i + len(s), i) for s in self.stops if (i := buf.find(s)) >= 0]
        if hits:
            self.held = ""
            return buf[:min(hits)[1]], True
        keep = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(buf)), keep, -1):
                if buf.endswith(s[:k]):
                    keep = k
                    break
        self.held = buf[len(buf) - keep:] if keep else ""
        return buf[:len(buf) - keep], False

    def flush(self) -> str:
        """Release held-back text (the stream ended without a stop string)."""
        out, self.held = self.held, ""
        return out


@dataclass
class GenerationStats:
    """Counters and speeds of one generation."""

    prompt_tokens: int = 0  # tokens prefilled for this request
    generation_tokens: int = 0  # tokens sampled (including a final EOS)
    prefill_s: float = 0.0
    decode_s: float = 0.0
    prefill_tps: float = 0.0
    decode_tps: float = 0.0
    kv_tokens: int = 0  # tokens the cache holds
    kv_capacity_tokens: int = 0
    kv_bytes_used: int = 0  # share of the preallocated buffer in use
    kv_capacity_bytes: int = 0  # the preallocated buffer
    evicted: int = 0  # tokens dropped by the sliding policy so far
    cached_tokens: int = 0  # prompt tokens reused from the cache (chat turns)
    peak_memory_bytes: int | None = None  # process peak RSS (set on the final response only)

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        """One line for humans."""
        return (f"prompt {self.prompt_tokens} tok @ {self.prefill_tps:.1f} tok/s"
                f"{f' (+{self.cached_tokens} cached)' if self.cached_tokens else ''}, "
                f"reply {self.generation_tokens} tok @ {self.decode_tps:.1f} tok/s | "
                f"KV {format_bytes(self.kv_bytes_used)}/{format_bytes(self.kv_capacity_bytes)} "
                f"({self.kv_tokens}/{self.kv_capacity_tokens} tok, {self.evicted} evicted)")


@dataclass
class GenerationResponse:
    """One streamed step: the text that became ready, the token, and running stats."""

    text: str
    token: int | None
    finish_reason: str | None  # None while running, then "stop" | "length" | "eos"
    stats: GenerationStats


def _stats(cache, n_prompt, n_gen, t0, t1, t2, cached, final: bool) -> GenerationStats:
    prefill_s, decode_s = t1 - t0, t2 - t1
    length = cache.length
    used = cache.nbytes * length // cache.capacity  # (a cache holds ≥ 1 token)
    return GenerationStats(
        prompt_tokens=n_prompt, generation_tokens=n_gen, prefill_s=prefill_s, decode_s=decode_s,
        prefill_tps=n_prompt / prefill_s if prefill_s > 0 else 0.0,
        decode_tps=(n_gen - 1) / decode_s if n_gen > 1 and decode_s > 0 else 0.0,
        kv_tokens=length, kv_capacity_tokens=cache.capacity, kv_bytes_used=int(used),
        kv_capacity_bytes=int(cache.nbytes), evicted=int(cache.evicted), cached_tokens=cached,
        peak_memory_bytes=peak_rss() if final else None)


def _release(token: int, is_eos: bool, is_last: bool, detok: StreamingDetokenizer,
             stopper: StopMatcher) -> tuple[str, str | None]:
    """The text ``token`` releases and the finish reason it causes (None: keep going).

    An EOS token adds no text; the last token (EOS or max_tokens) flushes everything held
    back by the detokenizer and the stop matcher.
    """
    text, hit = stopper.feed("" if is_eos else detok.add_token(token))
    if hit:
        return text, "stop"
    if not (is_eos or is_last):
        return text, None
    more, hit = stopper.feed(detok.finalize())
    if hit:
        return text + more, "stop"
    return text + more + stopper.flush(), "eos" if is_eos else "length"


def resolve_sampling(manifest, **given) -> dict:
    """Sampling settings: the given ones, else the bundle's ``generation`` defaults."""
    g = manifest.generation
    out = {k: (getattr(g, k) if given.get(k) is None else given[k])
           for k in ("temperature", "top_k", "top_p", "min_p", "repetition_penalty", "max_tokens")}
    if int(out["max_tokens"]) < 1:
        raise TqedgeError(f"max_tokens must be ≥ 1, not {out['max_tokens']}")
    return out


def stream_generate(model, prompt, *, max_tokens: int | None = None, temperature: float | None = None,
                    top_k: int | None = None, top_p: float | None = None, min_p: float | None = None,
                    repetition_penalty: float | None = None, seed: int | None = None,
                    stop: Sequence[str] | str | None = None, cache=None, kv_budget=None, kv_bits=None,
                    window: int | None = None, sinks: int | None = None, policy: str | None = None,
                    add_special_tokens: bool | None = None, history: Sequence[int] = (),
                    cached_tokens: int = 0, logits_processors=(), prefill_chunk: int | None = None
                    ) -> Iterator[GenerationResponse]:
    """Generate from ``prompt``, yielding text pieces as they become safe to show.

    Args:
        model: a loaded model.
        prompt: text (encoded with ``model.encode``) or a list of token ids.
        max_tokens, temperature, top_k, top_p, min_p, repetition_penalty: sampling settings;
            None takes the bundle's ``generation`` defaults. ``temperature=0`` is greedy.
        seed: sampler seed (reproducible sampling).
        stop: stop string(s); the text ends before the first one and never contains it.
        cache: a cache to continue (default: a new one from the kv_* options).
        kv_budget, kv_bits, window, sinks, policy: options for the new cache.
        add_special_tokens: prepend BOS (default: the bundle's ``add_bos_token``).
        history: tokens already in ``cache`` (for the repetition penalty).
        cached_tokens: reported in the stats (prompt tokens reused from the cache).
        logits_processors: extra processors, run after the repetition penalty.
        prefill_chunk: tokens per prefill forward call.

    Yields:
        :class:`GenerationResponse`; the last one has ``finish_reason`` set: "eos" (an EOS
        token; not part of the text), "stop" (a stop string) or "length" (max_tokens).
    """
    s = resolve_sampling(model.manifest, max_tokens=max_tokens, temperature=temperature, top_k=top_k,
                         top_p=top_p, min_p=min_p, repetition_penalty=repetition_penalty)
    if isinstance(prompt, str):
        ids = model.encode(prompt, add_special_tokens=add_special_tokens)
    else:
        ids = [int(i) for i in prompt]
    if not ids:
        raise TqedgeError("the prompt is empty")
    if cache is None:
        cache = model.new_cache(kv_budget=kv_budget, kv_bits=kv_bits, window=window, sinks=sinks, policy=policy)
    sampler = make_sampler(s["temperature"], s["top_k"], s["top_p"], s["min_p"], seed)
    processors = make_logits_processors(s["repetition_penalty"]) + list(logits_processors)
    eos = set(model.manifest.tokenizer.eos_token_ids)
    detok, stopper = StreamingDetokenizer(model.tokenizer), StopMatcher(stop)
    max_n = int(s["max_tokens"])

    n_prompt = len(ids)
    t0 = time.perf_counter()
    steps = generate_step(model, cache, ids, sampler, processors, history=history, prefill_chunk=prefill_chunk)
    t1 = None
    try:
        for n, (token, _) in enumerate(steps, start=1):
            if t1 is None:
                t1 = time.perf_counter()
            text, finish = _release(token, token in eos, n >= max_n, detok, stopper)
            yield GenerationResponse(text, token, finish,
                                     _stats(cache, n_prompt, n, t0, t1, time.perf_counter(), cached_tokens,
                                            finish is not None))
            if finish:
                return
    finally:
        steps.close()


def generate(model, prompt, **kwargs) -> str:
    """The whole completion of ``prompt`` as one string; see :func:`stream_generate`."""
    return "".join(r.text for r in stream_generate(model, prompt, **kwargs))

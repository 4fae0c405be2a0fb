"""Continuous batching: the next tokens of many sequences go through the dense graph as ONE forward.

The row-concatenation protocol (docs/ARCHITECTURE.md, "Batched steps"): the rows of every
sequence in a step are concatenated along T, each with its own absolute ``positions``; the
dense segments are row-independent (embedding, RMSNorm, linears, RoPE per position), so only
attention needs to know which row belongs to which sequence. :class:`BatchView` implements the
cache protocol (``prepare`` / ``attend`` / ``commit``) over several caches and routes each row
range to its own cache; a backend calls it exactly like a single cache, or reads
``view.parts`` (a list of ``(row_start, row_end, cache)``) to dispatch per sequence itself.
``logits_index`` picks the last row of every sequence that wants logits (a decode row, the
final chunk of a prompt) and none for a non-final prompt chunk.

    forward_batch(model, [(ids, cache, want_logits), ...]) → [logits (V,) | None, ...]

On top of it :class:`Batcher` schedules steps (decode rows of every running sequence first,
then prompt chunks of new ones under a per-step token budget, oldest first), and
:func:`generate_batch` runs many prompts to completion (offline batch jobs).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

import numpy as np

from tqedge.errors import TqedgeError
from tqedge.runtime.detokenize import StreamingDetokenizer
from tqedge.runtime.generate import (GenerationResponse, StopMatcher, _release, _stats, check_room,
                                     max_step, resolve_sampling)
from tqedge.runtime.sampling import apply_processors, make_logits_processors, make_sampler

log = logging.getLogger(__name__)

# Tokens per batched step (decode rows + prompt chunks). One step's time grows with its rows, and
# every running stream waits for the step: 64 keeps a new prompt from freezing the others' streams
# for more than ~one 64-row forward while still prefilling ~64 tokens per step.
STEP_TOKENS = 64
# Prompts are fed in chunks that end at absolute positions that are multiples of this, whatever
# else is in the step, so a prompt's computation never depends on batch composition (the dense
# rows are computed independently; attention depends on how a prompt is chunked, through float
# summation order, which int8/int4 activation quantization can amplify into another greedy token).
PROMPT_CHUNK = 32


class BatchView:
    """The cache protocol over several caches, one contiguous row range each.

    Args:
        caches: the sequences' caches (distinct objects).
        counts: rows of each sequence in this step (≥ 1 each), in the order of ``caches``.
    """

    def __init__(self, caches: Sequence, counts: Sequence[int]):
        if len({id(c) for c in caches}) != len(caches):
            raise TqedgeError("a cache may appear only once in a batched step")
        ends = np.cumsum(counts)
        self.parts = [(int(e - n), int(e), c) for c, n, e in zip(caches, counts, ends)]  # (start, end, cache)
        self.rows = int(ends[-1]) if len(ends) else 0

    def prepare(self, t: int) -> None:
        if t != self.rows:
            raise TqedgeError(f"batched step has {self.rows} rows, prepare({t}) called")
        for a, b, c in self.parts:
            c.prepare(b - a)

    def attend(self, layer: int, q: np.ndarray, k: np.ndarray, v: np.ndarray, scale: float) -> np.ndarray:
        """Each row range attends over its own cache. q (T, Hq, D), k/v (T, Hkv, D) → (T, Hq, D)."""
        if len(self.parts) == 1:
            return self.parts[0][2].attend(layer, q, k, v, scale)
        out = np.empty(q.shape, np.float32)  # (T, Hq, D)
        for a, b, c in self.parts:
            out[a:b] = c.attend(layer, q[a:b], k[a:b], v[a:b], scale)
        return out

    def commit(self) -> None:
        for _, _, c in self.parts:
            c.commit()

    def descriptor(self) -> np.ndarray:
        """The native op's descriptor of the step: every cache's own, behind a table of row ranges
        (:func:`tqedge.runtime.kv_descriptor.batch`)."""
        from tqedge.runtime.kv_descriptor import batch

        return batch([(a, b, c.descriptor()) for a, b, c in self.parts])


def forward_batch(model, items: Sequence[tuple]) -> list[np.ndarray | None]:
    """One forward over the next tokens of several sequences.

    Args:
        model: a :class:`~tqedge.runtime.model.Model` (its ``backend`` runs the rows).
        items: ``(ids, cache, want_logits)`` per sequence: ≥ 1 token ids continuing at
            ``cache.offset``; ``want_logits`` asks for the logits after its last token.

    Returns:
        Per item, float32 (vocab,) logits, or None when not asked for.
    """
    if not items:
        raise TqedgeError("a batched step needs at least one sequence")
    ids, pos, index, counts = [], [], [], []
    end = 0
    for toks, cache, want in items:
        toks = np.asarray(toks, np.int64).reshape(-1)  # (n,)
        if len(toks) == 0:
            raise TqedgeError("every sequence in a batched step needs at least one token")
        ids.append(toks)
        pos.append(np.arange(cache.offset, cache.offset + len(toks), dtype=np.int64))
        end += len(toks)
        counts.append(len(toks))
        if want:
            index.append(end - 1)
    ids_a = np.concatenate(ids)  # (T,)
    if ids_a.min() < 0 or ids_a.max() >= model.arch.vocab_size:
        raise TqedgeError(f"token id out of range 0..{model.arch.vocab_size - 1}")
    view = BatchView([c for _, c, _ in items], counts)
    model._set_kernel_threads(model.threads)  # per calling thread, as Model.forward
    view.prepare(end)
    out = model.backend.forward(ids_a, np.concatenate(pos), np.asarray(index, np.int64), view)  # (n, V)
    view.commit()
    rows = iter(out)
    return [next(rows) if want else None for _, _, want in items]


class BatchStream:
    """One sequence generated inside a batch: prompt tokens still to feed, its sampler, its text.

    The same rules as :func:`~tqedge.runtime.generate.stream_generate` (sampling defaults from
    the bundle, stop strings, EOS, lazy feeding: the last sampled token is never fed), so after
    it finishes its cache holds the prompt and every generated token but the last.

    Args:
        model: the model.
        prompt: token ids to feed (≥ 1), continuing at ``cache.offset``.
        cache: this sequence's own cache.
        history: tokens already in ``cache`` (for the repetition penalty).
        cached_tokens: reported in the stats.
        chunk: prompt chunks end at positions that are multiples of this (:data:`PROMPT_CHUNK`).
        **sampling: ``max_tokens``, ``temperature``, ``top_k``, ``top_p``, ``min_p``,
            ``repetition_penalty``, ``seed``, ``stop`` (as for ``stream_generate``).
    """

    def __init__(self, model, prompt: Sequence[int], cache, history: Sequence[int] = (), cached_tokens: int = 0,
                 seed: int | None = None, stop=None, chunk: int = PROMPT_CHUNK, **sampling):
        s = resolve_sampling(model.manifest, **sampling)
        self.pending = [int(t) for t in prompt]  # tokens to feed: the prompt rest, then the last sampled token
        if not self.pending:
            raise TqedgeError("the prompt is empty")
        check_room(cache, len(self.pending), "the prompt")
        self.cache, self.n_prompt, self.cached = cache, len(self.pending), cached_tokens
        self.seq = [int(t) for t in history] + list(self.pending)
        self.sampler = make_sampler(s["temperature"], s["top_k"], s["top_p"], s["min_p"], seed)
        self.processors = make_logits_processors(s["repetition_penalty"])
        self.eos = set(model.manifest.tokenizer.eos_token_ids)
        self.detok, self.stopper = StreamingDetokenizer(model.tokenizer), StopMatcher(stop)
        self.max_n, self.n_gen, self.prefilling = int(s["max_tokens"]), 0, True
        self.t0, self.t1, self.finished = time.perf_counter(), None, False
        self.chunk = min(chunk, max_step(cache))

    def take(self, budget: int) -> list[int]:
        """The tokens to feed this step: one while decoding, else the prompt up to the next
        position that is a multiple of the chunk, or nothing if that exceeds ``budget``."""
        if not self.prefilling:
            check_room(self.cache, 1, "the reply")
            return self.pending[:1]
        n = min(len(self.pending), self.chunk - self.cache.offset % self.chunk)
        return self.pending[:n] if n <= budget else []

    def advance(self, n: int, logits: np.ndarray | None) -> GenerationResponse | None:
        """``n`` fed tokens are in the cache; with ``logits`` (after the last), sample the next token."""
        del self.pending[:n]
        if logits is None:
            return None
        self.prefilling = False
        if self.t1 is None:
            self.t1 = time.perf_counter()
        if self.processors:
            logits = apply_processors(self.processors, np.asarray(self.seq, np.int64), logits)
        token = int(self.sampler(logits))
        self.seq.append(token)
        self.n_gen += 1
        text, finish = _release(token, token in self.eos, self.n_gen >= self.max_n, self.detok, self.stopper)
        self.finished = finish is not None
        if not self.finished:
            self.pending = [token]
        stats = _stats(self.cache, self.n_prompt, self.n_gen, self.t0, self.t1, time.perf_counter(),
                       self.cached, self.finished)
        return GenerationResponse(text, token, finish, stats)


class Batcher:
    """Steps many :class:`BatchStream` s together, one forward per step.

    Each step takes one decode row of every stream that is generating, then one prompt chunk
    (:attr:`BatchStream.take`) of each stream still prefilling, oldest first, while they fit in
    what is left of ``step_tokens`` (at least one chunk a step), so a long prompt is fed over
    several steps while the others keep streaming.

    Args:
        model: the model.
        step_tokens: rows per step (decode rows + prompt chunks).
        chunk: the prompt chunk of the streams it runs (give it to :class:`BatchStream`).
    """

    def __init__(self, model, step_tokens: int = STEP_TOKENS, chunk: int = PROMPT_CHUNK):
        if step_tokens < 1 or chunk < 1:
            raise TqedgeError(f"step tokens and prompt chunk must be ≥ 1, not {step_tokens} and {chunk}")
        self.model, self.step_tokens, self.chunk = model, int(step_tokens), int(chunk)
        self.streams: list = []  # admission order

    def add(self, stream: BatchStream) -> None:
        self.streams.append(stream)

    def remove(self, stream: BatchStream) -> None:
        """Drop ``stream`` now (finished or cancelled); its cache is the caller's again."""
        if stream in self.streams:
            self.streams.remove(stream)

    def plan(self) -> tuple[list, list]:
        """This step's ``(stream, tokens)`` rows and the ``(stream, TqedgeError)`` streams that cannot go on."""
        rows, failed = [], []
        decoding = [s for s in self.streams if not s.prefilling]
        budget, first = self.step_tokens - len(decoding), True
        for s in decoding + [s for s in self.streams if s.prefilling]:
            try:
                toks = s.take(max(budget, s.chunk) if first and s.prefilling else budget)
            except TqedgeError as e:
                failed.append((s, e))
                continue
            if toks and s.prefilling:
                budget, first = budget - len(toks), False
            if toks:
                rows.append((s, toks))
        return rows, failed

    def step(self) -> tuple[list, list]:
        """Run one batched forward.

        Returns:
            ``(responses, failed)``: ``(stream, GenerationResponse)`` for every stream that
            sampled a token, ``(stream, TqedgeError)`` for streams removed because they cannot
            continue (a full cache under the ``error`` policy). If the forward itself raises,
            the exception propagates and the caller decides the fate of the streams.
        """
        rows, failed = self.plan()
        for s, _ in failed:
            self.remove(s)
        if not rows:
            return [], failed
        wants = [s.prefilling is False or len(toks) == len(s.pending) for s, toks in rows]
        logits = forward_batch(self.model, [(toks, s.cache, w) for (s, toks), w in zip(rows, wants)])
        out = []
        for (s, toks), lg in zip(rows, logits):
            r = s.advance(len(toks), lg)
            if r is not None:
                out.append((s, r))
                if s.finished:
                    self.remove(s)
        return out, failed


def generate_batch(model, prompts: Sequence, *, max_batch: int = 8, step_tokens: int = STEP_TOKENS,
                   add_special_tokens: bool | None = None, kv_budget=None, kv_bits=None, **sampling) -> list[str]:
    """Complete many prompts together (continuous batching), each with its own cache.

    At most ``max_batch`` sequences run at once (``max_batch`` caches of ``kv_budget`` each);
    when one finishes its cache is reset and the next prompt starts in it.

    Args:
        model: the model.
        prompts: texts (encoded with ``model.encode``) or lists of token ids.
        max_batch: sequences generated together.
        step_tokens: rows per batched step (see :class:`Batcher`).
        add_special_tokens: prepend BOS to text prompts (default: the bundle's).
        kv_budget, kv_bits: options for the caches (default: the model's).
        **sampling: ``max_tokens``, ``temperature``, ``seed``, ``stop``, ... as for ``model.generate``.

    Returns:
        The completions, in the order of ``prompts``.
    """
    if max_batch < 1:
        raise TqedgeError(f"max_batch must be ≥ 1, not {max_batch}")
    todo = [(i, model.encode(p, add_special_tokens=add_special_tokens) if isinstance(p, str) else list(p))
            for i, p in enumerate(prompts)]
    todo.reverse()
    texts: list[list[str]] = [[] for _ in prompts]
    batcher, free, owner = Batcher(model, step_tokens), [], {}
    while todo or batcher.streams:
        while todo and len(batcher.streams) < max_batch:
            i, ids = todo.pop()
            cache = free.pop() if free else model.new_cache(kv_budget=kv_budget, kv_bits=kv_bits)
            cache.reset()
            s = BatchStream(model, ids, cache, chunk=batcher.chunk, **sampling)
            owner[id(s)] = i
            batcher.add(s)
        responses, failed = batcher.step()
        if failed:
            raise failed[0][1]
        for s, r in responses:
            texts[owner[id(s)]].append(r.text)
            if s.finished:
                free.append(s.cache)
    return ["".join(t) for t in texts]

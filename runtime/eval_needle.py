"""Needle in a haystack: can the model still find one fact in a long prompt read through the cache?

A sentence like ``"The secret code is 48613."`` is hidden at a relative depth (0 = start,
1 = end) of filler text (e.g. wikitext or tinyshakespeare) cut so the whole prompt is ``ctx``
tokens; the question then asks for the code through the bundle's chat template, or — for a
base model, which has none — as a raw completion ending in ``"Answer: The secret code is"``
(no template, BOS as the bundle says). The reply is greedy and scored by exact match: the needle's value must appear in it as a whole
number. The cache is sized to hold the prompt and the reply (no eviction), so what is measured
is the read path (fp16 window + compressed codes), not the overflow policy.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from tqedge.errors import TqedgeError

log = logging.getLogger(__name__)

NEEDLE = "The secret code is {value}."
QUESTION = "What is the secret code mentioned in the text above? Answer with the number only."
RAW_QUESTION = "Question: What is the secret code mentioned in the text above?\nAnswer: The secret code is"
MAX_REPLY = 16


@dataclass(frozen=True)
class NeedleCase:
    """One probe: context length (prompt tokens), depth in [0, 1], and the hidden value."""

    ctx: int
    depth: float
    value: str


def needle_value(ctx: int, depth: float, seed: int = 0) -> str:
    """A 5-digit value fixed by (seed, ctx, depth), so reruns and configs see the same needle."""
    rng = np.random.default_rng([seed, ctx, int(round(depth * 1000))])
    return str(int(rng.integers(10000, 100000)))


def score_reply(reply: str, value: str) -> bool:
    """Exact match: ``value`` appears in ``reply`` as a whole number (not inside a longer one)."""
    return value in re.findall(r"\d+", reply.replace(",", ""))


def build_prompt(model, filler_ids: Sequence[int], case: NeedleCase, chat: bool = True) -> list[int]:
    """Prompt ids of at most (about exactly) ``case.ctx`` tokens with the needle at ``case.depth``.

    ``chat``: the question as a user message through the bundle's chat template; False: a raw
    completion prompt (haystack, question, ``"Answer: The secret code is"``) for base models.
    The filler is cut at a token boundary to fill the room the template, needle and question
    leave; the needle goes in at ``depth`` of the filler, moved forward to the next sentence end.

    Raises:
        TqedgeError: the context is too short for the template and needle, or the filler too short.
    """
    from tqedge.runtime.template import render_for

    if not 0.0 <= case.depth <= 1.0:
        raise TqedgeError(f"needle depth must be in [0, 1], got {case.depth}")
    tok = model.tokenizer
    needle = " " + NEEDLE.format(value=case.value) + " "

    def render(haystack: str) -> list[int]:
        if not chat:
            return model.encode(f"{haystack}\n\n{RAW_QUESTION}")
        msgs = [{"role": "user", "content": f"{haystack}\n\n{QUESTION}"}]
        return model.encode(render_for(model.manifest, msgs, add_generation_prompt=True))

    overhead = len(render(needle))
    room = case.ctx - overhead
    if room < 16:
        raise TqedgeError(f"context {case.ctx} is too short for the needle prompt ({overhead} tokens)")
    if len(filler_ids) < room:
        raise TqedgeError(f"filler text has {len(filler_ids)} tokens, {room} needed for ctx {case.ctx}")
    filler = tok.decode(list(filler_ids[:room]))
    cut = int(len(filler) * case.depth)
    if 0 < cut < len(filler):  # next sentence end, so the needle does not split a sentence
        m = re.compile(r"[.!?\n]").search(filler, cut)
        cut = m.end() if m else len(filler)
    ids = render(filler[:cut] + needle + filler[cut:])
    while len(ids) > case.ctx and room > 16:  # decode/encode round trips may add a few tokens
        room -= len(ids) - case.ctx
        filler = tok.decode(list(filler_ids[:room]))
        cut = min(cut, len(filler))
        ids = render(filler[:cut] + needle + filler[cut:])
    return ids


def run_needle(model, filler_text: str, contexts: Sequence[int], depths: Sequence[float], cfg=None,
               seed: int = 0, progress: Callable[[int], None] | None = None, chat: bool | None = None) -> dict:
    """Probe every (context, depth) pair with greedy decoding.

    Args:
        model: a loaded model.
        filler_text: haystack text.
        contexts: prompt lengths in tokens.
        depths: needle depths in [0, 1].
        cfg: a :class:`~tqedge.runtime.eval_ppl.KVConfig` (None = the bundle's default cache).
        seed: seed of the needle values.
        progress: called with 1 after each probe.
        chat: ask through the chat template (True) or with a raw completion prompt (False);
            None = the template when the bundle has one, raw otherwise (a base model).

    Returns:
        ``{"grid": {ctx: {depth: bool}}, "cases": [...], "accuracy": float, "config": ...,
        "prompt": "chat" | "raw"}``.

    Raises:
        TqedgeError: ``chat=True`` for a bundle without a chat template.
    """
    from tqedge.runtime.eval_ppl import KVConfig, build_cache
    from tqedge.runtime.generate import generate

    has_template = model.manifest.tokenizer.chat_template is not None
    if chat and not has_template:
        raise TqedgeError("this bundle has no chat template (a base model): ask the needle raw")
    chat = has_template if chat is None else chat
    cfg = cfg or KVConfig("default")
    filler_ids = model.tokenizer.encode(filler_text[: max(contexts) * 12], add_special_tokens=False).ids
    grid, cases = {}, []
    for ctx in contexts:
        grid[ctx] = {}
        for depth in depths:
            case = NeedleCase(int(ctx), float(depth), needle_value(ctx, depth, seed))
            ids = build_prompt(model, filler_ids, case, chat)
            cache, _ = build_cache(model, cfg, len(ids) + MAX_REPLY + 1)
            reply = generate(model, ids, cache=cache, temperature=0.0, max_tokens=MAX_REPLY)
            ok = score_reply(reply, case.value)
            grid[ctx][depth] = ok
            cases.append({"ctx": ctx, "depth": depth, "value": case.value, "prompt_tokens": len(ids),
                          "reply": reply.strip(), "found": ok})
            log.info("needle ctx=%d depth=%.2f value=%s found=%s reply=%r", ctx, depth, case.value, ok, reply)
            if progress:
                progress(1)
    acc = sum(c["found"] for c in cases) / len(cases)
    return {"config": cfg.name, "settings": cfg.describe(), "prompt": "chat" if chat else "raw", "accuracy": acc,
            "grid": grid, "cases": cases}


def format_grid(result: dict) -> str:
    """The depth × context grid as text: one row per depth, ✓ / ✗ per context."""
    grid = result["grid"]
    contexts = list(grid)
    depths = list(next(iter(grid.values())))
    lines = ["depth \\ ctx " + " ".join(f"{c:>6}" for c in contexts)]
    for d in depths:
        lines.append(f"{d:>11.2f} " + " ".join(f"{'✓' if grid[c][d] else '✗':>6}" for c in contexts))
    lines.append(f"accuracy {100 * result['accuracy']:.0f}% ({result['config']}, {result['prompt']} prompt)")
    return "\n".join(lines)

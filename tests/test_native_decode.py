"""The native backend's one-call decode step (``NativeBackend.decode``): a TurboQuant cache's
token step planned, run and committed in one nopython call must be the general path
(``cache.prepare`` → ``descriptor()`` → Run → ``commit``) bit for bit, refuse what only the
general path handles, and keep ``Model.forward`` and ``generate``'s per-token Python small."""

from __future__ import annotations

import sys

import numpy as np
import pytest

pytest.importorskip("numba")

import tqedge  # noqa: E402
from tqedge.errors import TqedgeError  # noqa: E402

from _bundles import smollm2_bundle  # noqa: E402,F401  (fixture)

PROMPT = "The history of the city begins with a small settlement by the river"


@pytest.fixture(scope="module")
def model(smollm2_bundle):  # noqa: F811
    m = tqedge.load(smollm2_bundle, backend="native", threads=2, verify="size")
    assert m._decode is not None
    return m


def _state(c):
    s = c.slots
    return (s.offset, s.length, s.evicted, s._ptr, c.fp_lo)


def _same_buffers(a, b) -> bool:
    """Equal fp16 sinks/window, and equal codes and scales for every token both have encoded (the
    one-call step encodes the token leaving the window each step; the Python path a window's
    backlog at once, so it may hold codes of window tokens ahead of need)."""
    if not (np.array_equal(a.fp_k, b.fp_k) and np.array_equal(a.fp_v, b.fp_v)):
        return False
    pos = np.arange(max(a.sinks, a.slots.offset - a.ring), min(a.encoded, b.encoded))
    idx = (pos - a.sinks) % a.ring
    return all(np.array_equal(x[:, idx], y[:, idx]) for x, y in zip(
        [*a.k_codes, *a.k_scales, *a.v_codes, *a.v_scales], [*b.k_codes, *b.k_scales, *b.v_codes, *b.v_scales]))


def _general(model, ids, cache):
    """Model.forward with the one-call step switched off (the general path)."""
    saved, model._decode = model._decode, None
    try:
        return model.forward(ids, cache)
    finally:
        model._decode = saved


# (budget bytes, window, sinks, steps): no eviction; a ring that wraps and evicts across several
# window backlog encodes; no window (every token encoded as it comes); no sinks
CONFIGS = [(4 << 20, 128, 4, 40), (720_000, 16, 4, 90), (640_000, 0, 4, 70), (700_000, 8, 0, 80)]


@pytest.mark.parametrize("budget, window, sinks, steps", CONFIGS)
def test_one_call_decode_is_the_general_path_bit_for_bit(model, budget, window, sinks, steps, monkeypatch):
    one_call = []  # per decode step: did the one-call path run it?
    decode = model._decode
    monkeypatch.setattr(model, "_decode", lambda ids, c: one_call.append(decode(ids, c)) or one_call[-1])
    fast, slow = (model.new_cache(kv_budget=budget, window=window, sinks=sinks) for _ in range(2))
    ids = model.encode(PROMPT)
    a, b = model.forward(ids, fast), _general(model, ids, slow)
    for i in range(steps):
        tok = int(b.argmax())
        a, b = model.forward([tok], fast), _general(model, [tok], slow)
        assert np.array_equal(a, b), f"step {i}"
        assert _state(fast) == _state(slow) and fast.encoded <= slow.encoded, f"step {i}"
        if i == 5:  # a chat turn re-tokenized differently: forget the last tokens (before any eviction)
            fast.trim(3), slow.trim(3)
    assert _same_buffers(fast, slow)
    assert fast.slots.evicted == max(0, len(ids) + steps - 3 - fast.capacity)
    # every step ran as one call, the window's turnovers included (no burst of W encodes)
    assert len(one_call) == steps and all(x is not None for x in one_call)


def test_the_general_path_still_refuses_what_the_one_call_step_cannot_do(model):
    c = model.new_cache(kv_budget=720_000, window=16, sinks=4, policy="error")
    logits = model.forward(model.encode(PROMPT), c)
    with pytest.raises(TqedgeError, match="token id out of range"):
        model.forward([model.arch.vocab_size], c)
    with pytest.raises(TqedgeError, match="token id out of range"):
        model.forward([-1], c)
    n = 0
    with pytest.raises(TqedgeError, match="KV cache full"):
        while True:
            logits = model.forward([int(logits.argmax())], c)
            n += 1
    assert c.length == c.capacity and n == c.capacity - len(model.encode(PROMPT))


def _calls(fn, *args):
    """Python-level calls (``call`` and ``c_call`` profile events, so ctypes and NumPy count too)
    of ``fn(*args)``, its own call included, the profiler's switch-off not."""
    n = [0]

    def prof(frame, event, arg):
        if event in ("call", "c_call"):
            n[0] += 1

    sys.setprofile(prof)
    try:
        fn(*args)
    finally:
        sys.setprofile(None)
    return n[0] - 1


def test_a_decode_step_is_a_handful_of_python_calls(model):
    """Issue 13's goal: ≤ 5 Python-level calls inside ``Model.forward`` per decode step and ≤ 30
    per token of greedy ``generate`` (forward, sampling, detokenizing, stats)."""
    c = model.new_cache()
    logits = model.forward(model.encode(PROMPT), c)
    logits = model.forward([int(logits.argmax())], c)  # (the first call in a process loads the machine code)
    counts = []
    for _ in range(6):
        tok = int(logits.argmax())
        counts.append(_calls(model.forward, [tok], c))
        logits = model.forward([tok], c)
    assert max(counts) <= 5, counts

    from tqedge.runtime.generate import stream_generate

    it = stream_generate(model, PROMPT, max_tokens=40, temperature=0)
    for _ in range(4):  # past the prompt
        next(it)

    def tokens(n):
        for _ in zip(range(n), it):  # (as a caller's for loop: no next() call of its own)
            pass

    per_token = (_calls(tokens, 16) - 1) / 16
    it.close()
    assert per_token <= 30, per_token

"""Chat: a multi-turn conversation over one model and one KV cache that is reused across turns.

Each turn renders the *whole* conversation with the bundle's chat template and tokenizes it,
then prefills only what the cache does not hold already:

1. Find the longest common prefix of the new ids and the ids the cache holds (``_ids``,
   of which the cache holds the first ``cache.offset``). Usually that is everything up to the
   end of the previous reply; the new user turn and the assistant header are prefilled.
2. If the cache holds more than the common prefix (the template re-tokenized the reply
   differently from how it was generated, or a stop string cut it), ``trim`` the cache back
   to the common prefix. The result is then exactly what a fresh prefill of the whole
   conversation would give.
3. ``trim`` is impossible once a sliding cache has evicted tokens (the evicted slots were
   overwritten). Then the conversation keeps going from the cached state: the cache has
   seen ``decode(_ids)`` as text, and only the rendered text that follows it is tokenized
   and fed. Re-prefilling the whole conversation instead would cost seconds per turn on a
   device and, under a sliding budget, forget the same old tokens anyway. If the template
   rewrote history so the text no longer extends what the cache saw, the cache is reset and
   the conversation prefilled afresh (with a warning).

After a reply the cache holds the prompt and the reply tokens except the last one (see
``runtime/generate.py``); the next render's ``<|im_end|>`` and new turn follow on naturally.

Threading: a ``Chat`` is not thread-safe (it owns mutable state: messages, cache, ids); use
one per thread or guard it with your own lock. Different chats, each with its own cache, may
run in different threads on one shared model without any lock: the model keeps no per-call
state, onnxruntime's ``InferenceSession.run`` is thread-safe, and the LiteRT backend
serializes its interpreter itself. (On a device with few cores, concurrent chats share the
cores, so each one runs slower; the server decides how many run at once.)
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

from tqedge.errors import TqedgeError
from tqedge.runtime.generate import GenerationStats, stream_generate
from tqedge.runtime.template import render_for

log = logging.getLogger(__name__)

_CACHE_OPTIONS = ("kv_budget", "kv_bits", "window", "sinks", "policy")
_SAMPLING_OPTIONS = ("max_tokens", "temperature", "top_k", "top_p", "min_p", "repetition_penalty",
                     "seed", "stop", "prefill_chunk")


def common_prefix(a, b) -> int:
    """Length of the longest common prefix of two id sequences."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class Chat:
    """A conversation with a model, reusing its KV cache across turns.

    Args:
        model: a loaded :class:`~tqedge.runtime.model.Model`.
        system: optional system message.
        cache: a cache to use (default: ``model.new_cache(**cache options)``).
        kv_budget, kv_bits, window, sinks, policy: options for the new cache.
        **sampling: defaults for :meth:`send` (``max_tokens``, ``temperature``, ``top_k``,
            ``top_p``, ``min_p``, ``repetition_penalty``, ``seed``, ``stop``).
    """

    def __init__(self, model, system: str | None = None, cache=None, **options):
        unknown = set(options) - set(_CACHE_OPTIONS) - set(_SAMPLING_OPTIONS)
        if unknown:
            raise TqedgeError(f"unknown chat option {sorted(unknown)[0]!r}")
        if not model.manifest.tokenizer.chat_template:
            raise TqedgeError("this bundle has no chat template, so it cannot chat; use generate")
        self.model = model
        self.system = system
        self.sampling = {k: v for k, v in options.items() if k in _SAMPLING_OPTIONS}
        cache_opts = {k: v for k, v in options.items() if k in _CACHE_OPTIONS}
        self.cache = cache if cache is not None else model.new_cache(**cache_opts)
        self.stats: GenerationStats | None = None  # the last turn's stats
        self.reset()

    # -- state ------------------------------------------------------------------------------
    def reset(self) -> None:
        """Start over: only the system message remains; the cache is emptied."""
        self._messages = [{"role": "system", "content": self.system}] if self.system else []
        self._ids: list[int] = []  # the token sequence fed to the cache (first cache.offset of it)
        self.cache.reset()
        self.stats = None

    @property
    def messages(self) -> list[dict]:
        """A copy of the conversation so far."""
        return [dict(m) for m in self._messages]

    @property
    def cached_ids(self) -> list[int]:
        """The token ids the cache has seen, in order."""
        return self._ids[: self.cache.offset]

    def save(self, path) -> int:
        """Save this conversation and its cache (compressed codes as stored) to ``path``;
        restore with ``model.chat_from(path)``. See :mod:`tqedge.runtime.session_file`.

        Returns:
            Bytes written.
        """
        from tqedge.runtime.session_file import save_chat

        return save_chat(self, path)

    # -- a turn -----------------------------------------------------------------------------
    def _render_ids(self) -> list[int]:
        text = render_for(self.model.manifest, self._messages, add_generation_prompt=True)
        return self.model.encode(text, add_special_tokens=False)

    def _sync_cache(self, ids: list[int]) -> list[int]:
        """Bring the cache to a prefix of ``ids``; return the tokens still to feed (≥ 1)."""
        held = self.cached_ids
        n = common_prefix(held, ids)
        if n == len(ids):  # nothing new: re-feed the last token to get its logits
            n -= 1
        if n == len(held):
            self._ids = held
            return ids[n:]
        if not self.cache.evicted:
            self.cache.trim(len(held) - n)
            self._ids = held[:n]
            return ids[n:]
        # The cache slid: it cannot be rewound. Continue after the text it has seen.
        tok = self.model.tokenizer
        seen = tok.decode(held, skip_special_tokens=False)
        full = tok.decode(ids, skip_special_tokens=False)
        if full.startswith(seen) and len(full) > len(seen):
            new = self.model.encode(full[len(seen):], add_special_tokens=False)
            self._ids = held + new
            return new
        log.warning("chat template changed earlier turns and the cache cannot be rewound; re-prefilling")
        self.cache.reset()
        self._ids = []
        return ids

    def send(self, text: str, stream: bool = False, **sampling) -> str | Iterator[str]:
        """Add a user message and generate the assistant's reply.

        Args:
            text: the user's message.
            stream: return an iterator of text pieces instead of the whole reply.
            **sampling: per-turn overrides of the chat's sampling defaults.

        Returns:
            The reply (str), or an iterator of its pieces when ``stream``. The reply joins the
            conversation when it is complete (for a stream: when the iterator is exhausted
            or closed).
        """
        if not isinstance(text, str):
            raise TqedgeError("a chat message must be a string")
        unknown = set(sampling) - set(_SAMPLING_OPTIONS)
        if unknown:
            raise TqedgeError(f"unknown sampling option {sorted(unknown)[0]!r}")
        self._messages.append({"role": "user", "content": text})
        try:
            ids = self._render_ids()
            new = self._sync_cache(ids)
        except Exception:
            self._messages.pop()
            raise
        pieces = self._reply(new, len(ids) - len(new), {**self.sampling, **sampling})
        return pieces if stream else "".join(pieces)

    def _reply(self, new: list[int], cached: int, opts: dict) -> Iterator[str]:
        """Generate the reply to the rendered prompt whose uncached tail is ``new``."""
        history = list(self._ids)
        self._ids = history + new
        reply, stats, ok = [], None, False
        try:
            for r in stream_generate(self.model, new, cache=self.cache, history=history,
                                     cached_tokens=cached, **opts):
                self._ids.append(r.token)
                stats = r.stats
                if r.text:
                    reply.append(r.text)
                    yield r.text
            ok = True
        finally:
            if ok or reply:  # a complete or interrupted reply joins the conversation
                self.stats = stats
                self._messages.append({"role": "assistant", "content": "".join(reply)})
            else:  # failed before any text (e.g. the cache is full): forget the user message
                self._messages.pop()

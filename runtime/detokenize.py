"""Streaming detokenizer: token ids in, text pieces out, never a broken UTF-8 character.

Byte-level BPE splits one character over several tokens (an emoji is often 2–3 tokens, each a
fragment of its 4 UTF-8 bytes); decoding a fragment alone yields U+FFFD. The streaming rule
(the one text-generation-inference and ``transformers.TextStreamer`` use): keep two offsets
into the ids, decode ``ids[prefix:]`` and ``ids[prefix:read]``, and emit the difference only
when the decoded tail does not end in U+FFFD. Decoding from ``prefix`` (a little left context)
rather than from the new token alone also keeps SentencePiece-style decoders from dropping
the leading space of a word. The cost per token is a decode of a few tokens, not of the whole
sequence.
"""

from __future__ import annotations

REPLACEMENT = "\ufffd"
# After this many held-back tokens the tail is emitted as is: the model really produced
# invalid bytes, and holding them forever would stall the stream.
MAX_HELD_TOKENS = 8


class StreamingDetokenizer:
    """Incremental, UTF-8-safe decoding of a growing token sequence.

    Args:
        tokenizer: a ``tokenizers.Tokenizer``.
        skip_special_tokens: drop special tokens (``<|im_end|>`` …) from the text.

    Usage::

        detok = StreamingDetokenizer(model.tokenizer)
        for tok in tokens:
            print(detok.add_token(tok), end="")
        print(detok.finalize())
    """

    def __init__(self, tokenizer, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.reset()

    def reset(self) -> None:
        """Forget all tokens."""
        self.tokens: list[int] = []
        self._prefix = 0  # start of the context window that is decoded
        self._read = 0  # tokens before this are already emitted
        self.text = ""  # everything emitted so far

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def add_token(self, token: int) -> str:
        """Append one token id; return the text that became safe to emit (maybe "").

        Args:
            token: the next token id.

        Returns:
            New complete characters, possibly empty while a character is split.
        """
        tokens = self.tokens
        tokens.append(int(token))
        n = len(tokens)
        prefix_text = self._decode(tokens[self._prefix:self._read])
        new_text = self._decode(tokens[self._prefix:])
        k = len(prefix_text)
        if len(new_text) > k and (not new_text.endswith(REPLACEMENT) or n - self._read > MAX_HELD_TOKENS):
            piece = new_text[k:]
            self._prefix, self._read = self._read, n
            self.text += piece
            return piece
        return ""

    def finalize(self) -> str:
        """Emit whatever is held back (even an incomplete character) and return it."""
        prefix_text = self._decode(self.tokens[self._prefix:self._read])
        new_text = self._decode(self.tokens[self._prefix:])
        piece = new_text[len(prefix_text):] if len(new_text) > len(prefix_text) else ""
        self._prefix = self._read = len(self.tokens)
        self.text += piece
        return piece

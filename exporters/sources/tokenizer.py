"""Rebuild a ``tokenizers`` tokenizer from the vocabulary llama.cpp stores in GGUF metadata.

Two kinds: byte-level BPE (``tokenizer.ggml.model == "gpt2"``) and Gemma's SentencePiece BPE
(``"llama"`` in a Gemma file, :func:`sentencepiece_gemma`). For byte-level BPE the pre-tokenizer is
chosen by ``tokenizer.ggml.pre`` from :data:`PRE_TOKENIZERS`, mirroring llama.cpp's
``llama-vocab.cpp`` regex table: e.g. ``smollm`` (and ``starcoder``, ``refact``) split every
digit on its own (``\\p{N}``) before the GPT-2 regex, which is what SmolLM2's own
``tokenizer.json`` does with ``Digits(individual_digits=True)`` + ``ByteLevel``.
"""

from __future__ import annotations

from typing import Callable

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

from tqedge.errors import TqedgeError

# llama.cpp token types
CONTROL, USER_DEFINED = 3, 4
SPACE = "\u2581"  # SentencePiece's visible space
SENTENCEPIECE_ARCHS = ("gemma", "gemma2", "gemma3")  # SentencePiece vocabularies rebuilt here

_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _gpt2():
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)


def _digits_then_gpt2():
    return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), _gpt2()])


def _llama3():
    return pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])


PRE_TOKENIZERS: dict[str, Callable[[], pre_tokenizers.PreTokenizer]] = {
    "default": _gpt2, "gpt2": _gpt2, "gpt-2": _gpt2, "mpt": _gpt2, "olmo": _gpt2,
    "smollm": _digits_then_gpt2, "starcoder": _digits_then_gpt2, "refact": _digits_then_gpt2,
    "llama3": _llama3, "llama-v3": _llama3, "llama-bpe": _llama3, "smaug-bpe": _llama3,
}


def tokenizer_from_gguf(meta: dict) -> Tokenizer:
    """Build the tokenizer described by GGUF ``tokenizer.ggml.*`` metadata.

    Args:
        meta: GGUF metadata (key → python value; arrays as lists).

    Returns:
        A ``tokenizers.Tokenizer`` with control tokens added as special tokens.

    Raises:
        TqedgeError: for a non-BPE vocabulary or an unknown pre-tokenizer.
    """
    kind = meta.get("tokenizer.ggml.model")
    if kind == "llama" and meta.get("general.architecture") in SENTENCEPIECE_ARCHS:
        return sentencepiece_gemma(meta)
    if kind != "gpt2":
        raise TqedgeError(f"GGUF tokenizer model {kind!r} is not supported (only byte-level BPE 'gpt2', and SentencePiece in Gemma files)")
    pre = meta.get("tokenizer.ggml.pre", "default")
    if pre not in PRE_TOKENIZERS:
        raise TqedgeError(f"GGUF pre-tokenizer {pre!r} is not supported (supported: {', '.join(sorted(PRE_TOKENIZERS))})")
    tokens: list[str] = meta["tokenizer.ggml.tokens"]
    types: list[int] = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]
    vocab = {t: i for i, t in enumerate(tokens)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = PRE_TOKENIZERS[pre]()
    tok.decoder = decoders.ByteLevel()
    special = [AddedToken(t, special=True, normalized=False) for t, ty in zip(tokens, types) if ty == CONTROL]
    user = [AddedToken(t, special=False, normalized=False) for t, ty in zip(tokens, types) if ty == USER_DEFINED]
    tok.add_special_tokens(special)
    if user:
        tok.add_tokens(user)
    return tok


def spm_merges(tokens: list[str], vocab: dict[str, int]) -> list[tuple[str, str]]:
    """BPE merges implied by a SentencePiece-BPE vocabulary that lists none.

    Every way to cut a piece into two pieces of the vocabulary is a merge; pieces rank in file
    order (Gemma's scores fall strictly with the index, so this is score order too), and the
    cuts of one piece longest-left first.
    """
    merges = []
    for piece in tokens:
        merges.extend((piece[:j], piece[j:]) for j in range(len(piece) - 1, 0, -1)
                      if piece[:j] in vocab and piece[j:] in vocab)
    return merges


def sentencepiece_gemma(meta: dict) -> Tokenizer:
    """Gemma's SentencePiece BPE (byte fallback, no prefix space) from GGUF metadata.

    Spaces become ``▁`` before the model runs; pieces made only of spaces are stored with real
    spaces in GGUF and are respelled with ``▁``; merges are rebuilt by :func:`spm_merges`.
    Control tokens become special tokens, user-defined ones (newline runs …) plain added tokens,
    both matched whole in the text as llama.cpp does.
    """
    if meta.get("tokenizer.ggml.add_space_prefix"):
        raise TqedgeError("GGUF SentencePiece vocabularies with add_space_prefix are not supported")
    raw: list[str] = meta["tokenizer.ggml.tokens"]
    types: list[int] = meta.get("tokenizer.ggml.token_type") or [1] * len(raw)
    tokens = [SPACE * len(t) if t and not t.strip(" ") else t for t in raw]
    vocab = {t: i for i, t in enumerate(tokens)}
    unk = raw[int(meta.get("tokenizer.ggml.unknown_token_id", 3))]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=spm_merges(tokens, vocab), unk_token=unk,
                               fuse_unk=True, byte_fallback=True))
    tok.normalizer = normalizers.Replace(" ", SPACE)
    tok.pre_tokenizer = pre_tokenizers.Split(" ", behavior="merged_with_previous")
    tok.decoder = decoders.Sequence([decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t, ty in zip(raw, types) if ty == CONTROL])
    user = [AddedToken(t, special=False, normalized=False) for t, ty in zip(raw, types) if ty == USER_DEFINED and t in vocab]
    if user:
        tok.add_tokens(user)
    return tok

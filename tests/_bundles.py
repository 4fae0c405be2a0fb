"""Shared test models for the generation-layer tests (import the fixtures into a test module).

* :class:`TinyLM` — a real (tiny, random-weight) causal transformer in NumPy with the same
  interface as ``runtime.model.Model`` (``forward``, ``new_cache``, ``tokenizer``, ``manifest``,
  ``encode`` …). It attends through a real ``ExactKVCache`` (prepare/attend/commit) with RoPE
  at absolute positions, so cache reuse, trimming and sliding are exercised for real and a
  fresh full-sequence forward is an independent oracle for any cached state.
* ``tiny_tokenizer`` — a byte-level BPE trained here on a small corpus (small vocab, so emoji
  and CJK characters are split across several tokens).
* ``smollm2_tokenizer`` — SmolLM2's tokenizer and chat template via ``transformers`` (GGUF).
* ``smollm2_bundle`` — SmolLM2 exported once per session.
* ``tiny_bundle`` — a tiny random Llama (tests/test_export.py) exported to ``tiny.tqe`` once per
  session; read-only (the server tests share it).
"""

from __future__ import annotations

import functools

import numpy as np
import pytest

from tqedge.bundle import ArchSpec, GenerationSpec, Manifest, TokenizerSpec, WeightSpec
from tqedge.codec import kernels
from tqedge.runtime.cache import make_cache
from tqedge.runtime.model import Model

SMOL_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CORPUS = [
    "The quick brown fox jumps over the lazy dog.", "What is the capital of France? Paris.",
    "Hello, world! How are you today?", "I like tea and cake in the afternoon.",
    "東京は日本の首都です。", "北京是中国的首都。", "Emoji: 😀 🎉 👋 🚀 are fun.",
    "Ünïcödé àccents: café, naïve, résumé.", "The rain in Spain stays mainly in the plain.",
    "One two three four five six seven eight nine ten.",
] * 3


@functools.lru_cache(maxsize=1)
def _tiny_tokenizer_json() -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=420, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    return tok.to_str()


def make_tiny_tokenizer():
    """A fresh byte-level BPE tokenizer with <|endoftext|>=0, <|im_start|>=1, <|im_end|>=2."""
    from tokenizers import Tokenizer

    return Tokenizer.from_str(_tiny_tokenizer_json())


def _rope(x: np.ndarray, positions: np.ndarray, theta: float = 10000.0) -> np.ndarray:
    """Rotate-half RoPE. x: (T, H, D); positions: (T,)."""
    d = x.shape[-1]
    inv = theta ** (-np.arange(0, d, 2) / d)  # (D/2,)
    ang = positions[:, None] * inv[None]  # (T, D/2)
    cos = np.concatenate([np.cos(ang)] * 2, -1)[:, None].astype(np.float32)  # (T, 1, D)
    sin = np.concatenate([np.sin(ang)] * 2, -1)[:, None].astype(np.float32)
    rot = np.concatenate([-x[..., d // 2:], x[..., : d // 2]], -1)
    return x * cos + rot * sin


class TinyLM:
    """A 2-layer random transformer with the runtime Model's interface (see module docstring)."""

    encode = Model.encode
    generate = Model.generate
    stream = Model.stream
    chat = Model.chat

    def __init__(self, tokenizer=None, seed: int = 0, chat_template: str | None = SMOL_TEMPLATE,
                 eos=(2,), generation: GenerationSpec | None = None, kv_budget="256KiB"):
        self.tokenizer = tokenizer or make_tiny_tokenizer()
        v = self.tokenizer.get_vocab_size()
        self.h, self.hq, self.hkv, self.d, self.layers = 32, 4, 2, 8, 2
        arch = ArchSpec(name="llama", vocab_size=v, hidden_size=self.h, intermediate_size=64,
                        num_layers=self.layers, num_heads=self.hq, num_kv_heads=self.hkv, head_dim=self.d,
                        rms_norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=4096,
                        tie_word_embeddings=False)
        tok = TokenizerSpec(bos_token_id=None, eos_token_ids=list(eos), bos_token="<|im_start|>",
                            eos_token="<|im_end|>", chat_template=chat_template)
        self.manifest = Manifest(name="tiny", architecture=arch, tokenizer=tok, weights=WeightSpec(),
                                 generation=generation or GenerationSpec())
        self.arch = arch
        rng = np.random.default_rng(seed)
        s = 1 / np.sqrt(self.h)
        self.emb = rng.normal(0, 1.0, (v, self.h)).astype(np.float32)  # (V, H)
        self.w = [{n: (rng.normal(0, s, (self.h, self.hq * self.d if n == "q" else self.hkv * self.d))
                       .astype(np.float32)) for n in "qkv"} for _ in range(self.layers)]
        self.head = rng.normal(0, 0.35, (self.h, v)).astype(np.float32)  # (H, V)
        # tokens that are not whole characters (or are control bytes) are never produced, so
        # replies re-tokenize to text the way real replies do
        texts = [self.tokenizer.decode([i]) for i in range(v)]
        bad = [i for i, t in enumerate(texts) if "\ufffd" in t or not t.isprintable()]
        self.bias = np.zeros(v, np.float32)  # (V,)
        self.bias[bad] = -30.0
        for w in self.w:
            w["o"] = rng.normal(0, s, (self.hq * self.d, self.h)).astype(np.float32)  # (Hq*D, H)
        self.cache_defaults = dict(kv_budget=kv_budget, kv_bits="exact", window=None, sinks=4, policy="slide")
        self.calls: list[int] = []  # tokens per forward call (tests inspect prefill sizes)
        self.threads = None
        self._set_kernel_threads = kernels.set_threads

    def new_cache(self, **overrides):
        opts = {**self.cache_defaults, **{k: v for k, v in overrides.items() if v is not None}}
        opts.pop("window")
        return make_cache(self.manifest, **opts)

    def forward(self, ids, cache, logits: str = "last") -> np.ndarray:
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        t = len(ids)
        pos = np.arange(cache.offset, cache.offset + t)
        index = np.array([t - 1]) if logits == "last" else np.arange(t)
        cache.prepare(t)
        out = self.backend.forward(ids, pos, index, cache)  # (n, V)
        cache.commit()
        return out[0] if logits == "last" else out

    @property
    def backend(self):
        """The segment protocol (``backend.forward(ids, positions, logits_index, cache)``), so
        batched steps (:mod:`tqedge.runtime.batch`) run on this model too."""
        from types import SimpleNamespace

        return SimpleNamespace(forward=self.forward_rows)

    def forward_rows(self, ids, pos, index, cache) -> np.ndarray:
        t = len(ids)
        self.calls.append(t)
        x = self.emb[ids]  # (T, H)
        for i, w in enumerate(self.w):
            hn = x / np.sqrt((x * x).mean(-1, keepdims=True) + 1e-5)  # (T, H)
            q = _rope((hn @ w["q"]).reshape(t, self.hq, self.d), pos)  # (T, Hq, D)
            k = _rope((hn @ w["k"]).reshape(t, self.hkv, self.d), pos)  # (T, Hkv, D)
            v = (hn @ w["v"]).reshape(t, self.hkv, self.d)  # (T, Hkv, D)
            out = cache.attend(i, q, k, v, 1 / np.sqrt(self.d))  # (T, Hq, D)
            x = x + out.reshape(t, -1) @ w["o"]
        hn = x[index] / np.sqrt((x[index] * x[index]).mean(-1, keepdims=True) + 1e-5)  # (n, H)
        return (hn @ self.head + self.bias).astype(np.float32)  # (n, V)

    def reference_logits(self, ids) -> np.ndarray:
        """Logits of the last position from a fresh, large cache (the oracle)."""
        cache = make_cache(self.manifest, kv_budget=len(ids) * 2 * self.layers * self.hkv * self.d * 4 * 2 + 65536,
                           kv_bits="exact", sinks=4, policy="error")
        calls = list(self.calls)
        out = self.forward(ids, cache)
        self.calls = calls
        return out


# Fixtures imported into several test modules become separate fixture definitions, so pytest
# would run a "session" fixture once per module; the expensive results are memoized here.
_ONCE: dict = {}


def _once(key, make):
    if key not in _ONCE:
        _ONCE[key] = make()
    return _ONCE[key]


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_gguf):
    """(tokenizers.Tokenizer, HF tokenizer with chat template) for SmolLM2, from the GGUF."""
    transformers = pytest.importorskip("transformers")

    def make():
        hf = transformers.AutoTokenizer.from_pretrained(str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name)
        return hf.backend_tokenizer, hf

    return _once(("tokenizer", str(smollm2_gguf)), make)


@pytest.fixture(scope="session")
def smollm2_bundle(smollm2_gguf, tmp_path_factory):
    """A SmolLM2 bundle exported once per test session."""
    from tqedge.exporters.export import export

    def make():
        out = tmp_path_factory.mktemp("bundles") / "smollm2.tqe"
        export(str(smollm2_gguf), str(out))
        return out

    return _once(("bundle", str(smollm2_gguf)), make)


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory):
    """A tiny random Llama exported once per session to ``<tmp>/tiny.tqe`` (do not modify it)."""
    import tqedge
    from test_export import build_tiny_hf

    def make():
        d = tmp_path_factory.mktemp("tiny_bundle")
        tqedge.export(build_tiny_hf(d / "hf"), d / "tiny.tqe")
        return d / "tiny.tqe"

    return _once("tiny_bundle", make)


@pytest.fixture(scope="session")
def smollm2_model(smollm2_bundle):
    """The exported SmolLM2 bundle, loaded once (exact-cache default)."""
    import tqedge

    return _once(("model", str(smollm2_bundle)),
                 lambda: tqedge.load(smollm2_bundle, kv_bits="exact", kv_budget="64MiB", verify="size"))

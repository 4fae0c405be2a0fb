"""Model: a loaded bundle = manifest + tokenizer + backend, and the caches it hands out.

``load(path)`` returns a :class:`Model`. The model itself is stateless between calls: every
piece of conversation state lives in a cache object (``model.new_cache()``) owned by the
caller, a :class:`~tqedge.runtime.chat.Chat`, or a server session. That is what lets several
chats (and several models) live side by side in one process.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np

from tqedge.bundle import Manifest, read_manifest
from tqedge.errors import TqedgeError
from tqedge.runtime.backends import choose_backend, get_backend
from tqedge.runtime.memory import (compiler_dirs, read_sparsely, release_code_pages, release_file_pages, trim_heap,
                                   warm_up)
from tqedge.units import format_bytes

log = logging.getLogger(__name__)

DEFAULT_KV_BUDGET = "64MiB"
MAX_THREADS = 1024  # a larger intra-op thread count is a typo (and overflows onnxruntime's int)


def check_threads(threads) -> None:
    """Raise TqedgeError unless ``threads`` is None or an integer in 1..MAX_THREADS."""
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, (int, np.integer))
                                or not 1 <= threads <= MAX_THREADS):
        raise TqedgeError(f"threads must be an integer >= 1 (at most {MAX_THREADS}), not {threads!r}")


class Model:
    """A bundle ready to run.

    Args:
        path: bundle directory.
        manifest: its validated manifest.
        backend: backend name ("native" | "onnx" | "tflite") or None to choose
            (:func:`tqedge.runtime.backends.choose_backend`).
        threads: threads for the backend's intra-op pool and the attention kernels (None: the
            backend's default and every usable core for the kernels; 1: one thread).
        kv_budget / kv_bits / window / sinks / policy: defaults for :meth:`new_cache`.
        memory: peak RSS the whole process may reach (bytes or "512MiB"); the KV budget is then
            what the measured fixed cost and working set leave (:mod:`tqedge.runtime.memory`),
            or ``kv_budget`` is checked against it. None: no process budget, ``kv_budget``
            defaults to :data:`DEFAULT_KV_BUDGET`.
        batched: the model will run mostly steps of many rows (a server batching
            conversations, an evaluation): with ``threads`` None the native backend then leaves
            onnxruntime its own default thread count (one per physical core).
        spin: native backend: onnxruntime gets ``threads`` with workers that spin before they
            sleep, and the attention op's work items run on them: faster on an idle device,
            slower beside busy processes (:data:`tqedge.runtime.backends.onnx_native.SPIN_CONFIG`).
    """

    def __init__(self, path: Path, manifest: Manifest, backend: str | None = None,
                 threads: int | None = None, kv_budget=None, kv_bits=None,
                 window: int | None = None, sinks: int | None = None, policy: str = "slide", memory=None,
                 batched: bool = False, spin: bool = False):
        from tokenizers import Tokenizer

        from tqedge.codec import kernels

        check_threads(threads)
        self.threads = threads
        self._set_kernel_threads = kernels.set_threads
        self.path, self.manifest = Path(path), manifest
        self.arch = manifest.architecture
        self.cache_defaults = self.cache_options(kv_budget, kv_bits, window, sinks, policy)
        self.backend_name = choose_backend(manifest, backend, self.cache_defaults)
        try:  # before the backend: parsing tokenizer.json peaks ~40 MiB above what it keeps (memory.py)
            self.tokenizer = Tokenizer.from_file(str(self.path / manifest.tokenizer.file))
        except Exception as e:  # tokenizers raises a bare Exception for a missing or bad file
            raise TqedgeError(f"bundle file {manifest.tokenizer.file} cannot be loaded "
                              f"({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
        trim_heap()
        self.backend = get_backend(self.backend_name)(self.path, manifest, threads=threads, batched=batched,
                                                      spin=spin)
        self._decode = getattr(self.backend, "decode", None)  # a backend's one-call decode step, if any
        warm_up(self)  # loads the kernels a first prompt calls while the compiler's pages may still go
        # the compiler's library, the weight files and code that ran once (imports, the session
        # build), read and no longer needed; from now on the weights are read a page at a time
        # where they are read at all (memory.py)
        released = release_file_pages([*compiler_dirs(), self.path]) + release_code_pages()
        read_sparsely([str(self.path)])
        log.debug("released %s of file pages after load", format_bytes(released))
        self.memory = self.fixed_bytes = None
        if memory is not None:
            self._fit(memory, kv_budget)

    @staticmethod
    def cache_options(kv_budget=None, kv_bits=None, window: int | None = None, sinks: int | None = None,
                      policy: str = "slide") -> dict:
        """The cache defaults a model made with these options has (the budget defaulted)."""
        return dict(kv_budget=kv_budget or DEFAULT_KV_BUDGET, kv_bits=kv_bits, window=window, sinks=sinks,
                    policy=policy)

    def _fit(self, memory, kv_budget) -> None:
        """Measure the fixed cost and give the KV cache what ``memory`` leaves (or check ``kv_budget``)."""
        from tqedge.runtime import memory as mem
        from tqedge.runtime.footprint import PREFILL_CHUNK

        self.memory = mem.parse_bytes(memory)
        self.fixed_bytes = mem.measure_fixed()
        working = mem.working_set_bytes(self.arch, PREFILL_CHUNK)
        budget = mem.kv_budget_for(self.memory, self.fixed_bytes, working, self.kv_bytes(0), kv_budget)
        self.cache_defaults["kv_budget"] = budget
        log.info("memory %s: %s fixed (measured), %s working set, KV budget %s", mem.format_bytes(self.memory),
                 mem.format_bytes(self.fixed_bytes), mem.format_bytes(working), mem.format_bytes(budget))

    def kv_bytes(self, tokens: int = 0) -> int:
        """Budget a cache with this model's defaults needs for ``tokens`` tokens (0: its smallest)."""
        from tqedge.runtime.memory import kv_bytes

        return kv_bytes(self.manifest, tokens, **self.cache_defaults)

    # -- caches ---------------------------------------------------------------------------
    def new_cache(self, **overrides):
        """A new, empty KV cache preallocated from the byte budget.

        Keyword args override the model's defaults: ``kv_budget`` (bytes or "32MiB"),
        ``kv_bits`` ("exact", "4,3", (4, 3)), ``window``, ``sinks``, ``policy`` ("slide"|"error").
        """
        from tqedge.runtime.cache import make_cache

        opts = {**self.cache_defaults, **{k: v for k, v in overrides.items() if v is not None}}
        return make_cache(self.manifest, **opts)

    # -- the forward step ------------------------------------------------------------------
    def forward(self, ids, cache, logits: str = "last") -> np.ndarray:
        """Run ``ids`` (the next tokens of the sequence held by ``cache``) and return logits.

        Args:
            ids: sequence of int token ids (T ≥ 1), continuing at ``cache.offset``.
            cache: the cache to read and extend.
            logits: "last" for the last position only, "all" for every position.

        Returns:
            float32 logits, (vocab,) for "last" or (T, vocab) for "all".
        """
        ids = np.asarray(ids, dtype=np.int64)
        if self._decode is not None and ids.ndim == 1 and ids.shape[0] == 1 and logits == "last":
            out = self._decode(ids, cache)  # the native backend's whole-step call (no Python per layer or plan)
            if out is not None:
                return out
        ids = ids.reshape(-1)
        t = len(ids)
        if t == 0:
            raise TqedgeError("forward needs at least one token")
        if ids.min() < 0 or ids.max() >= self.arch.vocab_size:
            raise TqedgeError(f"token id out of range 0..{self.arch.vocab_size - 1}")
        positions = np.arange(cache.offset, cache.offset + t, dtype=np.int64)
        index = np.array([t - 1], np.int64) if logits == "last" else np.arange(t, dtype=np.int64)
        self._set_kernel_threads(self.threads)  # per calling thread: chats may run in several
        cache.prepare(t)
        out = self.backend.forward(ids, positions, index, cache)
        cache.commit()
        return out[0] if logits == "last" else out

    def forward_batch(self, items) -> list:
        """One forward over the next tokens of several sequences, each with its own cache.

        Args:
            items: ``(ids, cache, want_logits)`` per sequence (distinct caches).

        Returns:
            Per item, float32 (vocab,) logits after its last token, or None if not wanted.
            See :func:`tqedge.runtime.batch.forward_batch` (the row-concatenation protocol).
        """
        from tqedge.runtime.batch import forward_batch

        return forward_batch(self, items)

    # -- text API (thin wrappers over runtime.generate / runtime.chat) -----------------------
    def encode(self, text: str, add_special_tokens: bool | None = None) -> list[int]:
        """Token ids of ``text`` (BOS prepended when the bundle says so)."""
        ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        tok = self.manifest.tokenizer
        add = tok.add_bos_token if add_special_tokens is None else add_special_tokens
        if add and tok.bos_token_id is not None:
            ids = [tok.bos_token_id] + ids
        return ids

    def generate(self, prompt: str, **kwargs) -> str:
        """Generate a completion of ``prompt`` and return it as a string.
        See :func:`tqedge.runtime.generate.stream_generate` for keyword arguments."""
        from tqedge.runtime.generate import generate

        return generate(self, prompt, **kwargs)

    def stream(self, prompt: str, **kwargs):
        """Yield the completion of ``prompt`` as text pieces (UTF-8 safe)."""
        from tqedge.runtime.generate import stream_generate

        for resp in stream_generate(self, prompt, **kwargs):
            if resp.text:
                yield resp.text

    def generate_batch(self, prompts, **kwargs) -> list[str]:
        """Complete many prompts together, batched into shared forwards (offline batch jobs).
        See :func:`tqedge.runtime.batch.generate_batch` for keyword arguments."""
        from tqedge.runtime.batch import generate_batch

        return generate_batch(self, prompts, **kwargs)

    def chat(self, system: str | None = None, **kwargs):
        """A new :class:`~tqedge.runtime.chat.Chat` with its own cache."""
        from tqedge.runtime.chat import Chat

        return Chat(self, system=system, **kwargs)

    def chat_from(self, path, kv_bits=None, **options):
        """Restore a :class:`~tqedge.runtime.chat.Chat` saved with ``chat.save(path)``.

        Args:
            path: the session file (refused with a one-line error if corrupt, saved for
                another bundle, or saved with another cache configuration than this model's
                default cache changed by ``kv_bits`` and the cache ``options``, as for
                :meth:`chat`; the message names both configurations).
            kv_bits: as for :meth:`chat`, or ``"saved"``: rebuild the cache the way the file
                says (its bits, budget, window, sinks, policy), whatever this model's defaults.
            **options: cache options (``kv_budget``, ``window``, ``sinks``, ``policy``) and
                overrides of the saved sampling defaults.

        Returns:
            The chat, its cache restored bit-exactly.
        """
        from tqedge.runtime.session_file import load_chat

        return load_chat(self, path, kv_bits=kv_bits, **options)


def load(path, backend: str | None = None, threads: int | None = None, verify: str = "auto",
         memory=None, batched: bool = False, spin: bool = False, **cache_defaults) -> Model:
    """Load a bundle.

    Args:
        path: bundle directory (made by ``tqedge export``).
        backend: "native", "onnx" or "tflite"; default: the first the bundle has and this device
            runs for these cache options (native where it can).
        threads: threads for onnxruntime's intra-op pool and the attention kernels (≥ 1;
            None: onnxruntime's default and every usable core).
        verify: "auto" (SHA-256 of every file the first time this device loads the bundle and
            whenever a file's size or mtime changes, sizes otherwise: see tqedge/verified.py),
            "full" (SHA-256 of every file), "size" or "none".
            The first load on a device also compiles the attention kernels (see
            :mod:`tqedge.runtime.warmup`; ``tqedge doctor --warmup`` does it ahead).
        memory: peak RSS the process may reach, e.g. "512MiB" (see :class:`Model`).
        batched: True for a model that runs mostly batched steps (see :class:`Model`).
        spin: True for onnxruntime workers that spin (native backend; see :class:`Model`).
        **cache_defaults: ``kv_budget``, ``kv_bits``, ``window``, ``sinks``, ``policy`` defaults
            for caches this model creates.

    Returns:
        A :class:`Model`.
    """
    from tqedge.runtime.cache import check_cache_options
    from tqedge.runtime.warmup import ensure_warm

    t0 = time.perf_counter()
    check_threads(threads)
    manifest = read_manifest(path, verify=verify)
    check_cache_options(manifest, **Model.cache_options(**cache_defaults))  # refused before compiling anything
    # first load on this install/device: compile every kernel now, not mid-chat, and before the
    # backend loads any (the native op's kernels load with its session)
    ensure_warm(manifest)
    model = Model(Path(path), manifest, backend=backend, threads=threads, memory=memory, batched=batched,
                  spin=spin, **cache_defaults)
    log.info("loaded %s (%s backend) in %.2fs", path, model.backend_name, time.perf_counter() - t0)
    return model

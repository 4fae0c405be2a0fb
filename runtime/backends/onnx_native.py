"""Native backend: the uncut ``model.onnx`` in ONE onnxruntime session, attention as a custom op.

The session is created and run through onnxruntime's C API (:mod:`tqedge.runtime.ort_capi`,
ctypes; the ``onnxruntime`` Python module is never imported). Its ``TurboQuantAttention`` nodes
run :mod:`tqedge.runtime.native_op` (Numba machine code) on the thread that calls ``Run``. The
cache is passed on every call as the int64 descriptor ``kv_desc`` (``cache.descriptor()``):
no Python runs between layers and no state is kept in the op, so one backend serves every
cache (chat) of its model, and several models live side by side. A batched step (the rows of
several sequences, :mod:`tqedge.runtime.batch`) passes a batch descriptor: one table of row
ranges, then each sequence's own descriptor.

The backend owns, for as long as it lives, everything ORT holds pointers into: the custom-op
struct, its callbacks and strings, the per-layer scales, the session and its options.
"""

from __future__ import annotations

import ctypes
import logging
import math
import time
from pathlib import Path

import numpy as np

from tqedge.bundle import DESCRIPTOR_VERSION, INPUT_IDS, KV_DESC, LOGITS, LOGITS_INDEX, POSITIONS, Manifest
from tqedge.codec.numba_runtime import njit
from tqedge.errors import TqedgeError
from tqedge.runtime.ort_capi import FLOAT, INT64
from tqedge.runtime.ort_numba import ccall

log = logging.getLogger(__name__)
FEEDS = (INPUT_IDS, POSITIONS, LOGITS_INDEX, KV_DESC)
FNS = ("CreateTensorWithDataAsOrtValue", "Run", "ReleaseValue")
#: onnxruntime's intra-op threads in the native session of an interactive model (generate, chat),
#: whatever ``threads`` is: a decode step is ~1,800 small nodes, and a pool thread that sleeps
#: between them (no spinning: other processes need the core) costs more to wake than it saves on
#: one row (SmolLM2 int4, 2 cores, interleaved A/B in one process: decode 50.0 vs 43.9 tok/s at
#: 512 tokens, 28.7 vs 27.3 at 2K). ``threads`` goes to the attention op's kernels instead. A
#: model loaded ``batched`` (a server, an evaluation: steps of many rows) gives onnxruntime
#: ``threads`` too: 8 decode rows 155 vs 122 tok/s (int8), 190 vs 159 (int4); prefill 277 vs 227
#: tok/s at 512, 197 vs 169 at 2K.
ORT_THREADS = 1


@njit(warm=False, nogil=True)
def _step(fns, session, memory_info, names, ids, positions, index, desc, logits):
    """The per-step Run in nopython code: wrap the four int64 inputs and the caller's logits
    buffer as OrtValues, Run, release them. Returns the ``OrtStatus*`` of the first failure.
    (Module level, no closure: Numba caches it on disk; a function made per backend was compiled
    again in every process, ~2 s of the first forward.)"""
    # one buffer: OrtValue* slots [0, 5), shapes [5, 11); read at the end, so it stays alive
    buf = np.zeros(11, np.int64)
    buf[5], buf[6], buf[7], buf[8] = ids.shape[0], positions.shape[0], index.shape[0], desc.shape[0]
    buf[9], buf[10] = logits.shape[0], logits.shape[1]
    va = buf.ctypes.data
    sa = va + 40
    st = ccall(fns[0], (memory_info, ids.ctypes.data, 8 * ids.shape[0], sa, 1, INT64, va))
    if st == 0:
        st = ccall(fns[0], (memory_info, positions.ctypes.data, 8 * positions.shape[0], sa + 8, 1, INT64, va + 8))
    if st == 0:
        st = ccall(fns[0], (memory_info, index.ctypes.data, 8 * index.shape[0], sa + 16, 1, INT64, va + 16))
    if st == 0:
        st = ccall(fns[0], (memory_info, desc.ctypes.data, 8 * desc.shape[0], sa + 24, 1, INT64, va + 24))
    if st == 0:
        st = ccall(fns[0], (memory_info, logits.ctypes.data, 4 * logits.size, sa + 32, 2, FLOAT, va + 32))
    if st == 0:
        st = ccall(fns[1], (session, 0, names.ctypes.data, va, 4, names.ctypes.data + 32, 1, va + 32))
    for i in range(5):
        if buf[i] != 0:
            ccall(fns[2], (buf[i],))
    return st


def supports(manifest: Manifest) -> bool:
    """True when the bundle's ONNX graph carries the cache descriptor this build reads."""
    g = manifest.graphs.get("onnx")
    return bool(g and g.file and g.descriptor == DESCRIPTOR_VERSION)


class NativeBackend:
    """Runs a bundle's uncut ``model.onnx`` (see module docstring).

    Args:
        bundle_dir: the bundle directory.
        manifest: its validated manifest (``graphs["onnx"]`` with ``file`` and ``descriptor``).
        threads: threads of the attention kernels (Model.forward sets them per call; onnxruntime
            itself runs :data:`ORT_THREADS`, or ``threads`` when ``batched``).
        batched: the model runs mostly steps of many rows (see :data:`ORT_THREADS`).
    """

    name = "native"

    def __init__(self, bundle_dir: str | Path, manifest: Manifest, threads: int | None = None,
                 batched: bool = False):
        graph = manifest.graphs.get("onnx")
        if not supports(manifest):
            have = graph.descriptor if graph else None
            raise TqedgeError(f"this bundle's model.onnx has no cache descriptor version {DESCRIPTOR_VERSION} "
                              f"(it has {have}); re-export it or use --backend onnx")
        from tqedge.runtime import native_op, ort_capi

        t0 = time.perf_counter()
        hd = manifest.architecture.head_dim
        self.lib = ort_capi.OrtLib()
        self.op = native_op.make_op(self.lib, [n.scale or 1.0 / math.sqrt(hd) for n in graph.attention])
        self.ort_threads = threads if batched else ORT_THREADS  # None: onnxruntime's default
        self.session = ort_capi.Session(self.lib, Path(bundle_dir) / graph.file, [self.op], threads=self.ort_threads,
                                        config={"session.intra_op.allow_spinning": "0"})
        missing = set(FEEDS) - set(self.session.inputs)
        if missing or LOGITS not in self.session.outputs:
            raise TqedgeError(f"{graph.file} does not have the graph inputs/outputs of the native protocol "
                              f"(missing {', '.join(sorted(missing)) or LOGITS})")
        self.vocab = manifest.architecture.vocab_size
        self._names = [ctypes.create_string_buffer(n.encode()) for n in (*FEEDS, LOGITS)]
        self._name_ptrs = np.array([ctypes.addressof(b) for b in self._names], np.int64)
        self._fns = np.array([self.lib.addr(f) for f in FNS], np.int64)
        self._step = _step
        from tqedge.codec import numba_runtime

        if (threads or numba_runtime.MAX_THREADS) > 1:  # start the op's worker threads now, not in the first prompt
            from tqedge.runtime import coop_pool

            coop_pool.pool(threads or numba_runtime.MAX_THREADS)
        log.info("native: one session (onnxruntime %s C API) in %.2fs", self.lib.version, time.perf_counter() - t0)

    def forward(self, input_ids: np.ndarray, positions: np.ndarray, logits_index: np.ndarray, cache) -> np.ndarray:
        """One step over ``cache`` (prepared for ``len(input_ids)`` tokens); float32 logits (n, vocab)."""
        logits = np.empty((logits_index.shape[0], self.vocab), np.float32)
        st = self._step(self._fns, self.session.session, self.session.memory_info, self._name_ptrs,
                        input_ids, positions, logits_index, cache.descriptor(), logits)
        if st:
            self.lib.check(st, "onnxruntime run failed")
        return logits

    def close(self) -> None:
        """Release the session (then the op may go)."""
        self.session.close()

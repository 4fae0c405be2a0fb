"""Native backend: the uncut ``model.onnx`` in ONE onnxruntime session, attention as a custom op.

The session is created and run through onnxruntime's C API (:mod:`tqedge.runtime.ort_capi`,
ctypes; the ``onnxruntime`` Python module is never imported). Its ``TurboQuantAttention`` nodes
run :mod:`tqedge.runtime.native_op` (Numba machine code) on the thread that calls ``Run``. The
cache is passed on every call as the int64 descriptor ``kv_desc`` (``cache.descriptor()``):
no Python runs between layers and no state is kept in the op, so one backend serves every
cache (chat) of its model, and several models live side by side. A batched step (the rows of
several sequences, :mod:`tqedge.runtime.batch`) passes a batch descriptor: one table of row
ranges, then each sequence's own descriptor.

A bundle exported from a Q4_1 GGUF also has ``AddBlockOffsets`` nodes
(:mod:`tqedge.runtime.native_offsets`: the block minimums of its int4 linears); a layer's
q/k/v split and RoPE are one ``RotaryQKV`` node (:mod:`tqedge.runtime.native_rope`) in bundles
exported from round 26 on, and from round 28 on its Q4_1 linears are ``LinearQ4_1`` nodes on the
GGUF's own blocks (:mod:`tqedge.runtime.native_linear`). The backend owns,
for as long as it lives, everything ORT holds pointers into: the custom-op structs, their
callbacks and strings, the per-layer scales, the session and its options.
"""

from __future__ import annotations

import ctypes
import logging
import math
import time
from pathlib import Path

import numpy as np

from tqedge.bundle import INPUT_IDS, KV_DESC, LOGITS, LOGITS_INDEX, POSITIONS, RESIDENT_DATA, Manifest
from tqedge.codec.numba_runtime import njit
from tqedge.errors import TqedgeError
from tqedge.runtime import kv_descriptor as KD
from tqedge.runtime.memory import (compiler_dirs, fix_mmap_threshold, keep_resident, release_code_pages,
                                   release_file_pages, releasing)
from tqedge.runtime.ort_capi import FLOAT, INT64
from tqedge.runtime.ort_numba import ccall

log = logging.getLogger(__name__)
FEEDS = (INPUT_IDS, POSITIONS, LOGITS_INDEX, KV_DESC)
FNS = ("CreateTensorWithDataAsOrtValue", "Run", "ReleaseValue")
# onnxruntime runs ``threads`` intra-op threads in the native session, their workers asleep
# between parallel sections (:data:`SLEEP_CONFIG`), and the attention op's work items go to the
# cooperative pool. Rounds 12–23 ran one onnxruntime thread for an interactive model: a decode step
# was ~1,800 small nodes, and waking a sleeping worker cost more than it saved on one row. With q/k/v
# and gate/up fused (4 linears per layer, exporters/onnx_emitter.py) the balance turned (round 24,
# SmolLM2 int4, AVX-512 VNNI, 2 cores, benchmarks/ab_step.py medians of 3): a decode step 10.86 →
# 9.95 ms at 512 tokens, 13.99 → 13.25 at 2K, 22.78 → 21.78 at 8K, and a 2K prompt 288 → 382 tok/s.
#: ``spin=True`` (opt-in): onnxruntime gets all of ``threads``, its workers spin before they sleep
#: (onnxruntime's own default), and the attention op hands its work items (prefill tiles, the
#: compressed ring's decode chunks) to that same pool (``KernelContext_ParallelFor``): one pool,
#: awake across the small nodes of a step. Round 21 (SmolLM2 int4, AVX-512 VNNI, 2 cores,
#: docs/RESULTS.md): a decode step 14.8 → 12.8 ms at 512 tokens, 19.6 → 16.2 at 2K, 38.4 → 34.5 at
#: 8K (benchmarks/ab_step.py, medians of 3), bit-identical logits; but beside one busy process it
#: keeps 50 % of its idle decode speed at 2K where the default keeps 89 % (benchmarks/threads.py),
#: and a decoded token costs 33 instead of 25 ms of CPU. Hence not the default.
SPIN_CONFIG = {"session.intra_op.allow_spinning": "1"}
#: The default: pool workers sleep as soon as they find no work (other processes need the cores).
SLEEP_CONFIG = {"session.intra_op.allow_spinning": "0"}


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


@njit(warm=False, nogil=True)
def _tq_decode_plan(d, bias, offset, length, ptr, capacity, slide, encoded, fp_lo):
    """One token's step of a TurboQuant cache, planned in nopython code: what ``SlotRing.prepare(1)``,
    ``CompressedKVCache._plan_decode`` and :func:`kv_descriptor.turboquant` do in Python, written
    into the cache's descriptor ``d`` and its read-bias buffer ``bias`` (S+W,). Returns (ok, the
    slot ring's length, evictions, ptr, the cache's ``encoded``) after the step. Not ok, nothing
    written: the step needs the Python path (the window backlog to encode, a full cache under
    policy "error", or a descriptor of another kind). The token leaving the window gets its codes
    in this step (the op encodes it from its fp16 copy: one token per step, never a burst of W);
    a longer backlog (after a trim, or steps of the Python path) is the Python path's."""
    s, w, r = d[KD.TQ_S], d[KD.TQ_W], d[KD.TQ_R]
    t0 = offset
    if d[KD.KIND] != KD.KIND_TURBOQUANT:
        return False, length, 0, ptr, encoded
    old = t0 - w  # the position whose window slot the new token takes
    enc = -1
    if w > 0 and old >= s and max(encoded, s) <= old:
        if max(encoded, s) < old or old < fp_lo:  # more than one token without codes, or no fp16 copy
            return False, length, 0, ptr, encoded
        enc, encoded = old, old + 1
    evicted = 0
    if length < capacity:
        length += 1
    elif slide:  # evict the oldest non-sink token: the ring pointer moves on (length stays)
        ptr = s + (ptr - s + 1) % (capacity - s)
        evicted = 1
    else:
        return False, length, 0, ptr, encoded
    for i in range(s):
        bias[i] = 0.0 if i <= t0 else -np.inf
    for j in range(w):  # the position window slot j holds once this token is written
        p = t0 - ((t0 - j) % w + w) % w
        bias[s + j] = 0.0 if p >= s and (p >= fp_lo or p == t0) else -np.inf
    lo = max(s, t0 - r + 1)
    hi = t0 + 1 if w == 0 else max(t0 - w + 1, fp_lo)
    n, nr = hi - lo, 0
    if n > 0:
        a = ((lo - s) % r + r) % r
        d[KD.TQ_RANGES], nr = a, 1
        if a + n <= r:
            d[KD.TQ_RANGES + 1] = a + n
        else:
            d[KD.TQ_RANGES + 1], d[KD.TQ_RANGES + 2], d[KD.TQ_RANGES + 3], nr = r, 0, a + n - r, 2
    d[KD.T], d[KD.T0], d[KD.TQ_FP_LO], d[KD.TQ_EXACT_PREFILL] = 1, t0, fp_lo, 0
    d[KD.TQ_MODE], d[KD.TQ_NR], d[KD.TQ_BIAS], d[KD.TQ_ENCODE_OLD] = KD.MODE_DECODE, nr, bias.ctypes.data, enc
    return True, length, evicted, ptr, t0 + 1 if w == 0 and t0 >= s else encoded


@njit(warm=False, nogil=True)
def _tq_decode(fns, session, memory_info, names, ids, vocab, d, bias, offset, length, ptr, capacity, slide,
               encoded, fp_lo):
    """:func:`_tq_decode_plan`, then :func:`_step` for the one token: a whole decode step in one
    call. Returns (0 ok | 1 token id out of range | 2 the Python path | 3 Run failed, the
    ``OrtStatus*``, the (1, vocab) logits, then the counters of :func:`_tq_decode_plan`). The
    cache's counters are the caller's to store, and only on 0."""
    logits = np.empty((1, vocab), np.float32)
    if ids[0] < 0 or ids[0] >= vocab:
        return 1, 0, logits, length, 0, ptr, encoded
    ok, length, evicted, ptr, encoded = _tq_decode_plan(d, bias, offset, length, ptr, capacity, slide, encoded, fp_lo)
    if not ok:
        return 2, 0, logits, length, 0, ptr, encoded
    positions = np.full(1, offset, np.int64)
    index = np.zeros(1, np.int64)
    st = _step(fns, session, memory_info, names, ids, positions, index, d, logits)
    return (3 if st else 0), st, logits, length, evicted, ptr, encoded


def supports(manifest: Manifest) -> bool:
    """True when the bundle's ONNX graph carries the cache descriptor this build reads and only
    custom ops it has (:func:`tqedge.runtime.backends.runs`)."""
    from tqedge.runtime.backends import runs

    return runs("native", manifest)


class NativeBackend:
    """Runs a bundle's uncut ``model.onnx`` (see module docstring).

    Args:
        bundle_dir: the bundle directory.
        manifest: its validated manifest (``graphs["onnx"]`` with ``file`` and ``descriptor``).
        threads: onnxruntime's intra-op threads and the attention op's work items (Model.forward
            sets those per call); None: every usable core (onnxruntime's default when ``batched``).
        batched: the model runs mostly steps of many rows (a server, an evaluation).
        spin: onnxruntime's workers spin, and the op's items run on them (:data:`SPIN_CONFIG`).
    """

    name = "native"

    def __init__(self, bundle_dir: str | Path, manifest: Manifest, threads: int | None = None,
                 batched: bool = False, spin: bool = False):
        graph = manifest.graphs.get("onnx")
        if not supports(manifest):
            from tqedge.runtime.backends import choose_backend

            choose_backend(manifest, "native")  # raises what the bundle lacks (a re-export, custom ops)
        from tqedge.codec import numba_runtime
        from tqedge.runtime import native_linear, native_offsets, native_op, native_rope, ort_capi

        t0 = time.perf_counter()
        hd = manifest.architecture.head_dim
        self.lib = ort_capi.OrtLib()
        n = threads or numba_runtime.MAX_THREADS
        self.ort_threads = threads if batched else n  # batched, None: onnxruntime's default
        self.op_on_ort_pool = spin and self.ort_threads != 1
        self.op = native_op.make_op(self.lib, [n.scale or 1.0 / math.sqrt(hd) for n in graph.attention],
                                    parallel=self.op_on_ort_pool)
        pool = 0
        if not self.op_on_ort_pool and n > 1:
            from tqedge.runtime import coop_pool  # the ops' workers now, not in the first prompt

            pool = coop_pool.pool(n).address
        self.offsets_op = native_offsets.make_op(self.lib, threads=n, pool=pool, lock=numba_runtime.LOCK_ADDRESS,
                                                 parallel=self.op_on_ort_pool)  # Q4_1 GGUFs' graphs
        self.rope_op = native_rope.make_op(self.lib)  # bundles exported from round 26 on
        self.linear_op = native_linear.make_op(self.lib, threads=n, pool=pool, lock=numba_runtime.LOCK_ADDRESS,
                                               parallel=self.op_on_ort_pool)  # round 28 on: Q4_1 linears
        # the op's kernels are loaded: the compiler's library, and the code of the imports that ran once,
        # are not held while the session packs the weights (memory.py)
        release_file_pages(compiler_dirs())
        release_code_pages()
        fix_mmap_threshold()  # the op's per-call temporaries go back to the OS (memory.py; not the segments')
        with releasing([str(bundle_dir)]):  # the weights' file pages go while onnxruntime packs them
            self.session = ort_capi.Session(self.lib, Path(bundle_dir) / graph.file,
                                            [self.op, self.offsets_op, self.rope_op, self.linear_op],
                                            threads=self.ort_threads,
                                            config=SPIN_CONFIG if spin else SLEEP_CONFIG)
        resident = [p for p in (Path(bundle_dir) / Path(graph.file).parent / RESIDENT_DATA,) if p.is_file()]
        keep_resident(resident)  # LinearQ4_1's weights: read in place every step, never released
        release_file_pages([str(bundle_dir)])  # the rest, once the build is done
        missing = set(FEEDS) - set(self.session.inputs)
        if missing or LOGITS not in self.session.outputs:
            raise TqedgeError(f"{graph.file} does not have the graph inputs/outputs of the native protocol "
                              f"(missing {', '.join(sorted(missing)) or LOGITS})")
        self.vocab = manifest.architecture.vocab_size
        self._names = [ctypes.create_string_buffer(n.encode()) for n in (*FEEDS, LOGITS)]
        self._name_ptrs = np.array([ctypes.addressof(b) for b in self._names], np.int64)
        self._fns = np.array([self.lib.addr(f) for f in FNS], np.int64)
        self._step = _step
        log.info("native: one session (onnxruntime %s C API) in %.2fs", self.lib.version, time.perf_counter() - t0)

    def forward(self, input_ids: np.ndarray, positions: np.ndarray, logits_index: np.ndarray, cache) -> np.ndarray:
        """One step over ``cache`` (prepared for ``len(input_ids)`` tokens); float32 logits (n, vocab)."""
        logits = np.empty((logits_index.shape[0], self.vocab), np.float32)
        st = self._step(self._fns, self.session.session, self.session.memory_info, self._name_ptrs,
                        input_ids, positions, logits_index, cache.descriptor(), logits)
        if st:
            self.lib.check(st, "onnxruntime run failed")
        return logits

    def decode(self, ids: np.ndarray, cache):
        """The next token's logits (vocab,) when ``cache`` is a TurboQuant cache past its first step
        and this step needs no Python (see :func:`_tq_decode`): prepare, Run and commit in one
        nopython call. None otherwise (nothing changed): then ``Model.forward`` takes the
        general path, which also raises any error."""
        d = cache._native_desc
        if d is None or d[KD.KIND] != KD.KIND_TURBOQUANT:
            return None
        s = cache.slots
        code, st, logits, length, evicted, ptr, encoded = _tq_decode(
            self._fns, self.session.session, self.session.memory_info, self._name_ptrs, ids, self.vocab, d,
            cache._native_bias, s.offset, s.length, s._ptr, s.capacity, s.policy == "slide", cache.encoded,
            cache.fp_lo)
        if code == 3:
            self.lib.check(st, "onnxruntime run failed")
        if code:
            return None
        s.offset, s.length, s._ptr, cache.encoded = s.offset + 1, length, ptr, encoded
        s.evicted += evicted
        return logits[0]

    def close(self) -> None:
        """Release the session (then the op may go)."""
        self.session.close()

"""LiteRT (ai-edge-litert) backend: runs the dense segments of ``model.tflite`` and the
TurboQuant attention between them.

Why signatures and not a registered custom kernel: the Python ``Interpreter`` can only load
custom kernels from a compiled registration function (``custom_op_registerers`` takes a C++
``MutableOpResolver*`` registrar by symbol name or pointer), and LiteRT's C API route
(``LiteRtAddCustomOpKernelOption`` on a ``CompiledModel``) needs a C-ABI kernel struct with
init/layout/run callbacks over locked tensor buffers — a Python callback there would cross the
C boundary with the GIL once per layer and tie us to an experimental ABI. Instead the exporter
writes one signature per segment between attention ops (all sharing the weight buffers of one
memory-mapped file, plus the whole graph with the ``CUSTOM`` nodes as subgraph 0 for
inspection), and this backend runs segment → ``cache.attend`` → segment, exactly like the ONNX
backend. This relies only on the stable ``Interpreter.get_signature_runner`` API and on
``Buffer.offset`` (weights outside the flatbuffer): ``ai-edge-litert>=1.4,<3`` (tests pass on
1.4.0 and 2.3.0; 1.2.0 runs fp32/int8 but its GATHER rejects the fp16 embedding table).

Memory: XNNPACK packs the weights of every subgraph into its own memory on the first step (the
interpreter applies the delegate lazily, to all subgraphs at once); the mapped file pages it
read from then only serve row lookups (embedding GATHER). After that first step the backend
drops them from the process (:func:`tqedge.runtime.memory.release_file_pages`, Linux only;
pages fault back in from the file if touched), so RSS is the packed weights + arenas, not twice
the weights. The peak during that first step still holds both (clean file pages, reclaimable).

Dynamic T: every segment's first dimension is resizable. The interpreter re-plans a
subgraph's memory only when an input's shape changes, so a decode loop (T = 1 every step)
allocates once, and a prefill of T tokens costs one re-plan per segment.
"""

from __future__ import annotations

import logging
import math
import os
import threading
from pathlib import Path

import numpy as np

from tqedge.bundle import INPUT_IDS, LOGITS, LOGITS_INDEX, POSITIONS, Manifest
from tqedge.errors import TqedgeError
from tqedge.runtime.memory import release_file_pages

try:
    from ai_edge_litert.interpreter import Interpreter
except ImportError as e:  # re-raised by the backend registry as "backend needs ai-edge-litert"
    raise ImportError(f"ai-edge-litert is not installed ({e})") from None

log = logging.getLogger(__name__)


class LiteRTBackend:
    """Runs a bundle's ``graphs["tflite"]`` with the LiteRT interpreter.

    Args:
        bundle_dir: bundle directory.
        manifest: its validated manifest (must have a "tflite" graph).
        threads: interpreter threads (None = all cores, as onnxruntime's default).
        batched: unused (every step already runs on ``threads``).
        spin: unused (the native backend's option).
    """

    name = "tflite"

    def __init__(self, bundle_dir, manifest: Manifest, threads: int | None = None, batched: bool = False,
                 spin: bool = False):
        graph = manifest.graphs.get("tflite")
        if graph is None or not graph.file:
            raise TqedgeError("this bundle has no tflite graph (re-export with --format tflite)")
        path = Path(bundle_dir) / graph.file
        if not path.is_file():
            raise TqedgeError(f"tflite graph file missing: {path}")
        threads = threads or os.cpu_count() or 1
        self.interpreter = Interpreter(model_path=str(path), num_threads=int(threads))
        have = self.interpreter.get_signature_list()
        missing = [s for s in graph.segments if s not in have]
        if missing:
            raise TqedgeError(f"{graph.file} has no signature {missing[0]!r} (bundle and graph disagree)")
        self.runners = [self.interpreter.get_signature_runner(s) for s in graph.segments]
        self._lock = threading.Lock()  # a TFLite interpreter must not run two steps at once
        self.path = path
        self._released = False
        self.inputs = [list(have[s]["inputs"]) for s in graph.segments]
        self.attention = graph.attention
        d = manifest.architecture.head_dim
        self.scales = [n.scale or 1.0 / math.sqrt(d) for n in graph.attention]
        log.debug("litert: %s, %d segments, %d threads", path.name, len(self.runners), threads)

    def forward(self, input_ids: np.ndarray, positions: np.ndarray, logits_index: np.ndarray, cache) -> np.ndarray:
        """Run one step (the cache is already prepared for T tokens).

        Args:
            input_ids: int64 (T,) token ids.
            positions: int64 (T,) absolute positions.
            logits_index: int64 (n,) rows of the T positions that get logits.
            cache: the KV cache (``attend`` is called once per layer).

        Returns:
            float32 (n, vocab) logits.
        """
        env = {INPUT_IDS: np.ascontiguousarray(input_ids, np.int64),  # (T,)
               POSITIONS: np.ascontiguousarray(positions, np.int64),  # (T,)
               LOGITS_INDEX: np.ascontiguousarray(logits_index, np.int64)}  # (n,)
        last = len(self.runners) - 1
        with self._lock:
            for i, (run, names) in enumerate(zip(self.runners, self.inputs)):
                env.update(run(**{n: env[n] for n in names}))
                if i < last:
                    node = self.attention[i]
                    env[node.out] = cache.attend(node.layer, env[node.q], env[node.k], env[node.v],
                                                 self.scales[i])  # (T, Hq, D)
            if not self._released:  # all subgraphs are prepared and their weights packed
                self._released = True
                release_file_pages([self.path])
        return env[LOGITS]  # (n, vocab)

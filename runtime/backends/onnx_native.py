"""Native backend: the uncut ``model.onnx`` in ONE onnxruntime session, attention as a custom op.

The session is created and run through onnxruntime's C API (:mod:`tqedge.runtime.ort_capi`,
ctypes; the ``onnxruntime`` Python module is never imported). Its ``TurboQuantAttention`` nodes
run :mod:`tqedge.runtime.native_op` (Numba machine code) on the thread that calls ``Run``. The
cache is passed on every call as the int64 descriptor ``kv_desc`` (``cache.descriptor()``):
no Python runs between layers and no state is kept in the op, so one backend serves every
cache (chat) of its model, and several models live side by side.

The backend owns, for as long as it lives, everything ORT holds pointers into: the custom-op
struct, its callbacks and strings, the per-layer scales, the session and its options.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import numpy as np

from tqedge.bundle import DESCRIPTOR_VERSION, INPUT_IDS, KV_DESC, LOGITS, LOGITS_INDEX, POSITIONS, Manifest
from tqedge.errors import TqedgeError

log = logging.getLogger(__name__)


def supports(manifest: Manifest) -> bool:
    """True when the bundle's ONNX graph carries the cache descriptor this build reads."""
    g = manifest.graphs.get("onnx")
    return bool(g and g.file and g.descriptor == DESCRIPTOR_VERSION)


class NativeBackend:
    """Runs a bundle's uncut ``model.onnx`` (see module docstring).

    Args:
        bundle_dir: the bundle directory.
        manifest: its validated manifest (``graphs["onnx"]`` with ``file`` and ``descriptor``).
        threads: onnxruntime intra-op threads (None = onnxruntime default).
    """

    name = "native"

    def __init__(self, bundle_dir: str | Path, manifest: Manifest, threads: int | None = None):
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
        self.session = ort_capi.Session(self.lib, Path(bundle_dir) / graph.file, [self.op], threads=threads,
                                        config={"session.intra_op.allow_spinning": "0"})
        missing = {INPUT_IDS, POSITIONS, LOGITS_INDEX, KV_DESC} - set(self.session.inputs)
        if missing or LOGITS not in self.session.outputs:
            raise TqedgeError(f"{graph.file} does not have the graph inputs/outputs of the native protocol "
                              f"(missing {', '.join(sorted(missing)) or LOGITS})")
        log.info("native: one session (onnxruntime %s C API) in %.2fs", self.lib.version, time.perf_counter() - t0)

    def forward(self, input_ids: np.ndarray, positions: np.ndarray, logits_index: np.ndarray, cache) -> np.ndarray:
        """One step over ``cache`` (prepared for ``len(input_ids)`` tokens); float32 logits (n, vocab)."""
        feeds = {INPUT_IDS: input_ids, POSITIONS: positions, LOGITS_INDEX: logits_index, KV_DESC: cache.descriptor()}
        (logits,) = self.session.run(feeds, [LOGITS])
        return logits

    def close(self) -> None:
        """Release the session (then the op may go)."""
        self.session.close()

"""ONNX Runtime backend: one InferenceSession per dense segment, attention in the KV cache.

``forward`` runs segment 0 → ``cache.attend`` (layer 0) → segment 1 → … → segment L, keeping
one dict of named tensors (the segment protocol in docs/ARCHITECTURE.md). Per-step Python work
is kept to a dict lookup per segment input and one ``run`` call with explicit output names;
a tensor leaves the dict after its last reader, so a prefill chunk holds about one layer's
activations, not all of them.

Memory (measured, SmolLM2 int4, 512-token prompt): every session used to keep its own memory
arena (~600 MiB over 31 segments); all sessions now allocate from one arena registered once
per process in onnxruntime's environment (``session.use_env_allocators``). Weights stay as
onnxruntime loads external data: memory-mapped, except what MatMulNBits prepacks into its own
buffers (that copy is what makes int4 fast: without prepacking decode is ~100x slower).

Imports only onnxruntime and numpy (never onnx): the device runtime stays small.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from tqedge.bundle import INPUT_IDS, LOGITS, LOGITS_INDEX, POSITIONS, Manifest
from tqedge.errors import TqedgeError

log = logging.getLogger(__name__)

_SHARED_ARENA: list[bool] = []  # one per process: onnxruntime's environment is process-wide


def shared_arena() -> bool:
    """Register one CPU arena in onnxruntime's environment, once per process; True when it is
    (or already was) registered, so sessions may share it (``session.use_env_allocators``).

    The arena grows only by what is requested (``kSameAsRequested``), not to the next power
    of two.
    """
    if not _SHARED_ARENA:
        mem = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
        try:
            ort.create_and_register_allocator(mem, ort.OrtArenaCfg({"arena_extend_strategy": 1}))
            _SHARED_ARENA.append(True)
        except Exception as e:  # noqa: BLE001  (onnxruntime raises its own Fail type)
            if "already" not in str(e).lower():
                log.warning("onnx: no shared arena (%s); each session keeps its own", str(e).splitlines()[0])
                return False
            _SHARED_ARENA.append(True)
    return True


def session_options(threads: int | None) -> ort.SessionOptions:
    """CPU session options shared by every segment.

    Args:
        threads: intra-op threads (None: onnxruntime's default, one per physical core).
    """
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.inter_op_num_threads = 1
    if threads:
        so.intra_op_num_threads = int(threads)
    # Between segments Python runs attention; spinning pool threads would steal its core.
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.log_severity_level = 3
    if shared_arena():
        so.add_session_config_entry("session.use_env_allocators", "1")
    return so


def _expanded_scales(bundle_dir: Path, manifest: Manifest) -> dict[int, dict[str, ort.OrtValue]]:
    """nf4-dq bundles: segment index → its absmax initializers, expanded to fp32 from the
    double-quantized side file (runtime/dq_scales.py); {} for every other format."""
    if not manifest.weights.scales:
        return {}
    from tqedge.runtime import dq_scales

    return {s: {n: ort.OrtValue.ortvalue_from_numpy(a) for n, a in arrays.items()}
            for s, arrays in dq_scales.read(bundle_dir / manifest.weights.scales).items()}


def _with_initializers(so: ort.SessionOptions, values: dict[str, ort.OrtValue]) -> ort.SessionOptions:
    so.add_external_initializers(list(values), list(values.values()))
    return so


class OnnxBackend:
    """Runs a bundle's ONNX segments.

    Args:
        bundle_dir: the bundle directory.
        manifest: its validated manifest (must have ``graphs["onnx"]``).
        threads: intra-op threads per session (None = onnxruntime default).
        batched: unused (every step already runs on ``threads``).
        spin: unused (the native backend's option; here pool threads that spin would take the
            core from the attention that runs between graphs).
    """

    name = "onnx"

    def __init__(self, bundle_dir: str | Path, manifest: Manifest, threads: int | None = None,
                 batched: bool = False, spin: bool = False):
        graph = manifest.graphs.get("onnx")
        if graph is None:
            raise TqedgeError("this bundle has no ONNX graph")
        bundle_dir = Path(bundle_dir)
        so = session_options(threads)
        t0 = time.perf_counter()
        self.sessions = []
        self._scales = _expanded_scales(bundle_dir, manifest)  # nf4-dq: kept alive with the sessions
        for s, rel in enumerate(graph.segments):
            try:
                opts = _with_initializers(session_options(threads), self._scales[s]) if s in self._scales else so
                self.sessions.append(ort.InferenceSession(str(bundle_dir / rel), opts, providers=["CPUExecutionProvider"]))
            except (ort.capi.onnxruntime_pybind11_state.Fail, ort.capi.onnxruntime_pybind11_state.InvalidGraph,
                    ort.capi.onnxruntime_pybind11_state.NoSuchFile, ort.capi.onnxruntime_pybind11_state.InvalidProtobuf) as e:
                raise TqedgeError(f"cannot load ONNX segment {rel}: {str(e).splitlines()[0]}") from None
        self.inputs = [[i.name for i in s.get_inputs()] for s in self.sessions]
        self.outputs = [[o.name for o in s.get_outputs()] for s in self.sessions]
        head_dim = manifest.architecture.head_dim
        self.attention = [(n.layer, n.q, n.k, n.v, n.out, n.scale or 1.0 / math.sqrt(head_dim)) for n in graph.attention]
        self.dead = dead_after(self.inputs, self.outputs, self.attention)
        log.info("onnx: %d segment sessions in %.2fs", len(self.sessions), time.perf_counter() - t0)

    def forward(self, input_ids: np.ndarray, positions: np.ndarray, logits_index: np.ndarray, cache) -> np.ndarray:
        """Run the dense segments with attention over ``cache`` in between.

        Args:
            input_ids: int64 (T,).
            positions: int64 (T,) absolute positions.
            logits_index: int64 (n,) rows of the T positions that get logits.
            cache: a prepared KV cache (``cache.prepare(T)`` already called).

        Returns:
            float32 logits (n, vocab).
        """
        env = {INPUT_IDS: input_ids, POSITIONS: positions, LOGITS_INDEX: logits_index}
        last = len(self.sessions) - 1
        for s, sess in enumerate(self.sessions):
            names = self.outputs[s]
            outs = sess.run(names, {n: env[n] for n in self.inputs[s]})
            env.update(zip(names, outs))
            if s < last:
                layer, q, k, v, out, scale = self.attention[s]
                env[out] = cache.attend(layer, env[q], env[k], env[v], scale)
            for name in self.dead[s]:
                del env[name]
        return env[LOGITS]


def dead_after(inputs: list[list[str]], outputs: list[list[str]], attention: list[tuple]) -> list[list[str]]:
    """Per segment ``s``: the tensor names nothing reads after segment ``s`` and attention ``s``
    (their last reader, or their producer when nothing reads them), to drop from the forward's
    dict there. The logits stay."""
    last: dict[str, int] = {}
    for s, names in enumerate(inputs):
        read = names + (list(attention[s][1:4]) if s < len(attention) else [])
        for name in outputs[s] + read:
            last[name] = s
    dead: list[list[str]] = [[] for _ in inputs]
    for name, s in last.items():
        if name != LOGITS:
            dead[s].append(name)
    return dead

"""Graph backends, by name: ``Backend(bundle_dir, manifest, threads).forward(ids, positions,
logits_index, cache) -> logits``. ``onnx`` / ``tflite`` run the dense segments and call the
cache's attention between them (``onnx`` is the default: measured faster); ``native`` runs the
uncut ``model.onnx`` in one onnxruntime session with the attention op in Numba (opt-in with
``backend="native"``; needs Numba and a graph that carries the cache descriptor). Imported lazily so a missing
optional runtime costs nothing.
"""

from __future__ import annotations

import importlib
import importlib.util
import os

from tqedge.errors import TqedgeError

# name -> (class, packages it needs, the manifest graph it runs)
# Order = preference. The segment path comes first: on a quiet 2-core x86 machine it decoded
# SmolLM2 int4 at 512 tokens in 31.5 ms/step against the native session's 54.5 ms (the native
# session does not yet gain from its second intra-op thread) at nearly the same peak RSS
# (463 vs 443 MiB). ``--backend native`` opts in.
BACKENDS = {
    "onnx": ("tqedge.runtime.backends.onnx:OnnxBackend", "onnxruntime", "onnx"),
    "native": ("tqedge.runtime.backends.onnx_native:NativeBackend", "onnxruntime and numba", "onnx"),
    "tflite": ("tqedge.runtime.backends.litert:LiteRTBackend", "ai-edge-litert", "tflite"),
}


def available(name: str) -> bool:
    """True when the backend's runtime packages are there (native: found, not imported;
    ``TQEDGE_KERNELS=numpy`` turns it off)."""
    target, _, _ = BACKENDS[name]
    if name == "native":
        if os.environ.get("TQEDGE_KERNELS", "").strip().lower() == "numpy":
            return False
        if importlib.util.find_spec("numba") is None:
            return False
        from tqedge.runtime.ort_capi import library_path

        try:
            library_path()
        except TqedgeError:
            return False
        return True
    try:
        importlib.import_module(target.split(":")[0])
    except ImportError:
        return False
    return True


def runs(name: str, manifest) -> bool:
    """True when the bundle has what backend ``name`` runs."""
    graph = manifest.graphs.get(BACKENDS[name][2])
    if graph is None:
        return False
    if name == "native":
        from tqedge.bundle import DESCRIPTOR_VERSION

        # the native op has no sliding-window read rule yet, and the one session does not yet
        # receive nf4-dq's expanded scales: such bundles run on the segments
        sliding = "sliding_attention" in (manifest.architecture.layer_types or ())
        return (bool(graph.file) and graph.descriptor == DESCRIPTOR_VERSION and not sliding
                and not manifest.weights.scales)
    return True


def get_backend(name: str):
    """Return the backend class registered as ``name``."""
    if name not in BACKENDS:
        raise TqedgeError(f"unknown backend {name!r} (choose from {', '.join(BACKENDS)})")
    target, package, _ = BACKENDS[name]
    mod_name, attr = target.split(":")
    try:
        mod = importlib.import_module(mod_name)
    except ImportError as e:
        raise TqedgeError(f"backend {name!r} needs {package}: {e}") from None
    return getattr(mod, attr)


def choose_backend(manifest, requested: str | None = None) -> str:
    """Pick a backend: the requested one, else the first the bundle has and this device can run."""
    if requested:
        if requested not in BACKENDS:
            raise TqedgeError(f"unknown backend {requested!r} (choose from {', '.join(BACKENDS)})")
        if not runs(requested, manifest):
            raise TqedgeError(f"this bundle has no graph the {requested!r} backend runs "
                              f"(it has: {', '.join(manifest.graphs) or 'none'}; native needs a re-export)")
        return requested
    for name in BACKENDS:
        if runs(name, manifest) and available(name):
            return name
    raise TqedgeError(f"no installed backend can run this bundle (graphs: {', '.join(manifest.graphs) or 'none'})")

"""Graph backends, by name: ``Backend(bundle_dir, manifest, threads).forward(ids, positions,
logits_index, cache) -> logits``. ``native`` (the default where it runs) runs the uncut
``model.onnx`` in one onnxruntime session with the attention op in Numba (needs Numba and a
graph that carries the cache descriptor); ``onnx`` / ``tflite`` run the dense segments and call
the cache's attention between them. Imported lazily so a missing optional runtime costs nothing.
"""

from __future__ import annotations

import importlib
import importlib.util
import os

from tqedge.errors import TqedgeError

# name -> (class, packages it needs, the manifest graph it runs)
# Order = preference. The native session comes first where it runs (see docs/RESULTS.md, "native
# backend, round 12": faster decode and prefill than the segments on SmolLM2 int4 at every measured
# context, at lower peak RSS). The segments run what it cannot (nf4-dq
# weights, fractional-bit or QJL caches).
BACKENDS = {
    "native": ("tqedge.runtime.backends.onnx_native:NativeBackend", "onnxruntime and numba", "onnx"),
    "onnx": ("tqedge.runtime.backends.onnx:OnnxBackend", "onnxruntime", "onnx"),
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
        from tqedge.bundle import DESCRIPTOR_VERSION, NATIVE_OPS

        # the one session does not yet receive nf4-dq's expanded scales: such bundles run on the
        # segments (sliding-window layers run natively: runtime/native_sliding.py)
        return bool(graph.file) and graph.descriptor == DESCRIPTOR_VERSION and set(graph.ops) <= set(NATIVE_OPS) \
            and not manifest.weights.scales
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


def choose_backend(manifest, requested: str | None = None, cache_defaults: dict | None = None) -> str:
    """Pick a backend: the requested one, else the first the bundle has and this device can run
    (for ``cache_defaults``, the load-time cache options)."""
    if requested:
        if requested not in BACKENDS:
            raise TqedgeError(f"unknown backend {requested!r} (choose from {', '.join(BACKENDS)})")
        if not runs(requested, manifest):
            missing = _missing_ops(manifest) if requested == "native" else []
            if missing:
                raise TqedgeError(f"this bundle's model.onnx uses custom ops this tqedge does not have "
                                  f"({', '.join(missing)}); upgrade tqedge or use --backend onnx")
            raise TqedgeError(f"this bundle has no graph the {requested!r} backend runs "
                              f"(it has: {', '.join(manifest.graphs) or 'none'}; native needs a re-export)")
        return requested
    for name in BACKENDS:
        if runs(name, manifest) and available(name) and (name != "native" or _native_caches(manifest, cache_defaults)):
            return name
    raise TqedgeError(f"no installed backend can run this bundle (graphs: {', '.join(manifest.graphs) or 'none'})")


def _missing_ops(manifest) -> list[str]:
    """Custom op types of the bundle's uncut ONNX graph that this build does not run natively."""
    from tqedge.bundle import NATIVE_OPS

    graph = manifest.graphs.get("onnx")
    return sorted(set(graph.ops) - set(NATIVE_OPS)) if graph and graph.file else []


def _native_caches(manifest, cache_defaults: dict | None) -> bool:
    from tqedge.runtime.kv_descriptor import supports

    return supports(manifest, **{k: v for k, v in (cache_defaults or {}).items() if k in ("kv_bits", "qjl")})

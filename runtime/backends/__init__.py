"""Graph backends, by name. Each backend runs a bundle's dense segments and calls the cache's
attention between them: ``Backend(bundle_dir, manifest, threads).forward(ids, positions,
logits_index, cache) -> logits``. Imported lazily so a missing optional runtime costs nothing.
"""

from __future__ import annotations

import importlib

from tqedge.errors import TqedgeError

BACKENDS = {
    "onnx": ("tqedge.runtime.backends.onnx:OnnxBackend", "onnxruntime"),
    "tflite": ("tqedge.runtime.backends.litert:LiteRTBackend", "ai-edge-litert"),
}


def available(name: str) -> bool:
    """True when the backend's runtime package imports."""
    target, _ = BACKENDS[name]
    try:
        importlib.import_module(target.split(":")[0])
    except ImportError:
        return False
    return True


def get_backend(name: str):
    """Return the backend class registered as ``name``."""
    if name not in BACKENDS:
        raise TqedgeError(f"unknown backend {name!r} (choose from {', '.join(BACKENDS)})")
    target, package = BACKENDS[name]
    mod_name, attr = target.split(":")
    try:
        mod = importlib.import_module(mod_name)
    except ImportError as e:
        raise TqedgeError(f"backend {name!r} needs {package}: {e}") from None
    return getattr(mod, attr)


def choose_backend(manifest, requested: str | None = None) -> str:
    """Pick a backend: the requested one, else the first the bundle has and this device can run."""
    if requested:
        if requested not in manifest.graphs:
            raise TqedgeError(f"this bundle has no {requested!r} graph (it has: {', '.join(manifest.graphs) or 'none'})")
        return requested
    for name in BACKENDS:
        if name in manifest.graphs and available(name):
            return name
    raise TqedgeError(f"no installed backend can run this bundle (graphs: {', '.join(manifest.graphs) or 'none'})")

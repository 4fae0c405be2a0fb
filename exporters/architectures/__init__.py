"""Architecture registry: each entry knows its hyper-parameters (a small args dataclass built
from an HF ``config.json`` or GGUF metadata), its explicit tensor-name tables, and a
``sanitize(weights, args)`` hook that turns source tensors into canonical ones (see
:mod:`tqedge.exporters.spec`). Add an architecture by adding a module and a row here.
"""

from __future__ import annotations

from tqedge.errors import TqedgeError
from tqedge.exporters.architectures.llama import LLAMA, Architecture
from tqedge.exporters.architectures.gemma3 import GEMMA3
from tqedge.exporters.architectures.qwen2 import QWEN2
from tqedge.exporters.architectures.qwen3 import QWEN3

ARCHITECTURES: dict[str, Architecture] = {a.name: a for a in (LLAMA, QWEN2, QWEN3, GEMMA3)}


def get_architecture(name: str) -> Architecture:
    """The registered architecture called ``name`` (``"llama"``, ``"qwen2"``, ``"qwen3"``, ``"gemma3"``)."""
    if name not in ARCHITECTURES:
        raise TqedgeError(f"unsupported architecture {name!r} (supported: {', '.join(sorted(ARCHITECTURES))})")
    return ARCHITECTURES[name]


def from_hf_class(classes: list[str] | None, model_type: str | None = None) -> Architecture:
    """The architecture whose HF class name appears in a ``config.json``'s ``architectures``
    (or, when that list is absent, whose name is its ``model_type``)."""
    for cls in classes if isinstance(classes, list) else []:
        for arch in ARCHITECTURES.values():
            if cls in arch.hf_classes:
                return arch
    if not classes and model_type in ARCHITECTURES:
        return ARCHITECTURES[model_type]
    known = sorted(c for a in ARCHITECTURES.values() for c in a.hf_classes)
    named = classes[0] if isinstance(classes, list) and len(classes) == 1 else classes or model_type
    raise TqedgeError(f"unsupported architecture {named!r} in config.json (supported: {', '.join(known)})")


def from_gguf_arch(name: str) -> Architecture:
    """The architecture for a GGUF ``general.architecture`` value."""
    for arch in ARCHITECTURES.values():
        if arch.gguf_arch == name:
            return arch
    known = sorted(a.gguf_arch for a in ARCHITECTURES.values() if a.gguf_arch)
    raise TqedgeError(f"unsupported GGUF architecture {name!r} (supported: {', '.join(known)})")

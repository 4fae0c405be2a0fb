"""tqedge: chat LLMs on small devices with a TurboQuant-compressed, budgeted KV cache.

The public API is small on purpose::

    import tqedge
    model = tqedge.load("smollm2.tqe", kv_budget="32MiB")
    print(model.generate("Hello", max_tokens=32))
    for piece in model.stream("Tell me a story"):
        print(piece, end="")
    chat = model.chat(system="You are terse.")
    print(chat.send("Hi!"))

``tqedge.export`` (workstation only, needs the ``export`` extra) turns a GGUF file or a
Hugging Face folder into a bundle. Nothing is imported eagerly: ``import tqedge`` is cheap.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__", "load", "export", "TqedgeError"]

from tqedge.errors import TqedgeError


def load(bundle, **kwargs):
    """Load a bundle for inference. See :func:`tqedge.runtime.model.load` for arguments."""
    from tqedge.runtime.model import load as _load

    return _load(bundle, **kwargs)


def export(src, out, **kwargs):
    """Export a model to a bundle. See :func:`tqedge.exporters.export.export` for arguments."""
    from tqedge.exporters.export import export as _export

    return _export(src, out, **kwargs)

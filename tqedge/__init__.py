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


def _source_tree_subpackages() -> None:
    """Make ``tqedge.runtime`` / ``tqedge.exporters`` importable from a source checkout.

    The repository keeps ``runtime/`` and ``exporters/`` at its root; an install maps them
    under ``tqedge``. When this package is imported from the checkout itself (the repository
    root on ``sys.path``, e.g. running a README snippet or ``python -m tqedge.cli`` there), the
    root is added to this package's search path so the two subpackages resolve to the same
    files an editable install would use.
    """
    import os

    here = os.path.dirname(os.path.abspath(__file__))
    root = os.path.dirname(here)
    if all(os.path.isfile(os.path.join(root, sub, "__init__.py")) for sub in ("runtime", "exporters")) \
            and os.path.isfile(os.path.join(root, "pyproject.toml")) and root not in __path__:
        __path__.append(root)


_source_tree_subpackages()


def load(bundle, **kwargs):
    """Load a bundle for inference. See :func:`tqedge.runtime.model.load` for arguments."""
    from tqedge.runtime.model import load as _load

    return _load(bundle, **kwargs)


def export(src, out, **kwargs):
    """Export a model to a bundle. See :func:`tqedge.exporters.export.export` for arguments."""
    from tqedge.exporters.export import export as _export

    return _export(src, out, **kwargs)

"""Model sources: each reads one on-disk format into a :class:`~tqedge.exporters.spec.ModelSpec`.

Dispatch is by what the path looks like (:data:`SOURCES`, first match wins).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from tqedge.errors import TqedgeError


def _is_gguf(p: Path) -> bool:
    return p.is_file() and p.suffix.lower() in (".gguf", ".whl")


def _is_hf(p: Path) -> bool:
    return p.is_dir() and (p / "config.json").is_file()


def _load_gguf(p: Path):
    from tqedge.exporters.sources.gguf import load_gguf

    return load_gguf(p)


def _load_hf(p: Path):
    from tqedge.exporters.sources.hf import load_hf

    return load_hf(p)


SOURCES: list[tuple[str, Callable[[Path], bool], Callable]] = [
    ("gguf", _is_gguf, _load_gguf),
    ("hf", _is_hf, _load_hf),
]


def load_source(src) -> "ModelSpec":  # noqa: F821
    """Read a GGUF file, a wheel containing one, or an HF folder into a ModelSpec.

    Raises:
        TqedgeError: when the path is none of those, or the model cannot be read.
    """
    p = Path(src)
    if not p.exists():
        raise TqedgeError(f"source not found: {p}")
    for _, matches, load in SOURCES:
        if matches(p):
            return load(p)
    raise TqedgeError(f"{p}: not a .gguf file, a .whl with a .gguf inside, or a folder with config.json")

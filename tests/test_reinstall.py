"""A newcomer's reinstall sequence keeps working (issue 12): ``pip install .``, run a command
that compiles kernels, then ``pip install -e .`` in the same venv — every ``tqedge`` command
still works, and nothing was written inside ``site-packages/tqedge`` at run time (Numba's cache
files there once turned ``tqedge/`` into a namespace package that shadowed the editable
install: ``cannot import name '__version__'``).

Fast and offline: a fresh venv whose dependencies are the running interpreter's (linked in
through a ``.pth`` file, without this environment's own tqedge), ``--no-deps
--no-build-isolation --no-index`` installs of a copy of the repository (setuptools, the build
backend, comes from the ``test`` extra).
"""

from __future__ import annotations

import os
import shutil
import site
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("tqedge", "runtime", "exporters", "pyproject.toml", "README.md")
# compile one small kernel: any kernel's cache write shows where the cache goes
COMPILE = ("import numpy as np; from tqedge.codec import kernels_numba as k; "
           "print(k.halves_to_float(np.array([15360], np.uint16))[0])")


def _is_tqedge(name: str) -> bool:
    n = name.lower()
    return n == "tqedge" or n.startswith(("tqedge-", "__editable__.tqedge", "__editable___tqedge")) or n.endswith(".pth")


def _deps_dir(tmp: Path) -> Path:
    """This interpreter's site-packages as symlinks, minus tqedge itself and .pth files."""
    deps = tmp / "deps"
    deps.mkdir()
    for sp in [*site.getsitepackages(), sysconfig.get_paths()["purelib"]]:
        if not os.path.isdir(sp):
            continue
        for entry in os.listdir(sp):
            if not _is_tqedge(entry) and not (deps / entry).exists():
                (deps / entry).symlink_to(Path(sp) / entry)
    return deps


def _snapshot(d: Path) -> dict[str, int]:
    return {str(p.relative_to(d)): p.stat().st_mtime_ns for p in d.rglob("*")} if d.is_dir() else {}


@pytest.mark.slow
@pytest.mark.skipif(sys.platform == "win32", reason="POSIX venv layout")
def test_install_run_then_editable_install_keeps_every_command_working(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name in SOURCES:
        p = ROOT / name
        if p.is_dir():
            shutil.copytree(p, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(p, src / name)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    py = venv / "bin" / "python"
    purelib = Path(subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                  check=True, capture_output=True, text=True).stdout.strip())
    (purelib / "_deps.pth").write_text(str(_deps_dir(tmp_path)) + "\n", encoding="utf-8")
    env = {**{k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "NUMBA_CACHE_DIR")},
           "TQEDGE_CACHE_DIR": str(tmp_path / "cache"), "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    elsewhere = tmp_path  # never the source copy: run as a user would, from another directory

    def run(*cmd: str) -> subprocess.CompletedProcess:
        r = subprocess.run(cmd, cwd=elsewhere, env=env, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, f"{' '.join(cmd)} → exit {r.returncode}\n{r.stdout[-1500:]}\n{r.stderr[-3000:]}"
        return r

    pip = (str(py), "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-index")
    run(*pip, str(src))
    installed = purelib / "tqedge"
    assert (installed / "__init__.py").is_file()
    before = _snapshot(installed)
    assert run(str(py), "-c", COMPILE).stdout.strip() == "1.0"
    assert _snapshot(installed) == before  # nothing written inside site-packages/tqedge at run time
    assert any((tmp_path / "cache" / "numba").rglob("*.nbi"))  # the kernel cache went here instead

    run(*pip, "-e", str(src))
    tqedge = str(venv / "bin" / "tqedge")
    version = run(str(py), "-c", "import tqedge, tqedge.runtime; print(tqedge.__version__, tqedge.__file__)").stdout.split()
    assert version[1] == str(src / "tqedge" / "__init__.py")  # the editable install is what imports
    assert run(tqedge, "--version").stdout.strip().endswith(version[0])
    assert "generate" in run(tqedge, "--help").stdout
    assert "numba cache" in run(tqedge, "doctor").stdout
    assert run(str(py), "-c", COMPILE).stdout.strip() == "1.0"

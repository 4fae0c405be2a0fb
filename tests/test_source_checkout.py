"""Running from the repository root without an editable install (README snippet, ``python -m
tqedge.cli`` in examples/android_rpi/arm64_smoke.sh): the source ``tqedge/`` shadows any
installed copy, and ``tqedge.runtime`` / ``tqedge.exporters`` (kept at the repository root)
must still import — from the checkout's own files.

Each check runs ``python -S`` (no site processing: no editable-install finder, no .pth files)
with only the dependencies' site-packages on PYTHONPATH and the repository root as the current
directory, i.e. as the first entry of ``sys.path``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    paths = sysconfig.get_paths()
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys([paths["purelib"], paths["platlib"]]))
    return subprocess.run([sys.executable, "-S", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)


def test_the_isolation_has_no_installed_tqedge(tmp_path):
    # the control: outside the checkout, nothing on this path provides tqedge (no editable finder)
    r = run(["-c", "import tqedge"], tmp_path)
    assert r.returncode == 1 and "No module named 'tqedge'" in r.stderr, r.stderr


def test_runtime_and_exporters_import_from_the_repository_root():
    code = ("import json, tqedge, tqedge.runtime, tqedge.runtime.model, tqedge.exporters, tqedge.runtime.server; "
            "print(json.dumps({m: __import__(m, fromlist=['x']).__file__ for m in "
            "['tqedge', 'tqedge.runtime', 'tqedge.runtime.model', 'tqedge.exporters', 'tqedge.runtime.server']}))")
    r = run(["-c", code], ROOT)
    assert r.returncode == 0, r.stderr
    files = {m: Path(f) for m, f in json.loads(r.stdout).items()}
    assert files == {"tqedge": ROOT / "tqedge" / "__init__.py", "tqedge.runtime": ROOT / "runtime" / "__init__.py",
                     "tqedge.runtime.model": ROOT / "runtime" / "model.py",
                     "tqedge.exporters": ROOT / "exporters" / "__init__.py",
                     "tqedge.runtime.server": ROOT / "runtime" / "server" / "__init__.py"}


def test_cli_module_runs_from_the_repository_root():
    r = run(["-m", "tqedge.cli", "--help"], ROOT)
    assert r.returncode == 0 and "Usage:" in r.stdout and "Traceback" not in r.stderr, r.stderr
    r = run(["-m", "tqedge.cli", "eval", "needle", "--help"], ROOT)  # a command that lives in tqedge.runtime
    assert r.returncode == 0 and "--haystack" in r.stdout, r.stderr

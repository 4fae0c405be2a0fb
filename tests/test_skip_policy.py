"""The skip policy of tests/conftest.py, run on throw-away test files in a subprocess: a skip
whose reason tests/skips_allowed.txt does not match fails the run (exit 1) and is listed with
its reason; allowed skips and xfails do not; an allow-list entry without a reason is refused."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


def run(tmp_path: Path, test_code: str, allowed: str | None = None) -> subprocess.CompletedProcess:
    shutil.copy(HERE / "conftest.py", tmp_path / "conftest.py")
    if allowed is None:
        shutil.copy(HERE / "skips_allowed.txt", tmp_path / "skips_allowed.txt")
    else:
        (tmp_path / "skips_allowed.txt").write_text(allowed)
    (tmp_path / "test_x.py").write_text(textwrap.dedent(test_code))
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--rootdir", str(tmp_path),
                           "-c", "/dev/null", str(tmp_path)], cwd=tmp_path, capture_output=True, text=True,
                          timeout=120, env={**os.environ, "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"})


def test_an_unlisted_skip_fails_the_run_and_is_named(tmp_path):
    r = run(tmp_path, """
        import pytest
        def test_ok(): pass
        def test_hidden(): pytest.skip("the exporter failed to import")
    """)
    assert r.returncode == 1, r.stdout
    assert "NOT ALLOWED test_x.py::test_hidden: the exporter failed to import" in r.stdout


def test_a_module_level_skip_fails_the_run(tmp_path):
    r = run(tmp_path, """
        import pytest
        pytest.importorskip("tqedge_no_such_module")
        def test_never(): pass
    """)
    assert r.returncode == 1 and "NOT ALLOWED" in r.stdout and "tqedge_no_such_module" in r.stdout, r.stdout


def test_allowed_skips_and_xfails_pass(tmp_path):
    r = run(tmp_path, """
        import pytest
        def test_ok(): pass
        def test_peer(): pytest.skip("benchmark peer not installed: llama_cpp")
        @pytest.mark.xfail(reason="known", strict=True)
        def test_xfail(): assert False
    """)
    assert r.returncode == 0, r.stdout
    assert "allowed     test_x.py::test_peer: benchmark peer not installed: llama_cpp" in r.stdout


def test_an_allow_list_entry_needs_a_reason(tmp_path):
    r = run(tmp_path, """
        import pytest
        def test_s(): pytest.skip("anything")
    """, allowed="# why\nfirst\n\nsecond without a reason\n")
    assert r.returncode == pytest.ExitCode.USAGE_ERROR and "has no '#' comment" in r.stderr


@pytest.mark.parametrize("reason, allowed", [
    ("could not import 'torch': No module named 'torch'", False),
    ("SmolLM2 GGUF not found", False),
    ("arm64 chroot needs root (run as root or in CI)", True),
    ("madvise on /proc/self/maps mappings", True),
])
def test_the_shipped_allow_list(reason, allowed):
    from conftest import allowed_skips

    assert any(p.search(reason) for p in allowed_skips()) == allowed


def test_ci_runs_the_readme_test_command_and_prints_skip_reasons():
    root = HERE.parent
    readme = (root / "README.md").read_text(encoding="utf-8")
    block = readme.split("Run the tests", 1)[1].split("```bash\n", 1)[1].split("\n```", 1)[0].strip()
    assert "python -m pytest" in block and block in (root / ".ci" / "run").read_text(encoding="utf-8").splitlines()
    import tomllib

    addopts = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]["addopts"]
    assert "-ra" in addopts.split() or "-rs" in addopts.split()

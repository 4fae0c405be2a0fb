"""tqedge doctor: the JSON report against independent sources, the cpuinfo/meminfo parsers on
real-world samples, the kernel-path rule in a fresh process, and the recommendation rule."""

from __future__ import annotations

import functools
import importlib.metadata
import json
import os
import platform
import subprocess
import sys

import pytest

from tqedge.runtime import doctor, footprint, plan

GiB, MiB = 1024**3, 1024**2

# /proc/cpuinfo of a Raspberry Pi 4 (Cortex-A72) and a Pi 5 (Cortex-A76), abridged to 1 core.
PI4 = """processor\t: 0
BogoMIPS\t: 108.00
Features\t: fp asimd evtstrm crc32 cpuid
CPU implementer\t: 0x41
CPU architecture: 8
CPU variant\t: 0x0
CPU part\t: 0xd08
CPU revision\t: 3

Hardware\t: BCM2835
Model\t\t: Raspberry Pi 4 Model B Rev 1.4
"""
PI5 = """processor\t: 0
BogoMIPS\t: 108.00
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp
CPU implementer\t: 0x41
CPU architecture: 8
CPU variant\t: 0x4
CPU part\t: 0xd0b
CPU revision\t: 1
"""
X86 = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Platinum 8375C CPU @ 2.90GHz
flags\t\t: fpu sse4_2 avx f16c fma avx2 avx512f avx512bw avx512_vnni
"""
MEMINFO = "MemTotal:        3884844 kB\nMemFree:          123456 kB\nMemAvailable:    2861712 kB\n"


@functools.lru_cache(maxsize=None)
def _doctor_json_cached(env_items: tuple) -> str:
    env = {k: v for k, v in os.environ.items() if k != "TQEDGE_KERNELS"}
    env.update(env_items)
    out = subprocess.run([sys.executable, "-m", "tqedge.cli", "doctor", "--json"], env=env,
                         capture_output=True, text=True, timeout=60, check=True)
    return out.stdout


def _doctor_json(env_extra: dict) -> dict:
    """`tqedge doctor --json` in a fresh process (one run per environment per session)."""
    return json.loads(_doctor_json_cached(tuple(sorted(env_extra.items()))))


@pytest.mark.parametrize("env, expected", [({}, "numba"), ({"TQEDGE_KERNELS": "numpy"}, "numpy")])
def test_doctor_json_kernel_path_follows_env(env, expected):
    r = _doctor_json(env)
    assert r["kernels"]["path"] == expected
    assert r["kernels"]["TQEDGE_KERNELS"] == env.get("TQEDGE_KERNELS")
    assert ("NumPy kernels" in " ".join(r["warnings"])) == (expected == "numpy")


def test_doctor_json_values_match_independent_sources():
    r = _doctor_json({})
    assert set(r) >= {"tqedge", "platform", "cpu", "memory", "packages", "onnxruntime_providers",
                      "kernels", "numba_cache", "recommendation", "warnings"}
    assert r["platform"]["machine"] == platform.machine()
    assert r["platform"]["python"] == platform.python_version()
    assert r["cpu"]["cores"] == os.cpu_count()
    assert 1 <= r["cpu"]["usable_cores"] <= r["cpu"]["cores"]
    phys = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    assert 0 < r["memory"]["available"] <= r["memory"]["total"] <= phys
    for module in ("numpy", "onnxruntime", "tokenizers"):
        assert r["packages"][module] == importlib.metadata.version(module)
    assert "CPUExecutionProvider" in r["onnxruntime_providers"]
    rec = r["recommendation"]
    assert rec["weights"] in footprint.WEIGHT_FORMATS
    assert 16 * MiB <= rec["kv_budget"] <= r["memory"]["available"]


def test_diagnose_does_not_import_numba():
    code = ("import sys; from tqedge.runtime.doctor import diagnose; diagnose(); "
            "print(sorted(m for m in ('numba', 'llvmlite') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("text, model, features", [
    (PI4, "Cortex-A72", ["neon"]),
    (PI5, "Cortex-A76", ["dotprod", "fp16", "neon"]),
    (X86, "Xeon", ["avx", "avx2", "avx512", "avx512bw", "avx512vnni", "f16c", "fma", "sse4.2"]),
])
def test_cpu_info_parses_real_cpuinfo(text, model, features, monkeypatch):
    monkeypatch.setattr(doctor, "_read", lambda path: "")  # no devicetree model on this host
    info = doctor.cpu_info(text)
    assert model in info["model"]
    assert info["features"] == features


def test_memory_info_parses_meminfo():
    m = doctor.memory_info(MEMINFO)
    assert (m["total"], m["available"]) == (3884844 * 1024, 2861712 * 1024)


@pytest.mark.parametrize("env, numba, path", [
    ("", True, "numba"), ("numpy", True, "numpy"), ("NumPy", True, "numpy"),
    ("", False, "numpy"), ("numba", False, "unavailable"), ("numba", True, "numba"), (" auto ", True, "numba"),
])
def test_kernel_path_rule(env, numba, path):
    assert doctor.kernel_path(env, numba_installed=numba)["path"] == path


@pytest.mark.parametrize("total, fmt", [(1 * GiB, "int4"), (2 * GiB, "int8"), (4 * GiB, "int8"),
                                        (8 * GiB, "int8"), (16 * GiB, "int8")])
def test_recommend_without_model_follows_the_documented_rule(total, fmt):
    avail = int(total * 0.8)
    rec = doctor.recommend({"total": total, "available": avail})
    assert rec["weights"] == fmt
    usable = avail - footprint.RUNTIME_OVERHEAD[fmt] - footprint.MARGIN
    assert 16 * MiB <= rec["kv_budget"] <= max(usable // 4, 16 * MiB)
    assert rec["kv_budget"] > usable // 8 or rec["kv_budget"] == doctor.NO_MODEL_MAX_BUDGET
    assert plan.budget_arg(rec["kv_budget"]) == rec["kv_budget_arg"]


@pytest.mark.parametrize("env", ["", "numpy"])
def test_reported_kernel_path_is_the_one_the_codec_takes(env):
    code = ("import json; from tqedge.runtime.doctor import kernel_path; "
            "reported = kernel_path()['path']; from tqedge.codec import kernels; "
            "print(json.dumps([reported, kernels.BACKEND]))")
    environ = {k: v for k, v in os.environ.items() if k != "TQEDGE_KERNELS"}
    if env:
        environ["TQEDGE_KERNELS"] = env
    out = subprocess.run([sys.executable, "-c", code], env=environ, capture_output=True, text=True,
                         timeout=120, check=True)
    reported, actual = json.loads(out.stdout)
    assert reported == actual

"""``tqedge doctor``: what this device is, what tqedge will use on it, and what to run with.

:func:`diagnose` collects, without compiling anything and in well under a second:

- platform, Python, machine (``x86_64`` / ``aarch64`` / ...), CPU model, the SIMD features
  that matter for the kernels and onnxruntime (AVX2/AVX-512/VNNI on x86; NEON/ASIMD, dotprod,
  i8mm, fp16, SVE on ARM), core count;
- total and available memory (``/proc/meminfo``, a cgroup limit when one is set, psutil or
  ``sysconf`` elsewhere);
- which runtimes are installed and their versions (found with ``importlib.util.find_spec`` and
  ``importlib.metadata``: nothing heavy is imported except onnxruntime, to list its providers);
- which kernel path tqedge's codec will take (Numba or NumPy, honouring ``TQEDGE_KERNELS``) and
  where Numba caches its compiled kernels;
- a recommended weight format and ``--kv-budget`` (see :func:`recommend`; with a bundle, from
  its real sizes via :mod:`tqedge.runtime.plan`).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import logging
import os
import platform
import sys
from pathlib import Path

import click

from tqedge import __version__
from tqedge.units import format_bytes

log = logging.getLogger(__name__)

MiB = 1024**2
GiB = 1024**3

# Python module → distribution name, for the runtimes tqedge can use.
PACKAGES = {
    "numpy": "numpy",
    "numba": "numba",
    "onnxruntime": "onnxruntime",
    "ai_edge_litert": "ai-edge-litert",
    "tflite_runtime": "tflite-runtime",
    "tokenizers": "tokenizers",
    "jinja2": "jinja2",
    "psutil": "psutil",
}

# CPU features worth knowing, as /proc/cpuinfo spells them → the name doctor reports.
X86_FEATURES = {"sse4_2": "sse4.2", "avx": "avx", "avx2": "avx2", "fma": "fma", "f16c": "f16c",
                "avx512f": "avx512", "avx512bw": "avx512bw", "avx512_vnni": "avx512vnni",
                "avx_vnni": "avxvnni", "avx512_bf16": "avx512bf16", "amx_int8": "amx-int8"}
ARM_FEATURES = {"neon": "neon", "asimd": "neon", "asimddp": "dotprod", "i8mm": "i8mm",
                "fphp": "fp16", "asimdhp": "fp16", "bf16": "bf16", "sve": "sve", "sve2": "sve2"}
# "CPU part" of Arm Ltd. (implementer 0x41) cores in common boards and phones.
ARM_PARTS = {"0xd03": "Cortex-A53", "0xd04": "Cortex-A35", "0xd05": "Cortex-A55",
             "0xd07": "Cortex-A57", "0xd08": "Cortex-A72", "0xd09": "Cortex-A73",
             "0xd0a": "Cortex-A75", "0xd0b": "Cortex-A76", "0xd0d": "Cortex-A77",
             "0xd41": "Cortex-A78", "0xd44": "Cortex-X1", "0xd46": "Cortex-A510",
             "0xd47": "Cortex-A710", "0xd48": "Cortex-X2", "0xd4d": "Cortex-A715",
             "0xd80": "Cortex-A520", "0xd81": "Cortex-A720", "0xd0c": "Neoverse-N1",
             "0xd40": "Neoverse-V1", "0xd49": "Neoverse-N2"}


# -- probes --------------------------------------------------------------------------------
def _read(path: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""


def cpu_info(cpuinfo: str | None = None) -> dict:
    """CPU model, relevant SIMD features and core counts.

    Args:
        cpuinfo: the text of ``/proc/cpuinfo`` (read from the system when None).

    Returns:
        ``{"model", "features": [...], "cores", "usable_cores"}``.
    """
    text = _read("/proc/cpuinfo") if cpuinfo is None else cpuinfo
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            fields.setdefault(key.strip().lower(), value.strip())
    flags = set((fields.get("flags") or fields.get("features") or "").split())
    table = X86_FEATURES if "flags" in fields else ARM_FEATURES
    features = sorted({name for flag, name in table.items() if flag in flags})
    if platform.machine() in ("aarch64", "arm64") and "neon" not in features and not flags:
        features = ["neon"]  # ASIMD is mandatory on AArch64; some kernels hide cpuinfo
    model = fields.get("model name") or fields.get("model") or fields.get("hardware")
    dt_model = _read("/sys/firmware/devicetree/base/model").strip("\x00\n ")
    part = ARM_PARTS.get(fields.get("cpu part", "")) if fields.get("cpu implementer") == "0x41" else None
    if dt_model:  # e.g. "Raspberry Pi 5 Model B Rev 1.0"
        model = dt_model + (f" ({part})" if part else "")
    elif part:
        model = f"{model} ({part})" if model else part
    cores = os.cpu_count() or 1
    try:
        usable = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        usable = cores
    return {"model": model or platform.processor() or "unknown", "features": features,
            "cores": cores, "usable_cores": usable}


def memory_info(meminfo: str | None = None) -> dict:
    """Total and available memory in bytes, lowered to a cgroup (container) limit if one is set.

    Returns:
        ``{"total", "available", "source"}``; values are None when nothing could be read.
    """
    text = _read("/proc/meminfo") if meminfo is None else meminfo
    kb = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[1].isdigit():
            kb[parts[0].rstrip(":")] = int(parts[1]) * 1024
    total, avail, source = kb.get("MemTotal"), kb.get("MemAvailable"), "/proc/meminfo"
    if total is None:
        total, avail, source = _memory_fallback()
    limit = _read("/sys/fs/cgroup/memory.max").strip() if meminfo is None else ""
    if limit.isdigit() and total and int(limit) < total:
        used = _read("/sys/fs/cgroup/memory.current").strip()
        total = int(limit)
        avail = min(avail or total, total - (int(used) if used.isdigit() else 0))
        source += " + cgroup memory.max"
    return {"total": total, "available": avail, "source": source}


def _memory_fallback() -> tuple[int | None, int | None, str]:
    if importlib.util.find_spec("psutil"):
        import psutil

        vm = psutil.virtual_memory()
        return vm.total, vm.available, "psutil"
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        return total, None, "sysconf"
    except (ValueError, OSError, AttributeError):
        return None, None, "unknown"


def package_versions() -> dict:
    """``{module: version or None}`` for the runtimes tqedge may use, without importing them."""
    out = {}
    for module, dist in PACKAGES.items():
        if importlib.util.find_spec(module) is None:
            out[module] = None
            continue
        try:
            out[module] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[module] = "installed (version unknown)"
    return out


def onnxruntime_providers() -> list[str] | None:
    """onnxruntime's execution providers (imports onnxruntime: ~0.2 s), None when absent."""
    if importlib.util.find_spec("onnxruntime") is None:
        return None
    try:
        import onnxruntime
    except ImportError as e:  # installed but broken, e.g. a wheel for another CPU
        log.warning("onnxruntime is installed but does not import: %s", e)
        return []
    return list(onnxruntime.get_available_providers())


def kernel_path(env: str | None = None, numba_installed: bool | None = None) -> dict:
    """The kernel implementation tqedge's codec will use, by the codec's rule
    (:mod:`tqedge.codec.kernels`): NumPy when ``TQEDGE_KERNELS=numpy`` or Numba is not
    installed, otherwise Numba; ``TQEDGE_KERNELS=numba`` without Numba is an import error.

    Returns:
        ``{"path": "numba"|"numpy"|"unavailable", "reason", "TQEDGE_KERNELS"}``.
    """
    env = os.environ.get("TQEDGE_KERNELS", "") if env is None else env
    if numba_installed is None:
        numba_installed = importlib.util.find_spec("numba") is not None
    choice = env.strip().lower()
    if choice == "numpy":
        path, reason = "numpy", "TQEDGE_KERNELS=numpy"
    elif not numba_installed and choice == "numba":  # the codec raises rather than fall back
        path, reason = "unavailable", "TQEDGE_KERNELS=numba but numba is not installed"
    elif not numba_installed:
        path, reason = "numpy", "numba is not installed"
    else:
        path, reason = "numba", "TQEDGE_KERNELS=numba" if choice == "numba" else "numba is installed"
    return {"path": path, "reason": reason, "TQEDGE_KERNELS": env or None}


def numba_cache() -> dict:
    """Where tqedge keeps its compiled kernels (:func:`tqedge.paths.numba_cache_dir`: the user's
    cache directory, or ``NUMBA_CACHE_DIR``; never site-packages) and how many it holds."""
    from tqedge.paths import numba_cache_dir

    where = numba_cache_dir()
    how = "NUMBA_CACHE_DIR" if os.environ.get("NUMBA_CACHE_DIR") else "user cache"
    probe = next((p for p in (where, *where.parents) if p.exists()), where)
    entries = len(list(where.rglob("*.nbi"))) if where.is_dir() else 0
    return {"dir": str(where), "how": how, "writable": os.access(probe, os.W_OK),
            "compiled_entries": entries}


# -- recommendation --------------------------------------------------------------------------
# Without a bundle, the weight format follows the device's total memory: int4 below 1.5 GiB,
# int8 below 4 GiB, fp32 above (fp16 is resident as fp32, so it never saves memory at run
# time). With a bundle, runtime.plan.recommend uses the model's real sizes (SmolLM2-135M gets
# fp32 on a 2 GiB board: fp32 is also the fastest format on onnxruntime 1.32).
NO_MODEL_MAX_BUDGET = 1 * GiB  # a small model's whole context; a bundle gives the real need
FORMAT_BY_TOTAL = ((1.5 * GiB, "int4"), (float("inf"), "int8"))  # see plan.choose_format


def recommend(mem: dict, bundle: str | None = None) -> dict:
    """Recommend a weight format and a ``--kv-budget`` for this device.

    The rule: usable memory = *available* memory − headroom for the Python process and the OS
    (``footprint.RUNTIME_OVERHEAD``, measured, + ``footprint.MARGIN``: 149–207 MiB by format). Without a bundle the
    format comes from total memory (:data:`FORMAT_BY_TOTAL`) and the KV budget is a quarter of
    the usable memory (at most 1 GiB), rounded down to a power of two (16 MiB minimum). With ``bundle``,
    :func:`tqedge.runtime.plan.recommend` subtracts the bundle's weights and sizes the budget
    to what is left, capped at what the model's maximum context needs.

    Args:
        mem: :func:`memory_info` output.
        bundle: optional bundle directory.

    Returns:
        ``{"weights", "kv_budget" (bytes), "kv_budget_arg" ("256MiB"), "why", ...}``.
    """
    from tqedge.runtime import footprint, plan

    avail = mem.get("available") or mem.get("total")
    if not avail:
        return {"weights": "int8", "kv_budget": 64 * MiB, "kv_budget_arg": "64MiB",
                "why": "memory size unknown: the defaults"}
    if bundle:
        m = plan.load_manifest(bundle)
        best = plan.recommend(m, avail, os_reserve=0, total=mem.get("total"))["weights"]
        rec = plan.recommend(m, avail, os_reserve=0, total=mem.get("total"), weights=m.weights.format)
        rec.update(bundle_weights=m.weights.format, best_weights=best,
                   why=f"for this bundle's {m.weights.format} weights in {format_bytes(avail)} available "
                       f"(best format for this device: {best or 'none fits'})")
        return rec
    weights = next(fmt for limit, fmt in FORMAT_BY_TOTAL if (mem.get("total") or avail) < limit)
    headroom = footprint.RUNTIME_OVERHEAD[weights] + footprint.MARGIN
    usable = avail - headroom
    budget = plan.round_budget(min(usable // 4, NO_MODEL_MAX_BUDGET))
    return {"weights": weights, "kv_budget": budget, "kv_budget_arg": plan.budget_arg(budget),
            "why": f"a quarter of {format_bytes(max(usable, 0))} usable "
                   f"({format_bytes(avail)} available − {format_bytes(headroom)} headroom); "
                   "pass --model BUNDLE for a model-specific budget"}


# -- the report ---------------------------------------------------------------------------
def diagnose(bundle: str | None = None) -> dict:
    """Collect everything ``tqedge doctor`` reports.

    Args:
        bundle: optional bundle directory, for a model-specific recommendation.

    Returns:
        A JSON-serialisable dict with keys ``tqedge``, ``platform``, ``cpu``, ``memory``,
        ``packages``, ``onnxruntime_providers``, ``kernels``, ``numba_cache``,
        ``recommendation`` and ``warnings``.
    """
    mem = memory_info()
    packages = package_versions()
    report = {
        "tqedge": __version__,
        "platform": {"system": platform.system(), "release": platform.release(),
                     "machine": platform.machine(), "python": platform.python_version(),
                     "implementation": platform.python_implementation(),
                     "termux": "com.termux" in sys.prefix},
        "cpu": cpu_info(),
        "memory": mem,
        "packages": packages,
        "onnxruntime_providers": onnxruntime_providers(),
        "kernels": kernel_path(numba_installed=packages["numba"] is not None),
        "numba_cache": numba_cache(),
        "recommendation": recommend(mem, bundle),
    }
    report["warnings"] = _warnings(report)
    return report


def _warnings(r: dict) -> list[str]:
    out = []
    machine, pk = r["platform"]["machine"], r["packages"]
    if machine in ("armv7l", "armv6l", "i686"):
        out.append(f"{machine} is a 32-bit system: numba and onnxruntime publish no wheels for it; "
                   "install a 64-bit OS (Raspberry Pi OS 64-bit)")
    if pk["onnxruntime"] is None and pk["ai_edge_litert"] is None and pk["tflite_runtime"] is None:
        out.append("no backend installed: pip install onnxruntime (or ai-edge-litert)")
    if r["kernels"]["path"] == "unavailable":
        out.append(f"{r['kernels']['reason']}: the compressed cache will not load; unset TQEDGE_KERNELS")
    if r["kernels"]["path"] == "numpy":
        out.append(f"NumPy kernels ({r['kernels']['reason']}): the compressed cache is slower than with numba")
    nc = r["numba_cache"]
    if r["kernels"]["path"] == "numba" and not nc["writable"]:
        out.append(f"kernel cache dir {nc['dir']} is not writable: kernels are cached in a temporary "
                   "directory (set TQEDGE_CACHE_DIR or NUMBA_CACHE_DIR to a writable one)")
    rec = r["recommendation"]
    if rec.get("bundle_weights") and not rec["weights"]:
        out.append(f"this bundle's {rec['bundle_weights']} weights do not fit in the available memory"
                   + (f"; re-export with --weights {rec['best_weights']}" if rec["best_weights"] else ""))
    avail = r["memory"].get("available")
    if avail is not None and avail < 512 * MiB:
        out.append(f"only {format_bytes(avail)} available: close other programs or use int4 weights")
    return out


def format_report(r: dict) -> str:
    """Human-readable text of a :func:`diagnose` report."""
    p, c, m, k, nc, rec = (r["platform"], r["cpu"], r["memory"], r["kernels"], r["numba_cache"],
                           r["recommendation"])
    fmt = lambda n: format_bytes(n) if n is not None else "unknown"  # noqa: E731
    lines = [
        f"tqedge {r['tqedge']}",
        f"platform     {p['system']} {p['release']} ({p['machine']}){'  [Termux]' if p['termux'] else ''}",
        f"python       {p['implementation']} {p['python']}",
        f"cpu          {c['model']}",
        f"  features   {' '.join(c['features']) or '-'}",
        f"  cores      {c['cores']} ({c['usable_cores']} usable)",
        f"memory       {fmt(m['total'])} total, {fmt(m['available'])} available ({m['source']})",
        "packages",
    ]
    for name, ver in r["packages"].items():
        lines.append(f"  {name:15s}{ver or '-'}")
    if r["onnxruntime_providers"] is not None:
        lines.append(f"  providers    {', '.join(r['onnxruntime_providers']) or '(onnxruntime does not import)'}")
    lines += [
        f"kernels      {k['path']} ({k['reason']})",
        f"numba cache  {nc['dir']} [{nc['how']}; {nc['compiled_entries']} compiled entries"
        f"{'' if nc['writable'] else '; NOT writable'}]",
        (f"recommended  {rec['weights']} weights, --kv-budget {rec['kv_budget_arg']}"
         + (f" → {rec['tokens']} tokens at {rec['kv_config']}" if rec.get("tokens") else "")
         + (" (the model's max)" if rec.get("capped") else "")) if rec["weights"]
        else f"recommended  nothing: {rec.get('line', '')}",
        f"  why        {rec['why']}",
    ]
    if "warmup_seconds" in r:
        sec = r["warmup_seconds"]
        lines.append(f"warmup       {'nothing to compile (NumPy kernels)' if sec is None else f'kernels compiled in {sec:.1f}s'}")
    lines += [f"warning      {w}" for w in r["warnings"]]
    return "\n".join(lines)


@click.command("doctor")
@click.option("--model", "bundle", type=click.Path(exists=True, file_okay=False),
              help="A bundle, for a recommendation from its real sizes.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--warmup", is_flag=True,
              help="Compile the attention kernels for this device now, for --model's shape if given "
                   "(else the first load does).")
def doctor_cmd(bundle: str | None, as_json: bool, warmup: bool) -> None:
    """Check this device and recommend a weight format and --kv-budget."""
    report = diagnose(bundle)
    if warmup:
        from tqedge.bundle import read_manifest
        from tqedge.runtime.warmup import ensure_warm

        seconds = ensure_warm(read_manifest(bundle, verify="none") if bundle else None, force=True, full=True)
        report["warmup_seconds"] = seconds
        report["numba_cache"] = numba_cache()
    click.echo(json.dumps(report, indent=2) if as_json else format_report(report))

"""``tqedge plan``: what fits on a device — the weight format to run, the ``--kv-budget`` to give
it, and how many tokens of context each KV-cache configuration gives in the memory that is left.

The memory model (weights, measured overheads, working set, KV bytes) lives in
:mod:`tqedge.runtime.footprint`; this module chooses within it (:func:`choose_format`,
:func:`recommend`, also used by ``tqedge doctor``) and reports it (:func:`plan`,
:func:`format_plan`, the ``tqedge plan`` command).
"""

from __future__ import annotations

import json
import math

import click

from tqedge.bundle import Manifest, read_manifest
from tqedge.errors import TqedgeError
from tqedge.runtime import memory as process_memory
from tqedge.runtime.footprint import (
    KV_CONFIGS,
    MARGIN,
    PREFILL_CHUNK,
    RUNTIME_OVERHEAD,
    WEIGHT_FORMATS,
    activation_bytes,
    bundle_weight_files,
    default_config,
    fixed_bytes,
    kv_budget_for,
    kv_bytes,
    kv_tokens,
    parameter_count,
    tokens_in,
    weight_bytes,
    working_bytes,
)
from tqedge.units import format_bytes, parse_bytes

MiB = 1024**2
GiB = 1024**3

OS_RESERVE = 256 * MiB  # headless Raspberry Pi OS Lite after boot is ~150-250 MiB
DEVICES = (1 * GiB, 2 * GiB, 4 * GiB, 8 * GiB)
TARGET_CONTEXT = 8192  # tokens of context the format choice protects (see choose_format)


def round_budget(n: int) -> int:
    """A budget people can type: down to a power of two MiB below 256 MiB, to 64 MiB above;
    at least 16 MiB."""
    if n >= 256 * MiB:
        return n // (64 * MiB) * 64 * MiB
    if n < 16 * MiB:
        return 16 * MiB
    return 2 ** int(math.log2(n // MiB)) * MiB


def budget_arg(n: int) -> str:
    """``--kv-budget`` spelling of a byte count (``"256MiB"``, ``"1GiB"``, else plain bytes)."""
    if n and n % GiB == 0:
        return f"{n // GiB}GiB"
    return f"{n // MiB}MiB" if n % MiB == 0 else str(n)


# -- planning --------------------------------------------------------------------------------
def load_manifest(manifest_or_bundle) -> Manifest:
    """A :class:`Manifest` as given, or read (sizes verified) from a bundle directory."""
    if isinstance(manifest_or_bundle, Manifest):
        return manifest_or_bundle
    return read_manifest(manifest_or_bundle, verify="size")


FORMAT_ORDER = ("int8", "int4")  # recommended weight formats, best first (see choose_format)


def choose_format(m: Manifest, room: int, total: int | None = None) -> str | None:
    """Pick the weight format for ``room`` bytes (what is left after OS and runtime).

    The rule: the first format of :data:`FORMAT_ORDER` (int8, then int4) whose resident weights
    plus a KV cache for :data:`TARGET_CONTEXT` tokens (or the model's whole context, if
    shorter) at the bundle's default KV bits fit in ``room``. If none leaves room for that
    context, the smallest format whose weights and a minimal cache fit; None if not even that.
    fp32 is never recommended: on onnxruntime 1.32 (MatMulNBits at ``accuracy_level=4``) int8
    decodes SmolLM2 about 2x faster than fp32 (87 vs 166 ms per step, x86, busy machine) at
    half the memory, with 97.3 % top-1 agreement; int4 is faster still (69 ms) at 95.1 %.
    fp16 is never picked either: onnxruntime casts it to fp32 at load, so it only saves disk.
    ``total`` is accepted for callers that know the device's total memory; the rule does not
    need it.
    """
    a, kv = m.architecture, m.kv
    config = default_config(kv)
    target = kv_budget_for(min(a.max_position_embeddings, TARGET_CONTEXT), a, kv, config)
    smallest = kv_budget_for(0, a, kv, config)
    order = FORMAT_ORDER
    for fmt in order:
        if fixed_bytes(a, fmt) + target <= room:
            return fmt
    return order[-1] if fixed_bytes(a, order[-1]) + smallest <= room else None


def recommend(manifest_or_bundle, memory, os_reserve=OS_RESERVE, total: int | None = None,
              weights: str | None = None) -> dict:
    """Recommend weights and a ``--kv-budget`` for ``memory`` bytes of device memory.

    Args:
        manifest_or_bundle: a Manifest or a bundle directory.
        memory: device memory (bytes or "2GiB"); with ``os_reserve=0``, memory tqedge may use.
        os_reserve: what the OS keeps (bytes or a size string).
        total: the device's total memory when ``memory`` is only what is available (for the
            device-class rule of :func:`choose_format`); defaults to ``memory``.
        weights: size the KV budget for this weight format instead of choosing one (e.g. the
            bundle's own format, the one that will actually run).

    Returns:
        ``{"weights", "kv_budget", "kv_budget_arg", "kv_config", "tokens", "capped", "line"}``;
        ``weights`` is None when nothing fits.
    """
    m = load_manifest(manifest_or_bundle)
    a, kv = m.architecture, m.kv
    memory, os_reserve = parse_bytes(memory), parse_bytes(os_reserve)
    total = memory if total is None else total
    room = memory - os_reserve - working_bytes(a)
    config = default_config(kv)
    fmt = choose_format(m, room, total) if weights is None else weights
    head = f"{format_bytes(total if os_reserve else memory)}"
    if fmt is None or fixed_bytes(a, fmt) + kv_budget_for(0, a, kv, config) > room:
        fmt = fmt or "int4"
        return {"weights": None, "kv_budget": 0, "kv_budget_arg": None, "kv_config": config, "tokens": 0,
                "capped": False, "line": f"{head}: does not fit ({fmt} weights need "
                                         f"{format_bytes(fixed_bytes(a, fmt))} with the runtime, of {format_bytes(max(room, 0))} usable)"}
    left = room - fixed_bytes(a, fmt)
    # what the model's whole context needs, if that fits; else three quarters of what is left
    # (MARGIN already covers transients), rounded to a size people type
    need = -(-kv_budget_for(a.max_position_embeddings, a, kv, config) // MiB) * MiB
    budget = need if need <= left else min(round_budget(int(0.75 * left)), left // MiB * MiB)
    budget = max(budget, kv_budget_for(0, a, kv, config))  # at least the smallest cache
    tokens = kv_tokens(budget, a, kv, config)
    capped = tokens >= a.max_position_embeddings
    tokens = min(tokens, a.max_position_embeddings)
    line = (f"{head}: {fmt} weights, --kv-budget {budget_arg(budget)} → {_k(tokens)} tokens at {config}"
            + (f" (the model's max {a.max_position_embeddings})" if capped else ""))
    return {"weights": fmt, "kv_budget": budget, "kv_budget_arg": budget_arg(budget), "kv_config": config,
            "tokens": tokens, "capped": capped, "line": line}


def _k(n: int) -> str:
    return f"{n / 1000:.0f}K" if n >= 10_000 else str(n)


def plan_device(m: Manifest, memory: int, os_reserve: int, accounting: dict | None = None) -> dict:
    """Tokens of context for every weight format × KV configuration on one device.

    ``accounting``: :func:`kv_bytes` per configuration name, if already computed."""
    a, kv = m.architecture, m.kv
    accounting = accounting or {name: kv_bytes(a, kv, name) for name in KV_CONFIGS}
    room = memory - os_reserve - working_bytes(a)
    rows = {}
    for fmt in WEIGHT_FORMATS:
        left = room - fixed_bytes(a, fmt)
        configs = {}
        for name in KV_CONFIGS:
            t = tokens_in(left, accounting[name])
            configs[name] = {"tokens": min(t, a.max_position_embeddings), "capped": t > a.max_position_embeddings}
        rows[fmt] = {"kv_room": max(left, 0), "configs": configs}
    return {"memory": memory, "os_reserve": os_reserve, "room": max(room, 0), "formats": rows,
            "recommendation": recommend(m, memory, os_reserve)}


def plan(manifest_or_bundle, memory=None, os_reserve=OS_RESERVE) -> dict:
    """Everything ``tqedge plan`` prints, as a dict.

    Args:
        manifest_or_bundle: a Manifest or a bundle directory.
        memory: device memory (bytes or "512MiB"); None plans 1, 2, 4 and 8 GiB devices.
        os_reserve: memory the OS keeps; 0 when ``memory`` is what tqedge may use.

    Returns:
        ``{"model", "weights", "overhead", "kv", "devices": [...]}`` (bytes throughout).

    Raises:
        TqedgeError: bad memory size, or a bundle that cannot be read.
    """
    m = load_manifest(manifest_or_bundle)
    a = m.architecture
    memories = DEVICES if memory is None else (parse_bytes(memory),)
    os_reserve = parse_bytes(os_reserve)
    if memories[0] <= 0:
        raise TqedgeError(f"--memory must be more than 0 bytes, not {memory!r}")
    accounting = {name: kv_bytes(a, m.kv, name) for name in KV_CONFIGS}
    bundle_bytes = None
    if not isinstance(manifest_or_bundle, Manifest):
        bundle_bytes = bundle_weight_files(manifest_or_bundle, m)
    return {
        "model": {"name": m.name, "parameters": parameter_count(a),
                  "max_position_embeddings": a.max_position_embeddings,
                  "format": m.weights.format, "bundle_weight_files": bundle_bytes,
                  "dropped_layers": m.pruning.dropped if m.pruning else [], "num_layers": a.num_layers,
                  "pruning_ppl": [m.pruning.calibration_ppl, m.pruning.calibration_ppl_pruned] if m.pruning else None},
        "weights": {f: {"disk": weight_bytes(a, f, resident=False), "resident": weight_bytes(a, f)}
                    for f in WEIGHT_FORMATS},
        "overhead": {"runtime": {f: RUNTIME_OVERHEAD[f] for f in WEIGHT_FORMATS}, "margin": MARGIN,
                     "working_set": process_memory.working_set_bytes(a, PREFILL_CHUNK), "activations": activation_bytes(a),
                     "prefill_chunk": PREFILL_CHUNK, "os_reserve": os_reserve},
        "kv": accounting,
        "devices": [plan_device(m, mem, os_reserve, accounting) for mem in memories],
    }


def format_plan(p: dict) -> str:
    """Human-readable text of a :func:`plan` result."""
    md, o = p["model"], p["overhead"]
    fmt = format_bytes
    lines = [f"{md['name']}: {md['parameters'] / 1e6:.1f}M parameters, max context {md['max_position_embeddings']}"
             + (f", {md['num_layers']} layers (blocks {','.join(map(str, md['dropped_layers']))} dropped at export"
                + (f": calibration PPL {md['pruning_ppl'][0]:.2f} -> {md['pruning_ppl'][1]:.2f})" if md["pruning_ppl"][0] else ")")
                if md["dropped_layers"] else "")]
    if md["bundle_weight_files"] is not None:
        lines.append(f"bundle: {md['format']} weights, {fmt(md['bundle_weight_files'])} of weight files "
                     f"(estimate for {md['format']}: {fmt(p['weights'][md['format']]['disk'])})")
    lines.append("weights      on disk     resident")
    for f, w in p["weights"].items():
        lines.append(f"  {f:8s} {fmt(w['disk']):>11s}  {fmt(w['resident']):>11s}")
    lines.append("runtime beyond the weights (measured): " + ", ".join(f"{f} {fmt(v)}" for f, v in o["runtime"].items())
                 + f"; working set {fmt(o['working_set'])} ({o['prefill_chunk']}-token prefill) + margin "
                 f"{fmt(o['margin'])}; OS reserve {fmt(o['os_reserve'])}")
    lines.append("KV per token: " + ", ".join(
        f"{name} {k['per_token'] / 1024:.1f} KiB" for name, k in p["kv"].items())
        + f"; compressed configs also keep {format_bytes(p['kv']['K4V3']['fixed'])} of fp16 sinks + window")
    names = list(p["kv"])
    for d in p["devices"]:
        lines.append("")
        lines.append(f"{fmt(d['memory'])} device: tokens of context (* = capped at the model's max)")
        lines.append(f"  {'weights':8s} {'KV room':>10s} " + " ".join(f"{n:>10s}" for n in names))
        for f, row in d["formats"].items():
            cells = [f"{c['tokens']}{'*' if c['capped'] else ''}" for c in row["configs"].values()]
            lines.append(f"  {f:8s} {fmt(row['kv_room']):>10s} " + " ".join(f"{c:>10s}" for c in cells))
        lines.append(f"  recommended  {d['recommendation']['line']}")
    return "\n".join(lines)


@click.command("plan")
@click.option("--model", "bundle", required=True, type=click.Path(exists=True, file_okay=False),
              help="The bundle to plan for.")
@click.option("--memory", default=None, help="Device memory, e.g. 512MiB or 2GB (default: a table for 1, 2, 4, 8 GiB).")
@click.option("--os-reserve", default=f"{OS_RESERVE // MiB}MiB", show_default=True,
              help="Memory the OS keeps; 0 when --memory is what tqedge may use.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def plan_cmd(bundle: str, memory: str | None, os_reserve: str, as_json: bool) -> None:
    """What fits: weights per format and tokens of context per KV configuration."""
    result = plan(bundle, memory, os_reserve)
    click.echo(json.dumps(result, indent=2) if as_json else format_plan(result))

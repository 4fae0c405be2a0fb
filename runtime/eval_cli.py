"""``tqedge eval ppl`` and ``tqedge eval needle`` (registered lazily in tqedge/cli.py).

    tqedge eval ppl smollm2.tqe --text wikitext2-valid.txt --ctx 2048 --windows 16 --kv-bits 4,3
    tqedge eval needle smollm2.tqe --ctx 1K,2K,4K,8K --depths 0,0.25,0.5,0.75,1 --haystack wiki.txt
    tqedge eval needle gemma.tqe --raw --ctx 1K,2K --kv-bits exact   # a base model: no chat template

Without ``--text`` / ``--haystack`` both read the WikiText-2 excerpt shipped in ``tqedge.data``.

Both build the cache from the same KV options (``--kv-bits``, ``--window``, ``--sinks``,
``--qjl/--no-qjl``, ``--norm``, ``--rotation``, ``--kv-budget``); ``--json`` prints one JSON
object instead of the table. Progress goes to stderr.
"""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path

import click

from tqedge.errors import TqedgeError
from tqedge.runtime.cli import VERIFY_OPTION
from tqedge.runtime.model import MAX_THREADS

KV_EVAL_OPTIONS = [
    click.option("--kv-bits", default=None,
                 help="Key,value bits (e.g. 4,3 or 3.5,2.5), 'exact' (fp32) or 'fp16'; default: the bundle's."),
    click.option("--window", type=int, default=None, help="Recent tokens kept in fp16 (default: the bundle's)."),
    click.option("--sinks", type=int, default=None, help="First tokens kept in fp16 (default: the bundle's)."),
    click.option("--qjl/--no-qjl", default=None, help="TurboQuant_prod keys (b-1 MSE bits + 1-bit QJL)."),
    click.option("--norm", type=click.Choice(["corrected", "plain"]), default=None, help="Codec scale rule."),
    click.option("--rotation", type=click.Choice(["hadamard", "dense"]), default=None, help="Codec rotation."),
    click.option("--kv-budget", default=None,
                 help="Cache byte budget (e.g. 8MiB; older tokens slide out). Default: fits the context."),
]
COMMON = [
    click.argument("bundle", type=click.Path(exists=True, file_okay=False, path_type=Path)),
    click.option("--threads", type=click.IntRange(1, MAX_THREADS), default=None, help="Backend intra-op threads."),
    VERIFY_OPTION,
    click.option("--json", "as_json", is_flag=True, help="Print one JSON object."),
    click.option("--memory", default=None, help="Peak RSS of the process, e.g. 1GiB: the evaluated cache gets what "
                 "the measured fixed cost leaves (unless --kv-budget); the exact reference cache is extra."),
]


def _apply(options):
    return lambda f: functools.reduce(lambda g, opt: opt(g), reversed(options), f)


def _config(kw: dict):
    from tqedge.runtime.eval_ppl import KVConfig

    opts = {k: kw.pop(k) for k in ("kv_bits", "window", "sinks", "qjl", "norm", "rotation", "kv_budget")}
    return KVConfig(name=opts["kv_bits"] or "default", **opts)


def _load(bundle: Path, threads, verify, memory=None, cfg=None):
    """The model; under ``memory`` the evaluated cache's budget defaults to what memory leaves."""
    import dataclasses

    import tqedge

    model = tqedge.load(bundle, threads=threads, verify=verify, memory=memory, batched=True)  # long prefills
    if memory and cfg is not None and cfg.kv_budget is None:
        cfg = dataclasses.replace(cfg, kv_budget=model.cache_defaults["kv_budget"])
    return model, cfg


def read_text_file(path: Path, option: str) -> str:
    """A UTF-8 text file given as ``option``; TqedgeError (one line) if it is not text."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise TqedgeError(f"{option} {path}: not UTF-8 text (byte {e.start})") from None
    except OSError as e:
        raise TqedgeError(f"{option} {path}: cannot read ({e.strerror or e})") from None


def parse_tokens(value: str) -> list[int]:
    """``"1K,2K,4096"`` → [1024, 2048, 4096]."""
    out = []
    for part in value.split(","):
        p = part.strip().upper()
        try:
            n = int(float(p[:-1]) * 1024) if p.endswith("K") else int(p)
        except ValueError:
            raise TqedgeError(f"context lengths look like 1K,2K,4096, not {value!r}") from None
        if n < 2:
            raise TqedgeError(f"context length must be ≥ 2 tokens, got {part!r}")
        out.append(n)
    return out


def parse_depths(value: str) -> list[float]:
    """``"0,0.5,1"`` → [0.0, 0.5, 1.0], each in [0, 1]."""
    try:
        out = [float(p) for p in value.split(",")]
    except ValueError:
        raise TqedgeError(f"depths look like 0,0.25,0.5, not {value!r}") from None
    if not out or any(not 0 <= d <= 1 for d in out):
        raise TqedgeError(f"depths must lie in [0, 1], got {value!r}")
    return out


@click.group("eval")
def eval_group() -> None:
    """Quality evaluation of a bundle and its KV cache."""


@eval_group.command("ppl")
@_apply(COMMON)
@click.option("--text", "text_file", default=None, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Evaluation text (UTF-8) [default: the WikiText-2 excerpt shipped with tqedge].")
@click.option("--ctx", type=int, default=2048, show_default=True, help="Tokens per window.")
@click.option("--windows", type=int, default=None, help="Non-overlapping windows to score (default: all).")
@click.option("--chunk", type=int, default=512, show_default=True, help="Tokens per forward call.")
@_apply(KV_EVAL_OPTIONS)
def ppl_cmd(bundle, threads, verify, as_json, memory, text_file, ctx, windows, chunk, **kw):
    """Perplexity with the chosen KV cache, its delta, KL and top-1 agreement vs the exact cache."""
    from tqedge.runtime.eval_ppl import evaluate, text_windows, work_tokens

    text_file = text_file or default_text()
    model, cfg = _load(bundle, threads, verify, memory, _config(kw))
    wins = text_windows(model, read_text_file(text_file, "--text"), ctx, windows)
    with click.progressbar(length=work_tokens(wins, 1), label="tokens", file=sys.stderr) as bar:
        (r,) = evaluate(model, wins, [cfg], chunk=chunk, progress=bar.update)
    r.update(ctx=ctx, text=str(text_file))
    if as_json:
        click.echo(json.dumps(r))
        return
    click.echo(f"text        {text_file} ({r['windows']} windows × {ctx} tokens, {r['tokens']} scored)")
    click.echo(f"kv          {r['kv_bits']} ({r['bytes_per_token']} bytes/token beyond the fp16 window)")
    click.echo(f"ppl         {r['ppl']:.4f}   exact {r['ppl_exact']:.4f}   delta {r['delta_pct']:+.2f}%")
    click.echo(f"last 1/4    {r['ppl_last_quarter']:.4f}   exact {r['ppl_last_quarter_exact']:.4f}   "
               f"delta {r['delta_last_quarter_pct']:+.2f}%")
    click.echo(f"KL          {r['kl']:.5f} nats/token   top-1 agreement {100 * r['top1_agree']:.2f}%")


@eval_group.command("needle")
@_apply(COMMON)
@click.option("--ctx", "contexts", default="1K,2K,4K,8K", show_default=True, help="Prompt lengths in tokens.")
@click.option("--depths", default="0,0.25,0.5,0.75,1", show_default=True, help="Needle depths in [0, 1].")
@click.option("--haystack", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Filler text (UTF-8) [default: the WikiText-2 excerpt shipped with tqedge].")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the needle values.")
@click.option("--chat/--raw", "chat", default=None,
              help="Ask through the chat template (default when the bundle has one) or as a raw completion prompt.")
@_apply(KV_EVAL_OPTIONS)
def needle_cmd(bundle, threads, verify, as_json, memory, contexts, depths, haystack, seed, chat, **kw):
    """Needle in a haystack: depth × context grid of exact-match retrieval (greedy)."""
    from tqedge.runtime.eval_needle import format_grid, run_needle

    ctxs, ds = parse_tokens(contexts), parse_depths(depths)
    haystack = haystack or default_text()
    text = read_text_file(haystack, "--haystack")
    model, cfg = _load(bundle, threads, verify, memory, _config(kw))
    with click.progressbar(length=len(ctxs) * len(ds), label="probes", file=sys.stderr) as bar:
        r = run_needle(model, text, ctxs, ds, cfg, seed=seed, progress=bar.update, chat=chat)
    if as_json:
        r["grid"] = {str(c): {str(d): v for d, v in row.items()} for c, row in r["grid"].items()}
        click.echo(json.dumps(r))
    else:
        click.echo(format_grid(r))


def default_text() -> Path:
    """The text ``eval ppl`` / ``eval needle`` use without ``--text`` / ``--haystack``."""
    from tqedge.data import text_path

    return text_path()

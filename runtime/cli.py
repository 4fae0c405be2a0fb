"""``tqedge generate`` and ``tqedge chat`` (registered lazily in tqedge/cli.py).

Both load a bundle with the same options (backend, threads, KV budget/bits/policy, sampling).
``generate`` streams one completion; for a bundle with a chat template the prompt is wrapped
as a user message by default (``--raw`` for plain completion), and decoding is greedy unless
``--temperature`` is given, so ``tqedge generate smollm2.tqe -p "What is the capital of
France?"`` answers the same way every time. (A 135M model sampled at the usual 0.7 starts "The
capital…" only about a quarter of the time; greedy, the README's int8 bundle is a near tie between
"The" and "L" — within 0.1 logits — that float rounding decides: docs/RESULTS.md round 36.) ``chat`` is an interactive REPL, or, when stdin is not a terminal, reads one
user message per line and prints one reply per line, so it can be scripted.
"""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path

import click

from tqedge.bundle import VERIFY_MODES
from tqedge.errors import TqedgeError
from tqedge.runtime.model import MAX_THREADS

_warned_utf8 = False


def input_text(data: str | bytes) -> str:
    """Text typed or piped by the user, as valid Unicode: bytes that are not UTF-8 (read from
    stdin, or carried as lone surrogates in ``sys.argv`` by Python's surrogateescape) become
    U+FFFD, and the first time per process one warning line goes to stderr."""
    if isinstance(data, str):
        try:
            data.encode("utf-8")
            return data
        except UnicodeEncodeError:  # the bytes Python escaped, or lone surrogates
            try:
                data = data.encode("utf-8", "surrogateescape")
            except UnicodeEncodeError:
                data = data.encode("utf-8", "surrogatepass")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        pass
    _warn_utf8()
    return data.decode("utf-8", "replace")


def _warn_utf8() -> None:
    global _warned_utf8
    if not _warned_utf8:
        _warned_utf8 = True
        click.echo("warning: input is not valid UTF-8; undecodable bytes were replaced with U+FFFD", err=True)


VERIFY_OPTION = click.option(
    "--verify", type=click.Choice(VERIFY_MODES), default="auto", show_default=True,
    help="Bundle check at load: auto = SHA-256 of every file the first time on this device and after a "
         "file's size or mtime changes, else sizes; full = SHA-256 every time; size; none.")
MEMORY_HELP = "Peak RSS of the whole process, e.g. 512MiB: the KV cache gets what the measured fixed cost leaves."
KV_OPTIONS = [
    click.option("--kv-budget", default=None, help="KV-cache byte budget, e.g. 16MiB (default: 64MiB, or what --memory leaves)."),
    click.option("--kv-bits", default=None, help="Key,value bits (e.g. 4,3), a preset (quality|balanced|tiny) or 'exact' (default: the bundle's)."),
    click.option("--window", type=int, default=None, help="Recent tokens kept in fp16 (default: the bundle's)."),
    click.option("--sinks", type=int, default=None, help="First tokens kept forever (default: the bundle's)."),
    click.option("--policy", type=click.Choice(["slide", "error"]), default="slide", show_default=True,
                 help="When the cache is full: drop the oldest tokens, or stop with an error."),
]
SAMPLING_OPTIONS = [
    click.option("--max-tokens", type=int, default=None, help="Most tokens to generate (default: the bundle's)."),
    click.option("--temperature", type=float, default=None,
                 help="0 = greedy. Default: 0 for generate (reproducible), the bundle's for chat."),
    click.option("--top-k", type=int, default=None, help="Keep the k most likely tokens (0 = off)."),
    click.option("--top-p", type=float, default=None, help="Nucleus mass (1.0 = off)."),
    click.option("--min-p", type=float, default=None, help="Drop tokens below min-p × the top probability."),
    click.option("--repetition-penalty", type=float, default=None, help="> 1 discourages repeats (1.0 = off)."),
    click.option("--seed", type=int, default=None, help="Sampling seed (reproducible output)."),
    click.option("--stop", multiple=True, help="Stop string (repeatable); never part of the output."),
]
MODEL_OPTIONS = [
    click.argument("bundle", type=click.Path(exists=True, file_okay=False, path_type=Path)),
    click.option("--backend", type=click.Choice(["native", "onnx", "tflite"]), default=None,
                 help="Default: native where the bundle and cache options allow, else onnx, else tflite."),
    click.option("--threads", type=click.IntRange(1, MAX_THREADS), default=None,
                 help="Threads for onnxruntime and the attention kernels."),
    click.option("--spin", is_flag=True, default=False,
                 help="Native backend: onnxruntime's threads spin before they sleep and run the attention "
                      "too (faster on an idle device, slower beside busy processes)."),
    click.option("--system", default=None, help="System message (chat template)."),
    VERIFY_OPTION,
    click.option("--memory", default=None, help=MEMORY_HELP),
]
_KV = ("kv_budget", "kv_bits", "window", "sinks", "policy")
_SAMPLING = ("max_tokens", "temperature", "top_k", "top_p", "min_p", "repetition_penalty", "seed", "stop")


def _apply(options):
    """Decorator applying a list of click options (first listed = first in --help)."""
    return lambda f: functools.reduce(lambda g, opt: opt(g), reversed(options), f)


def _pick(kw: dict, names) -> dict:
    return {k: kw.pop(k) for k in names if k in kw}


def _load(bundle: Path, backend, threads, verify, cache_opts: dict, memory=None, spin: bool = False):
    import tqedge

    opts = {k: v for k, v in cache_opts.items() if v is not None}
    return tqedge.load(bundle, backend=backend, threads=threads, verify=verify, memory=memory, spin=spin, **opts)


def _sampling(kw: dict) -> dict:
    s = _pick(kw, _SAMPLING)
    s["stop"] = list(s.get("stop") or []) or None
    return s


def _stats_line(stats) -> str:
    return f"[{stats.summary()}]" if stats else "[no reply yet]"


@click.command("generate")
@_apply(MODEL_OPTIONS)
@click.option("-p", "--prompt", default=None, help="The prompt ('-' or omitted: read stdin).")
@click.option("--chat/--raw", "chat", default=None,
              help="Wrap the prompt in the chat template (default when the bundle has one) or complete it raw.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object: text, tokens (generated ids), prompt_ids, finish_reason, stats.")
@_apply(SAMPLING_OPTIONS)
@_apply(KV_OPTIONS)
def generate_cmd(bundle: Path, prompt: str | None, chat: bool | None, as_json: bool, backend, threads, spin,
                 system, verify, memory, **kw) -> None:
    """Generate a completion of a prompt with the model in BUNDLE."""
    from tqedge.runtime.generate import stream_generate
    from tqedge.runtime.template import render_for

    cache_opts, sampling = _pick(kw, _KV), _sampling(kw)
    if sampling["temperature"] is None:  # one-shot answers default to greedy, as in mlx-lm
        sampling["temperature"] = 0.0
    prompt = input_text(sys.stdin.buffer.read() if prompt is None or prompt == "-" else prompt)
    system = input_text(system) if system else system
    if not prompt.strip():
        raise TqedgeError("the prompt is empty (use -p TEXT or pipe it on stdin)")
    if system and chat is False:
        raise TqedgeError("--system needs the chat template; drop --raw")
    model = _load(bundle, backend, threads, verify, cache_opts, memory, spin)
    use_chat = bool(model.manifest.tokenizer.chat_template) if chat is None else chat
    if use_chat:
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        ids = model.encode(render_for(model.manifest, messages), add_special_tokens=False)
    else:
        if system:
            raise TqedgeError("--system needs the chat template, and this bundle has none")
        ids = model.encode(prompt)
    tokens, texts, last = [], [], None
    for r in stream_generate(model, ids, **sampling):
        tokens.append(r.token)
        texts.append(r.text)
        last = r
        if not as_json and r.text:
            click.echo(r.text, nl=False)
            sys.stdout.flush()
    if as_json:
        click.echo(json.dumps({"text": "".join(texts), "tokens": tokens, "prompt_ids": ids,
                               "finish_reason": last.finish_reason, "chat_template": use_chat,
                               "stats": last.stats.to_dict()}, ensure_ascii=False))
    else:
        click.echo()
        click.echo(_stats_line(last.stats), err=True)


class ChatRepl:
    """The ``tqedge chat`` loop: commands by registry, replies streamed to stdout."""

    def __init__(self, chat, interactive: bool):
        self.chat, self.interactive = chat, interactive
        self.commands = {"/reset": self.reset, "/stats": self.stats, "/exit": self.exit, "/quit": self.exit,
                         "/help": self.help}
        self.running = True

    def reset(self) -> None:
        self.chat.reset()
        click.echo("[conversation reset]")

    def stats(self) -> None:
        c = self.chat.cache
        click.echo(_stats_line(self.chat.stats))
        click.echo(f"[cache: {c.length}/{c.capacity} tokens held, {c.offset} seen, {c.evicted} evicted, "
                   f"{len(self.chat.messages)} messages]")

    def exit(self) -> None:
        self.running = False

    def help(self) -> None:
        click.echo("commands: " + ", ".join(self.commands))

    def handle(self, line: str) -> None:
        """Run one input line: a /command or a user message."""
        line = line.strip()
        if not line:
            return
        cmd = self.commands.get(line.split()[0].lower()) if line.startswith("/") else None
        if cmd is not None:
            cmd()
            return
        pieces = self.chat.send(line, stream=True)
        try:
            for piece in pieces:
                click.echo(piece, nl=False)
                sys.stdout.flush()
        except KeyboardInterrupt:
            if not self.interactive:
                raise
            pieces.close()
            click.echo(" [interrupted]", nl=False)
        click.echo()
        click.echo(_stats_line(self.chat.stats), err=True)

    def run(self, stream) -> None:
        if self.interactive:
            try:
                import readline  # noqa: F401  (line editing and history for input())
            except ImportError:  # Windows
                pass
            click.echo("Type a message; /reset, /stats, /exit. Ctrl-D quits.", err=True)
        while self.running:
            try:
                line = input(">>> ") if self.interactive else stream.readline()
            except EOFError:
                break
            except UnicodeDecodeError:  # a terminal whose encoding is not UTF-8: the line is dropped
                _warn_utf8()
                continue
            if not self.interactive and not line:
                break
            line = input_text(line)
            try:
                self.handle(line)
            except TqedgeError as e:
                if not self.interactive:
                    raise
                click.echo(f"error: {e}", err=True)


@click.command("chat")
@_apply(MODEL_OPTIONS)
@_apply(SAMPLING_OPTIONS)
@_apply(KV_OPTIONS)
def chat_cmd(bundle: Path, backend, threads, spin, system, verify, memory, **kw) -> None:
    """Chat with the model in BUNDLE (one message per line when stdin is not a terminal)."""
    from tqedge.runtime.chat import Chat

    cache_opts, sampling = _pick(kw, _KV), _sampling(kw)
    model = _load(bundle, backend, threads, verify, cache_opts, memory, spin)
    chat = Chat(model, system=input_text(system) if system else system, **sampling)
    interactive = sys.stdin.isatty()
    ChatRepl(chat, interactive).run(None if interactive else sys.stdin.buffer)  # bytes: decoded per line

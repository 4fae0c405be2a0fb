"""The ``tqedge`` command: one click group; each subcommand lives next to the library code it
wraps and is imported only when it runs, so ``tqedge chat`` on a device never imports the
exporter. Add a command by adding a row to ``COMMANDS``.
"""

from __future__ import annotations

import importlib
import logging
import sys

import click

from tqedge import __version__
from tqedge.errors import TqedgeError

# name → ("module:attribute", one-line help). Dispatch by registry, not by if/elif.
COMMANDS: dict[str, tuple[str, str]] = {
    "export": ("tqedge.exporters.cli:export_cmd", "Export a GGUF file or HF folder to a bundle."),
    "inspect": ("tqedge.exporters.cli:inspect_cmd", "Print a bundle's manifest and sizes."),
    "generate": ("tqedge.runtime.cli:generate_cmd", "Generate text from a prompt."),
    "chat": ("tqedge.runtime.cli:chat_cmd", "Interactive chat (reads stdin lines when not a terminal)."),
    "eval": ("tqedge.runtime.eval_cli:eval_group", "Quality evaluation: perplexity, needle."),
    "plan": ("tqedge.runtime.plan:plan_cmd", "What fits on a device: weights and KV context per budget."),
    "serve": ("tqedge.runtime.server.cli:serve_cmd", "OpenAI-compatible app-backend server."),
    "doctor": ("tqedge.runtime.doctor:doctor_cmd", "Check this device and recommend settings."),
}


class LazyGroup(click.Group):
    """A click group whose subcommands are imported on first use."""

    def list_commands(self, ctx):
        return sorted(COMMANDS)

    def get_command(self, ctx, name):
        if name not in COMMANDS:
            return None
        target, _ = COMMANDS[name]
        mod_name, attr = target.split(":")
        try:
            mod = importlib.import_module(mod_name)
        except ModuleNotFoundError as e:
            return _unavailable(name, _missing_module(e))
        return getattr(mod, attr)

    def format_commands(self, ctx, formatter):
        rows = [(name, help_) for name, (_, help_) in sorted(COMMANDS.items())]
        with formatter.section("Commands"):
            formatter.write_dl(rows)

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except TqedgeError as e:
            click.echo(f"error: {e}", err=True)
            ctx.exit(2)
        except click.UsageError as e:  # a bad option or argument: one line too, with where to look
            where = e.ctx.command_path if e.ctx else ctx.command_path
            click.echo(f"error: {' '.join(e.format_message().split())} (see '{where} --help')", err=True)
            ctx.exit(e.exit_code)
        except ModuleNotFoundError as e:  # an optional extra, imported lazily by the command
            if _EXTRAS.get((e.name or "").split(".")[0]) is None:
                raise
            click.echo(f"error: {_missing_module(e)}", err=True)
            ctx.exit(2)


# top-level module → the extra that installs it
_EXTRAS = {"onnx": "export", "gguf": "export", "safetensors": "export", "starlette": "server",
           "uvicorn": "server", "ai_edge_litert": "tflite", "flatbuffers": "tflite"}


def _missing_module(e: ModuleNotFoundError) -> str:
    missing = e.name or "?"
    extra = _EXTRAS.get(missing.split(".")[0])
    hint = f" (pip install 'tqedge[{extra}]')" if extra else ""
    return f"needs the module {missing!r}{hint}"


def _unavailable(name: str, why: str) -> click.Command:
    @click.command(name, context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
    def cmd():
        raise TqedgeError(f"'tqedge {name}' is not available: {why}")

    return cmd


@click.group(cls=LazyGroup)
@click.version_option(__version__, prog_name="tqedge")
@click.option("-v", "--verbose", count=True, help="More logging (-v info, -vv debug).")
def cli(verbose: int) -> None:
    """tqedge: chat LLMs on small devices with a TurboQuant-compressed KV cache."""
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)


def main() -> None:
    cli(prog_name="tqedge")


if __name__ == "__main__":
    main()

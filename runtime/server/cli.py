"""``tqedge serve BUNDLE``: the OpenAI-compatible app-backend server (Starlette + uvicorn)."""

from __future__ import annotations

import ipaddress
import logging

import click

from tqedge.runtime.cli import VERIFY_OPTION

log = logging.getLogger(__name__)


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


@click.command("serve")
@click.argument("bundle", type=click.Path(exists=True, file_okay=False))
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind (loopback by default).")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535))
@click.option("--kv-budget", default=None, help="Global KV budget shared by all conversations [default: 256MiB, or what --memory leaves].")
@click.option("--memory", default=None, help="Peak RSS of the whole server, e.g. 1GiB: the global KV budget gets what the measured fixed cost leaves.")
@click.option("--session-budget", default=None, help="KV budget of one conversation [default: kv-budget / max-sessions].")
@click.option("--max-sessions", default=4, show_default=True, type=click.IntRange(1, 4096),
              help="Conversations held in memory; idle ones beyond are evicted to disk (LRU).")
@click.option("--kv-bits", default=None, help='Cache bits "4,3" or "exact" [default: the bundle\'s].')
@click.option("--session-dir", default=None, type=click.Path(file_okay=False),
              help="Folder for evicted conversations [default: a temp folder removed at exit].")
@click.option("--api-key", default=None, envvar="TQEDGE_API_KEY", help="Require 'Authorization: Bearer KEY' (env TQEDGE_API_KEY).")
@click.option("--max-queue", default=16, show_default=True, type=click.IntRange(0, 100000),
              help="Requests that may wait; more get 429.")
@click.option("--max-tokens-limit", default=4096, show_default=True, type=click.IntRange(1, 1 << 20),
              help="Largest max_tokens a request may ask for.")
@click.option("--max-body", default="1MiB", show_default=True, help="Largest request body.")
@click.option("--threads", default=None, type=click.IntRange(1, 256), help="Backend intra-op threads.")
@click.option("--backend", default=None,
              help="native, onnx or tflite [default: native where it runs the bundle and --kv-bits, else onnx, "
              "else tflite].")
@VERIFY_OPTION
@click.option("--store", default=None, help="redis://HOST:PORT: write each turn's compressed KV through to "
              "Redis so any replica continues any conversation (docs/SCALE.md).")
@click.option("--replicas", default=None, type=click.IntRange(1, 1024),
              help="Run N replicas behind one endpoint on Ray Serve (the 'scale' extra).")
@click.option("--max-replicas", default=None, type=click.IntRange(1, 1024),
              help="With --replicas: autoscale up to this many on ongoing requests.")
@click.option("--ray-address", default=None, help="Join this Ray cluster [default: start a local Ray].")
def serve_cmd(bundle, host, port, kv_budget, memory, session_budget, max_sessions, kv_bits, session_dir, api_key,
              max_queue, max_tokens_limit, max_body, threads, backend, verify, store, replicas, max_replicas,
              ray_address):
    """Serve BUNDLE over an OpenAI-compatible HTTP API (/v1/chat/completions, /v1/models,
    /v1/stats, /health)."""
    import uvicorn

    import tqedge
    from tqedge.runtime.server.app import ServerConfig, create_app
    from tqedge.units import format_bytes, parse_bytes

    if not _is_loopback(host) and not api_key:
        log.warning("binding %s without --api-key: anyone who can reach this port can use the model", host)
    if store:
        from tqedge.runtime.server.store import check_url

        check_url(store)
    if memory and (replicas or max_replicas or ray_address):
        raise click.UsageError("--memory budgets one process; with --replicas give --kv-budget per replica")
    cfg = ServerConfig(kv_budget=kv_budget or "256MiB", session_budget=session_budget, max_sessions=max_sessions,
                       kv_bits=kv_bits, session_dir=session_dir, api_key=api_key, max_queue=max_queue,
                       max_tokens_limit=max_tokens_limit, max_body_bytes=parse_bytes(max_body), store=store)
    if replicas or max_replicas or ray_address:
        from tqedge.runtime.server import ray_app

        n = replicas or 1
        click.echo(f"tqedge serve: http://{host}:{port}/v1  ({n}{f'..{max_replicas}' if max_replicas else ''} "
                   f"replicas on Ray Serve, store {store or 'none'})", err=True)
        ray_app.run(bundle, cfg, host, port, n, max_replicas, threads, backend, ray_address, verify)
        return
    model = tqedge.load(bundle, backend=backend, threads=threads, verify=verify, memory=memory, kv_bits=kv_bits,
                        batched=True,
                        **({"kv_budget": kv_budget} if kv_budget else {}))
    if memory and not kv_budget:
        cfg.kv_budget = model.cache_defaults["kv_budget"]
    app = create_app(model, cfg)
    click.echo(f"tqedge serve: http://{host}:{port}/v1  ({app.state.sessions.slots} conversations, "
               f"{format_bytes(parse_bytes(cfg.kv_budget))} KV)", err=True)
    uvicorn.run(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=5)

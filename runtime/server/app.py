"""OpenAI-compatible HTTP API over one model (Starlette; run with uvicorn).

Routes: ``POST /v1/chat/completions`` (JSON or SSE stream), ``GET /v1/models[/{name}]``,
``GET /health`` (never needs a key), ``GET /v1/stats``. Generation runs in the
:class:`~tqedge.runtime.server.engine.Engine` worker thread; handlers only validate, enqueue and
relay events, so the event loop stays responsive. Errors are OpenAI-shaped
``{"error": {"message", "type", "param", "code"}}`` with 400 (bad request), 401 (key),
404 (route, or ``model_not_found``), 405, 413 (body too large), 429 (queue full, with
``Retry-After``) or 500; an unexpected error is logged once and answered with a 500 without
closing the client's keep-alive connection.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from tqedge.errors import TqedgeError
from tqedge.runtime.server import schema as S
from tqedge.runtime.server.engine import Engine, Job, QueueFull
from tqedge.runtime.server.sessions import SessionManager
from tqedge.runtime.template import render_for

log = logging.getLogger(__name__)

POLL_S = 0.5  # how often a non-streaming handler checks that its client is still there


@dataclass
class ServerConfig:
    """Server settings (the ``tqedge serve`` options)."""

    kv_budget: str | int = "256MiB"
    session_budget: str | int | None = None
    max_sessions: int = 4
    kv_bits: str | None = None
    session_dir: str | None = None
    api_key: str | None = None
    max_queue: int = 16
    max_tokens_limit: int = 4096
    max_body_bytes: int = 1 << 20
    model_id: str | None = None
    store: str | None = None  # redis://HOST:PORT: write-through conversation state shared by replicas


class AuthMiddleware:
    """Bearer-token check (constant-time) on every route but ``/health``; pure ASGI so
    streaming responses and client disconnects pass through untouched."""

    def __init__(self, app, api_key: str | None):
        self.app, self.key = app, (f"Bearer {api_key}".encode() if api_key else None)

    async def __call__(self, scope, receive, send):
        if self.key is not None and scope["type"] == "http" and scope["path"] != "/health":
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.key):
                err = S.APIError(401, "missing or invalid API key (send Authorization: Bearer <key>)",
                                 "authentication_error", None, "invalid_api_key")
                await _error_response(err)(scope, receive, send)
                return
        await self.app(scope, receive, send)


class CatchAllMiddleware:
    """Answer an unhandled error with an OpenAI-shaped 500 and log it once. Unlike Starlette's
    ServerErrorMiddleware this does not re-raise, so uvicorn keeps the connection open; an error
    after the response started (mid-stream) still propagates and closes it."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def send_(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, send_)
        except Exception:
            if started:
                raise  # mid-response: uvicorn logs it and closes the connection
            log.exception("unhandled error on %s", scope.get("path"))
            await _error_response(S.APIError(500, "internal server error", "server_error"))(scope, receive, send)


def model_names(model, model_id: str | None = None) -> list[str]:
    """The names a request's ``model`` may use: the id (``model_id`` or the bundle's name), the
    bundle folder's stem (``smol`` for ``smol.tqe``) and :data:`~schema.DEFAULT_MODEL`."""
    path = getattr(model, "path", None)
    names = [model_id or model.manifest.name, Path(path).stem if path else None, S.DEFAULT_MODEL]
    return list(dict.fromkeys(n for n in names if n))


def _error_response(e: S.APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"


class ChatAPI:
    """The route handlers, bound to one model, engine and config."""

    def __init__(self, model, engine: Engine, sessions: SessionManager, config: ServerConfig):
        self.model, self.engine, self.sessions, self.cfg = model, engine, sessions, config
        self.names = model_names(model, config.model_id)
        self.model_id = self.names[0]
        self.created = int(time.time())

    # -- helpers ----------------------------------------------------------------------------
    async def _body(self, request: Request):
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > self.cfg.max_body_bytes:
            raise S.APIError(413, f"request body over {self.cfg.max_body_bytes} bytes", code="request_too_large")
        data = bytearray()
        async for part in request.stream():
            data += part
            if len(data) > self.cfg.max_body_bytes:
                raise S.APIError(413, f"request body over {self.cfg.max_body_bytes} bytes", code="request_too_large")
        return S.decode_json(bytes(data))

    def _prompt_ids(self, messages: list[dict]) -> list[int]:
        try:
            text = render_for(self.model.manifest, messages, add_generation_prompt=True)
        except TqedgeError as e:
            raise S.bad(str(e), "messages") from None
        ids = self.model.encode(text, add_special_tokens=False)
        limit = self.sessions.capacity - 1
        if len(ids) > limit:
            raise S.bad(f"the prompt is {len(ids)} tokens; this server's conversations hold {limit} "
                        f"(raise --session-budget)", "messages", "context_length_exceeded")
        return ids

    def _job(self, ids, sampling) -> tuple[Job, asyncio.Queue]:
        loop, queue = asyncio.get_running_loop(), asyncio.Queue()

        def emit(kind, payload):
            try:
                loop.call_soon_threadsafe(queue.put_nowait, (kind, payload))
            except RuntimeError:  # the loop is closed: nobody is listening any more
                job.cancel()

        job = Job(ids, sampling, emit)
        try:
            self.engine.submit(job)
        except QueueFull as e:
            raise S.APIError(429, "the server is busy; retry later", "rate_limit_error", None, "queue_full",
                             {"Retry-After": str(e.retry_after)}) from None
        return job, queue

    # -- routes -----------------------------------------------------------------------------
    async def chat_completions(self, request: Request):
        body = await self._body(request)
        S.check_model(body, self.names)
        req = S.parse_chat_request(body, self.cfg.max_tokens_limit,
                                   int(self.model.manifest.generation.max_tokens))
        ids = self._prompt_ids(req.messages)
        job, queue = self._job(ids, req.sampling)
        cid, created = S.new_id(), int(time.time())
        if req.stream:
            return StreamingResponse(self._stream(job, queue, cid, created, req.include_usage),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        return await self._complete(request, job, queue, cid, created)

    async def _complete(self, request, job, queue, cid, created):
        text = []
        try:
            while True:
                try:
                    kind, payload = await asyncio.wait_for(queue.get(), POLL_S)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        job.cancel()
                        return JSONResponse({}, status_code=499)
                    continue
                if kind == "text":
                    text.append(payload)
                elif kind == "error":
                    raise S.APIError(500, str(payload), "server_error", None, "generation_failed")
                elif kind == "done":
                    use = S.usage(payload["prompt"], payload["completion_tokens"], payload["cached"])
                    return JSONResponse(S.completion(cid, self.model_id, "".join(text), payload["finish"], use, created))
        finally:
            job.cancel()  # no-op once done; stops the generation if this handler is cancelled

    async def _stream(self, job, queue, cid, created, include_usage):
        try:
            yield _sse(S.chunk(cid, self.model_id, created, {"role": "assistant", "content": ""}))
            while True:
                kind, payload = await queue.get()
                if kind == "text":
                    yield _sse(S.chunk(cid, self.model_id, created, {"content": payload}))
                elif kind == "error":
                    err = S.APIError(500, str(payload), "server_error", None, "generation_failed")
                    yield _sse(err.body())
                    break
                elif kind == "done":
                    yield _sse(S.chunk(cid, self.model_id, created, {}, payload["finish"]))
                    if include_usage:
                        use = S.usage(payload["prompt"], payload["completion_tokens"], payload["cached"])
                        yield _sse(S.chunk(cid, self.model_id, created, None, use=use))
                    break
            yield "data: [DONE]\n\n"
        finally:
            job.cancel()  # the client went away (or we are done): stop generating, free the slot

    def _model(self, name: str) -> dict:
        return {"id": name, "object": "model", "created": self.created, "owned_by": "tqedge"}

    async def models(self, request: Request):
        return JSONResponse({"object": "list", "data": [self._model(name) for name in self.names]})

    async def model_info(self, request: Request):
        name = request.path_params["name"]
        S.check_model({"model": name}, self.names)
        return JSONResponse(self._model(name))

    async def health(self, request: Request):
        return JSONResponse({"status": "ok", "model": self.model_id})

    async def stats(self, request: Request):
        store = self.sessions.store
        extra = {"store": dict(store.counters)} if store is not None else {}
        return JSONResponse({"model": self.model_id, "sessions": self.sessions.snapshot(), **self.engine.stats(), **extra})


def create_app(model, config: ServerConfig | None = None) -> Starlette:
    """Build the ASGI app for ``model``; the engine starts and stops with the app's lifespan.

    Args:
        model: a loaded :class:`~tqedge.runtime.model.Model` (or anything with its interface).
        config: server settings.

    Returns:
        The app (``app.state.engine`` / ``app.state.sessions`` are exposed for tests and tools).

    Raises:
        TqedgeError: the budgets do not fit this model.
    """
    import contextlib

    cfg = config or ServerConfig()
    sessions = SessionManager(model, cfg.kv_budget, cfg.max_sessions, cfg.session_budget, cfg.kv_bits,
                              cfg.session_dir, store=cfg.store)
    engine = Engine(model, sessions, cfg.max_queue)
    api = ChatAPI(model, engine, sessions, cfg)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        engine.start()
        log.info("serving %s: %d conversations × %d bytes of KV, queue %d", api.model_id, sessions.slots,
                 sessions.cache_bytes, cfg.max_queue)
        try:
            yield
        finally:
            await asyncio.to_thread(engine.stop)
            sessions.close()

    async def api_error(request, exc: S.APIError):
        return _error_response(exc)

    async def http_error(request, exc: HTTPException):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return _error_response(S.APIError(exc.status_code, str(exc.detail), kind))

    routes = [Route("/v1/chat/completions", api.chat_completions, methods=["POST"]),
              Route("/v1/models", api.models, methods=["GET"]),
              Route("/v1/models/{name:path}", api.model_info, methods=["GET"]),
              Route("/v1/stats", api.stats, methods=["GET"]),
              Route("/health", api.health, methods=["GET"])]
    app = Starlette(routes=routes, lifespan=lifespan,
                    exception_handlers={S.APIError: api_error, HTTPException: http_error})
    app.state.engine, app.state.sessions, app.state.config = engine, sessions, cfg
    app.add_middleware(AuthMiddleware, api_key=cfg.api_key)
    app.add_middleware(CatchAllMiddleware)  # added last = outermost: also covers the auth check
    return app

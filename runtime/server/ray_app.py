"""``tqedge serve --replicas N``: N server replicas behind one OpenAI-compatible endpoint (Ray Serve).

Two deployments:

- :class:`Router` (the HTTP ingress, no CPU reserved): reads the request, derives the
  conversation's *affinity key* (:func:`affinity_key`) and forwards the request to a replica
  with that key as Ray Serve's multiplexed model id, so the turns of one conversation go to the
  replica that holds it warm while that replica is alive;
- :class:`Replica`: one ordinary tqedge server app (:func:`~tqedge.runtime.server.app.create_app`:
  model, engine, sessions) driven in-process over ASGI, streaming its response back. With
  ``--store redis://…`` every replica writes each finished turn through to Redis, so any other
  replica continues a conversation from its longest stored prefix (no recompute) when the warm
  one is gone or busy elsewhere.

Ray Serve restarts a replica whose health check fails (its engine thread died) and scales
between ``replicas`` and ``max_replicas`` on ongoing requests. Ray is an optional extra
(``pip install "tqedge[scale]"``); nothing else in the runtime imports this module.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
from dataclasses import asdict

from tqedge.errors import TqedgeError

log = logging.getLogger(__name__)

SESSION_HEADER = "x-session-id"  # a client may name its conversation explicitly
REPLICA_HEADER = "x-tqedge-replica"  # which replica answered (ops, tests)
MAX_CONVERSATIONS_PER_REPLICA = 4096  # affinity ids a replica advertises (LRU beyond)


def affinity_key(body: bytes, headers) -> str:
    """The key that routes a request's conversation: the ``x-session-id`` header, else the
    request's ``user`` field, else a hash of the conversation's first two messages (system +
    first user turn: the same for every turn of one conversation). "" when there is none."""
    given = headers.get(SESSION_HEADER)
    if given:
        return "s:" + hashlib.sha256(given.encode()).hexdigest()[:32]
    try:
        req = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return ""
    if not isinstance(req, dict):
        return ""
    if isinstance(req.get("user"), str) and req["user"]:
        return "u:" + hashlib.sha256(req["user"].encode()).hexdigest()[:32]
    msgs = req.get("messages")
    if not isinstance(msgs, list) or not msgs:
        return ""
    head = json.dumps(msgs[:2], sort_keys=True, ensure_ascii=False, default=str)
    return "m:" + hashlib.sha256(head.encode()).hexdigest()[:32]


async def call_asgi(app, method: str, path: str, query: bytes, headers: list, body: bytes):
    """Run one HTTP request through an ASGI ``app`` in-process; yields ``{"status", "headers"}``
    first, then the body chunks (bytes). Closing the generator early tells the app the client
    disconnected."""
    sent: asyncio.Queue = asyncio.Queue()
    gone = asyncio.Event()
    first = True

    async def receive():
        nonlocal first
        if first:
            first = False
            return {"type": "http.request", "body": body, "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message):
        await sent.put(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method,
             "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": query,
             "root_path": "", "headers": headers, "client": ("127.0.0.1", 0), "server": ("127.0.0.1", 0)}
    task = asyncio.ensure_future(app(scope, receive, send))
    try:
        while True:
            getter = asyncio.ensure_future(sent.get())
            await asyncio.wait({getter, task}, return_when=asyncio.FIRST_COMPLETED)
            if not getter.done():  # the app ended without sending more
                getter.cancel()
                task.result()  # re-raise its error, if any
                return
            msg = getter.result()
            if msg["type"] == "http.response.start":
                yield {"status": msg["status"],
                       "headers": [(k.decode("latin-1"), v.decode("latin-1")) for k, v in msg.get("headers", [])]}
            elif msg["type"] == "http.response.body":
                if msg.get("body"):
                    yield bytes(msg["body"])
                if not msg.get("more_body", False):
                    return
    finally:
        gone.set()
        if not task.done():
            try:
                await asyncio.wait_for(task, 5)
            except (asyncio.TimeoutError, Exception):  # noqa: BLE001 - the app logs its own errors
                task.cancel()


def build_app(bundle: str, config: dict, replicas: int = 2, max_replicas: int | None = None,
              threads: int | None = None, backend: str | None = None, verify: str = "auto"):
    """The Ray Serve application (``serve.run(build_app(...))``).

    Args:
        bundle: bundle directory (readable by every node).
        config: :class:`~tqedge.runtime.server.app.ServerConfig` fields (``store`` = Redis URL).
        replicas: replicas to start (the autoscaling minimum when ``max_replicas`` is larger).
        max_replicas: autoscale up to this many on ongoing requests (None: fixed ``replicas``).
        threads: backend intra-op threads per replica (also the CPUs Ray reserves for it).
        backend: "native" | "onnx" | "tflite" | None (the first that runs the bundle and ``kv_bits``).
        verify: bundle verification on each replica's load (see :func:`tqedge.load`).
    """
    try:
        from ray import serve
        from starlette.requests import Request
        from starlette.responses import Response, StreamingResponse
    except ImportError:
        raise TqedgeError('--replicas needs the "scale" extra: pip install "tqedge[scale]"') from None
    if replicas < 1 or (max_replicas is not None and max_replicas < replicas):
        raise TqedgeError(f"--replicas must be ≥ 1 and --max-replicas ≥ --replicas (got {replicas}, {max_replicas})")
    scaling = {}
    if max_replicas and max_replicas > replicas:
        scaling["autoscaling_config"] = {"min_replicas": replicas, "max_replicas": max_replicas,
                                         "target_ongoing_requests": max(1, int(config.get("max_sessions", 4)))}
    else:
        scaling["num_replicas"] = replicas

    @serve.deployment(ray_actor_options={"num_cpus": threads or 1}, health_check_period_s=10,
                      max_ongoing_requests=int(config.get("max_queue", 16)) + int(config.get("max_sessions", 4)),
                      **scaling)
    class Replica:
        def __init__(self):
            import tqedge
            from tqedge.runtime.server.app import ServerConfig, create_app

            model = tqedge.load(bundle, backend=backend, threads=threads, verify=verify, kv_bits=config.get("kv_bits"),
                                batched=True)
            self.app = create_app(model, ServerConfig(**config))
            self.engine = self.app.state.engine
            self.engine.start()  # no ASGI lifespan here: the replica owns the engine
            self.name = f"{os.uname().nodename}:{os.getpid()}"

        @serve.multiplexed(max_num_models_per_replica=MAX_CONVERSATIONS_PER_REPLICA)
        async def conversation(self, key: str) -> str:
            return key  # nothing to load: advertising the key is what makes the routing sticky

        async def handle(self, method: str, path: str, query: bytes, headers: list, body: bytes):
            key = serve.get_multiplexed_model_id()
            if key:
                await self.conversation(key)
            gen = call_asgi(self.app, method, path, query, headers, body)
            async for item in gen:
                if isinstance(item, dict):
                    item["headers"].append((REPLICA_HEADER, self.name))
                yield item

        def check_health(self):
            if not self.engine.thread.is_alive():
                raise RuntimeError("engine thread is not running")

        def __del__(self):
            try:
                self.engine.stop()
                self.app.state.sessions.close()
            except Exception:  # noqa: BLE001 - best effort at actor teardown
                pass

    @serve.deployment(ray_actor_options={"num_cpus": 0})
    class Router:
        def __init__(self, replica):
            self.replica = replica
            self.max_body = int(config.get("max_body_bytes", 1 << 20))

        async def __call__(self, request: Request):
            body = await request.body()
            if len(body) > self.max_body:
                err = {"error": {"message": f"request body over {self.max_body} bytes",
                                 "type": "invalid_request_error", "param": None, "code": "request_too_large"}}
                return Response(json.dumps(err), status_code=413, media_type="application/json")
            key = affinity_key(body, request.headers)
            handle = self.replica.options(multiplexed_model_id=key, stream=True)
            gen = handle.handle.remote(request.method, request.url.path, request.url.query.encode(),
                                       list(request.headers.raw), body)
            start = await gen.__anext__()
            headers = {k: v for k, v in start["headers"] if k.lower() not in ("content-length", "transfer-encoding")}
            media = headers.pop("content-type", None)

            async def rest():
                async for chunk in gen:
                    yield chunk

            return StreamingResponse(rest(), status_code=start["status"], headers=headers, media_type=media)

    return Router.bind(Replica.bind())


def app_builder(args: dict):
    """Application builder for ``serve run`` / KubeRay ``serveConfigV2`` (``import_path:
    tqedge.runtime.server.ray_app:app_builder``): ``args`` = ``bundle``, optional ``replicas``,
    ``max_replicas``, ``threads``, ``backend``, and any :class:`ServerConfig` field (``store``,
    ``kv_budget``, ``max_sessions``, …)."""
    from dataclasses import fields

    from tqedge.runtime.server.app import ServerConfig

    args = dict(args)
    own = {k: args.pop(k) for k in ("replicas", "max_replicas", "threads", "backend") if k in args}
    bundle = args.pop("bundle", None)
    if not bundle:
        raise TqedgeError("app_builder needs args.bundle (the bundle directory)")
    known = {f.name for f in fields(ServerConfig)}
    unknown = sorted(set(args) - known)
    if unknown:
        raise TqedgeError(f"unknown server option(s) {', '.join(unknown)} (known: {', '.join(sorted(known))})")
    def num(k):
        return None if own.get(k) is None else int(own[k])

    return build_app(bundle, asdict(ServerConfig(**args)), num("replicas") or 1, num("max_replicas"),
                     num("threads"), own.get("backend"))


def run(bundle: str, config, host: str, port: int, replicas: int, max_replicas: int | None,
        threads: int | None, backend: str | None, ray_address: str | None, verify: str = "auto") -> None:
    """Start (or join) Ray, deploy the app on ``host:port`` and block until interrupted."""
    try:
        import ray
        from ray import serve
    except ImportError:
        raise TqedgeError('--replicas needs the "scale" extra: pip install "tqedge[scale]"') from None
    ray.init(address=ray_address, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
    serve.start(http_options={"host": host, "port": port})
    serve.run(build_app(bundle, asdict(config), replicas, max_replicas, threads, backend, verify),
              name="tqedge", route_prefix="/", blocking=True)

"""``sglang-core router --workers URL...``: the data-parallel router as a process of its own, in
front of several ``sglang-core serve`` processes (on this machine or others).

It forwards the generating routes (SGLang's ``/generate``, OpenAI's ``/v1/completions`` and
``/v1/chat/completions``, Anthropic's ``/v1/messages``) to the worker its policy picks, streaming
the worker's response through byte for byte; a client that leaves closes the worker's response,
so the worker aborts the request. It has no model and so no tokenizer: the routing key is the
prompt's text, characters in place of tokens (token ids when a request gives ``input_ids``), so
``cache_aware``'s tree holds characters and ``--router-max-tree-tokens`` counts characters.

``/health`` is 200 only while every worker answers its own ``/health``; ``/get_server_info``
and ``/flush_cache`` go to every worker; ``/abort_request`` goes to the worker that has the
request id; ``/metrics`` gives the router's own counts, labelled by worker. Any other route is
forwarded to the first live worker (``/v1/models``, ``/get_model_info``, ``/tokenize``, ...).

A worker that fails a request is taken out of routing until its ``/health`` answers again. One
that cannot be connected to never got the request, which goes to the next live worker; one that
dies mid-stream ends the client's stream with an error event naming it, in the route's API's
shape, never a hang or a stream cut short without a word.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from typing import Any

import httpx
import uvicorn
from fastapi import FastAPI
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, generate_latest
from pydantic import Field, field_validator
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from sglang_core.plugins import PluginManager
from sglang_core.router.options import RouterOptions
from sglang_core.router.router import NoReplica, Router
from sglang_core.server.errors import error_body, error_response

logger = logging.getLogger("sglang_core.router")

GENERATING_ROUTES = ("/generate", "/v1/completions", "/v1/chat/completions", "/v1/messages")
# Hop-by-hop headers and those the HTTP client recomputes.
_DROPPED_HEADERS = {"host", "content-length", "connection", "keep-alive", "transfer-encoding", "accept-encoding"}


class StandaloneRouterSettings(RouterOptions):
    workers: list[str] = Field(..., min_length=1, json_schema_extra={"nargs": "+"}, description="base URLs of the sglang-core serve processes to route to")
    host: str = Field("127.0.0.1", description="address to listen on")
    port: int = Field(30000, ge=0, le=65535, description="port to listen on")
    health_check_interval_s: float = Field(2.0, gt=0, description="how often each worker's /health is polled (a dead worker takes no requests until it answers again)")
    request_timeout_s: float = Field(600.0, gt=0, description="longest wait for a worker's next bytes")
    plugins: list[str] | None = Field(None, description="plugins to load for their routing policies, comma-separated (default: all installed)")
    log_level: str = Field("warning", description="logging level")

    @field_validator("workers", "plugins", mode="before")
    @classmethod
    def _split(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [p.strip() for p in value.split(",") if p.strip()]
        return value

    @field_validator("workers")
    @classmethod
    def _check_urls(cls, urls: list[str]) -> list[str]:
        for url in urls:
            if not url.startswith(("http://", "https://")):
                raise ValueError(f"workers: {url!r} is not an http(s) URL")
        return [url.rstrip("/") for url in urls]


def routing_key(path: str, body: Any) -> list | str:
    """The text (or token ids) a request's prompt starts with, as the router's key."""
    if not isinstance(body, dict):
        return ""
    if path == "/generate":
        prompt = body.get("text", body.get("input_ids"))
    elif path == "/v1/completions":
        prompt = body.get("prompt")
    else:  # chat: the system prompt and the messages, in order, as they would be rendered
        parts = [body.get("system")] + [m.get("content") for m in body.get("messages") or [] if isinstance(m, dict)]
        prompt = "\n".join(_text_of(p) for p in parts if p is not None)
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch: route it by its first prompt
    return prompt if isinstance(prompt, (str, list)) else ""


def _text_of(content: Any) -> str:
    """A message's content: a string, or the text of its text parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return ""


class WorkerUnreachable(Exception):
    """No connection to the worker could be made: the request was never sent."""


def stream_error(path: str, message: str) -> bytes:
    """The server-sent events ending a stream with an error, as the worker's API ends its own
    (Anthropic's ``error`` event on /v1/messages; elsewhere an error payload, then ``[DONE]``).
    They start with a blank line, which ends any event the worker had only half sent."""
    if path == "/v1/messages":
        payload = {"type": "error", "error": {"type": "api_error", "message": message}}
        return f"\n\nevent: error\ndata: {json.dumps(payload)}\n\n".encode()
    return f"\n\ndata: {json.dumps(error_body(502, message))}\n\ndata: [DONE]\n\n".encode()


class RouterMetrics:
    def __init__(self, workers: list[str]):
        self.registry = CollectorRegistry()
        r = self.registry
        self.routed = Counter("sglang_router_requests", "requests routed to each worker", ["worker"], registry=r)
        self.failed = Counter("sglang_router_worker_errors", "requests that failed at a worker (unreachable, or "
                              "gone mid-response)",
                              ["worker"], registry=r)
        self.in_flight = Gauge("sglang_router_requests_in_flight", "requests in flight on each worker",
                               ["worker"], registry=r)
        self.up = Gauge("sglang_router_worker_up", "1 while the worker's /health answers 200", ["worker"], registry=r)
        for url in workers:
            self.up.labels(url).set(1)


class WorkerPool:
    """The workers, the router over them and one HTTP client for all of them."""

    def __init__(self, settings: StandaloneRouterSettings):
        self.urls = settings.workers
        self.settings = settings
        self.router = Router(len(self.urls), settings, PluginManager(settings.plugins))
        self.metrics = RouterMetrics(self.urls)
        self.client = httpx.AsyncClient(timeout=httpx.Timeout(settings.request_timeout_s, connect=10.0))
        self.owners: dict[str, int] = {}  # rid of a /generate in flight -> its worker

    def set_live(self, index: int, live: bool) -> None:
        """A worker stopped (or started again) answering."""
        if self.router.live[index] and not live:
            logger.error("worker %s is not answering; routing around it", self.urls[index])
            self.router.mark_dead(index)
        elif live and not self.router.live[index]:
            self.router.mark_live(index)
        self.metrics.up.labels(self.urls[index]).set(live)

    async def check_health(self) -> list[bool]:
        async def healthy(url: str) -> bool:
            try:
                return (await self.client.get(f"{url}/health", timeout=5)).status_code == 200
            except httpx.HTTPError:
                return False

        states = await asyncio.gather(*(healthy(url) for url in self.urls))
        for index, live in enumerate(states):
            self.set_live(index, live)
        return list(states)

    async def watch_health(self) -> None:
        while True:
            await asyncio.sleep(self.settings.health_check_interval_s)
            await self.check_health()

    async def forward(self, request: Request, index: int, body: bytes, release: Any = None) -> Response:
        """Send ``request`` to worker ``index`` and stream its answer back; ``release`` (an
        ExitStack) is closed when the response has been passed on or has failed. A worker that
        cannot be connected to (the request never left) raises ``WorkerUnreachable``, marked dead."""
        url = self.urls[index]
        headers = [(k, v) for k, v in request.headers.items() if k.lower() not in _DROPPED_HEADERS]
        upstream = self.client.build_request(request.method, f"{url}{request.url.path}", params=request.query_params,
                                             headers=headers, content=body)
        release = release or contextlib.ExitStack()
        try:
            reply = await self.client.send(upstream, stream=True)
        except httpx.HTTPError as exc:
            release.close()
            self.worker_failed(index, exc)
            if isinstance(exc, (httpx.ConnectError, httpx.ConnectTimeout)):
                raise WorkerUnreachable(url) from exc
            return error_response(502, f"worker {url} failed before answering: {exc}")
        self.metrics.routed.labels(url).inc()
        self.metrics.in_flight.labels(url).inc()
        streamed = reply.headers.get("content-type", "").startswith("text/event-stream")

        async def passed_on():
            try:
                async for data in reply.aiter_raw():
                    yield data
            except httpx.HTTPError as exc:  # the worker died (or stalled) after its 200 went out
                self.worker_failed(index, exc)
                if not streamed:
                    raise  # a cut JSON body: the client's connection is dropped, never a truncated 200
                yield stream_error(request.url.path, f"worker {url} failed mid-response: {exc}")
            finally:
                await reply.aclose()  # the client left early: the worker sees it and aborts
                self.metrics.in_flight.labels(url).dec()
                release.close()

        kept = {k: v for k, v in reply.headers.items() if k.lower() not in _DROPPED_HEADERS}
        kept["x-sglang-worker"] = url
        return StreamingResponse(passed_on(), status_code=reply.status_code, headers=kept)

    def worker_failed(self, index: int, exc: Exception) -> None:
        """A request to worker ``index`` failed: count it, and take the worker out of routing until
        its /health answers again."""
        logger.error("request to worker %s failed: %r", self.urls[index], exc)
        self.metrics.failed.labels(self.urls[index]).inc()
        self.set_live(index, False)

    async def routed_forward(self, request: Request, body: bytes, key: Any, rid: Any = None) -> Response:
        """Forward to the worker the router picks for ``key`` (``None``: the first live worker); a
        worker found unreachable is skipped for the next live one, at most once each."""
        for _ in self.urls:
            stack = contextlib.ExitStack()
            try:
                if key is None:
                    live = [i for i, up in enumerate(self.router.live) if up]
                    if not live:
                        raise NoReplica("no worker is running")
                    index = live[0]
                else:
                    index = stack.enter_context(self.router.routed(key))
            except NoReplica as exc:
                return error_response(503, str(exc))
            if isinstance(rid, str):
                self.owners[rid] = index
                stack.callback(self.owners.pop, rid, None)
            try:
                return await self.forward(request, index, body, stack)
            except WorkerUnreachable:
                continue
        return error_response(503, "no worker could be reached")

    async def each_worker(self, method: str, path: str, **kwargs: Any) -> list[httpx.Response | None]:
        """The same request to every worker (None where one could not be reached)."""
        async def one(url: str) -> httpx.Response | None:
            try:
                return await self.client.request(method, f"{url}{path}", **kwargs)
            except httpx.HTTPError:
                return None

        return list(await asyncio.gather(*(one(url) for url in self.urls)))


def build_router_app(settings: StandaloneRouterSettings) -> FastAPI:
    pool = WorkerPool(settings)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        await pool.check_health()
        watcher = asyncio.ensure_future(pool.watch_health())
        try:
            yield
        finally:
            watcher.cancel()
            await pool.client.aclose()

    app = FastAPI(title="sglang-core router", lifespan=lifespan)
    app.state.pool = pool

    async def generating(request: Request) -> Response:
        body = await request.body()
        try:
            parsed = json.loads(body)
        except ValueError:
            parsed = None  # the worker answers it with its own 400
        rid = parsed.get("rid") if isinstance(parsed, dict) else None
        return await pool.routed_forward(request, body, routing_key(request.url.path, parsed), rid)

    for path in GENERATING_ROUTES:
        app.add_api_route(path, generating, methods=["POST"])

    @app.get("/health")
    async def health() -> Response:
        states = await pool.check_health()
        if all(states):
            return Response(status_code=200)
        down = [url for url, up in zip(pool.urls, states) if not up]
        return error_response(503, f"workers not answering: {', '.join(down)}")

    @app.get("/get_server_info")
    async def get_server_info(request: Request) -> dict:
        replies = await pool.each_worker("GET", "/get_server_info", headers=_auth(request))
        workers = [{"url": url, "alive": r is not None and r.status_code == 200,
                    "info": r.json() if r is not None and r.status_code == 200 else None}
                   for url, r in zip(pool.urls, replies)]
        return {**settings.public_dict(), "workers": workers}

    @app.api_route("/flush_cache", methods=["GET", "POST"])
    async def flush_cache(request: Request) -> Response:
        replies = await pool.each_worker("POST", "/flush_cache", headers=_auth(request))
        for index, reply in enumerate(replies):
            if reply is not None and reply.status_code == 200:
                pool.router.forget_cache(index)
        if all(r is not None and r.status_code == 200 for r in replies):
            return Response("Cache flushed.\n", media_type="text/plain")
        failed = [url for url, r in zip(pool.urls, replies) if r is None or r.status_code != 200]
        return error_response(400, f"cache not flushed on: {', '.join(failed)}")

    @app.post("/abort_request")
    async def abort_request(request: Request) -> Response:
        body = await request.body()
        rid = _json_field(body, "rid")
        targets = [pool.owners[rid]] if rid in pool.owners else range(len(pool.urls))
        for index in targets:  # a rid the router did not see may be anywhere: ask every worker
            with contextlib.suppress(httpx.HTTPError):
                await pool.client.post(f"{pool.urls[index]}/abort_request", content=body,
                                       headers={**_auth(request), "content-type": "application/json"})
        return Response(status_code=200)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(pool.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.api_route("/{path:path}", methods=["GET", "POST"])
    async def elsewhere(request: Request) -> Response:
        return await pool.routed_forward(request, await request.body(), None)

    return app


def _auth(request: Request) -> dict[str, str]:
    """The client's credentials, passed on to the workers (they check them)."""
    return {k: v for k, v in request.headers.items() if k.lower() in ("authorization", "x-api-key")}


def _json_field(body: bytes, name: str) -> Any:
    with contextlib.suppress(ValueError, AttributeError):
        return json.loads(body).get(name)
    return None


def run_router(settings: StandaloneRouterSettings) -> int:
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = build_router_app(settings)
    server = uvicorn.Server(uvicorn.Config(app, host=settings.host, port=settings.port,
                                           log_level=settings.log_level, lifespan="on"))
    server.run()
    return 0 if server.started else 1

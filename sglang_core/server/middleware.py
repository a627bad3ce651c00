"""Pure ASGI middleware (no BaseHTTPMiddleware, so client disconnects reach the handlers):
API-key auth, a request body size limit, per-request metrics and logging, and a 500 in the error
envelope for any exception no handler took, the connection kept open for the client's next request."""

from __future__ import annotations

import hmac
import json
import logging
import time
from typing import Any, Awaitable, Callable

from sglang_core.server.metrics import ServerMetrics

logger = logging.getLogger("sglang_core.server")

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict]]
Send = Callable[[dict], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

OPEN_PATHS = {"/health"}


class ServerMiddleware:
    def __init__(self, app: ASGIApp, api_key: str | None, max_body: int, metrics: ServerMetrics, log: bool,
                 error_body: Callable[[str, int, str], dict]):
        self.app = app
        self.error_body = error_body  # (path, status, message) -> the body, in the envelope of the path's API
        self.api_key = api_key
        self.max_body = max_body
        self.metrics = metrics
        self.log = log

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.monotonic()
        status: dict[str, int | None] = {"code": None}

        async def tracked_send(message: dict) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            if self.api_key is not None and scope["path"].rstrip("/") not in OPEN_PATHS and not self._authorized(scope):
                return await self._send_error(scope, tracked_send, 401, "invalid or missing API key")
            receive = await self._limited_body(scope, receive, tracked_send)
            if receive is not None:
                await self.app(scope, receive, tracked_send)
        except Exception as exc:
            logger.exception("request failed: %s %s", scope["method"], scope["path"])
            if status["code"] is not None:
                raise  # the response has begun: only closing the connection can end it now
            # Answered here and not re-raised, so uvicorn keeps the connection open.
            await self._send_error(scope, tracked_send, 500, f"internal error: {type(exc).__name__}: {exc}")
        finally:
            code = status["code"] or 500  # nothing sent: the request was cancelled
            route = scope.get("route")
            path = getattr(route, "path", "unmatched")
            self.metrics.requests.labels(path, str(code)).inc()
            if self.log:
                logger.info("%s %s %d %.1f ms", scope["method"], scope["path"], code, 1000 * (time.monotonic() - start))

    async def _send_error(self, scope: Scope, send: Send, status: int, message: str) -> None:
        body = json.dumps(self.error_body(scope["path"], status, message)).encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})

    def _authorized(self, scope: Scope) -> bool:
        headers = dict(scope["headers"])
        given = headers.get(b"authorization", b"").decode("latin-1")
        token = given[7:] if given.lower().startswith("bearer ") else headers.get(b"x-api-key", b"").decode("latin-1")
        return hmac.compare_digest(token.encode(), self.api_key.encode())

    async def _limited_body(self, scope: Scope, receive: Receive, send: Send) -> Receive | None:
        """Read the whole body (bounded) up front, then replay it; later receives (the disconnect)
        go to the server as usual. Returns None when a 413 was sent."""
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body:
            await self._send_error(scope, send, 413, f"request body exceeds {self.max_body} bytes")
            return None
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return receive  # the client left; let the app see it
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_body:
                await self._send_error(scope, send, 413, f"request body exceeds {self.max_body} bytes")
                return None
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> dict:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        return replay

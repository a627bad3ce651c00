"""``sglang-core serve``: run the HTTP server until SIGTERM/SIGINT, then drain and exit 0."""

from __future__ import annotations

import logging

import uvicorn

from sglang_core.server.app import build_app
from sglang_core.server.settings import ServerSettings


def serve(settings: ServerSettings) -> int:
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = build_app(settings)
    # uvicorn handles SIGTERM/SIGINT: stop accepting, wait for in-flight requests up to the drain
    # timeout, then run the lifespan shutdown, which stops the engine process.
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level=settings.log_level,
                            timeout_graceful_shutdown=settings.drain_timeout_s, lifespan="on")
    server = uvicorn.Server(config)
    server.run()
    return 0 if server.started else 1

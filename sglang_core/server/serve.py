"""``sglang-core serve``: run the HTTP server until SIGTERM/SIGINT, then drain and exit 0."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import uvicorn

from sglang_core.server.app import build_app
from sglang_core.server.settings import ServerSettings


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        # uvicorn re-raises SIGTERM/SIGINT once it has shut down, so the exit status would be
        # -15; a drained shutdown is a clean exit (status 0) for process managers.
        with super().capture_signals():
            try:
                yield
            finally:
                self._captured_signals.clear()


def serve(settings: ServerSettings) -> int:
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = build_app(settings)
    # uvicorn handles SIGTERM/SIGINT: stop accepting, wait for in-flight requests up to the drain
    # timeout, then run the lifespan shutdown, which stops the engine process.
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level=settings.log_level,
                            timeout_graceful_shutdown=settings.drain_timeout_s,
                            timeout_keep_alive=settings.timeout_keep_alive_s, lifespan="on")
    server = _Server(config)
    server.run()
    return 0 if server.started else 1

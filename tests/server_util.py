"""Start a real ``sglang-core serve`` process on a free local port for HTTP tests."""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Iterator

import httpx


@dataclass
class Server:
    url: str
    process: subprocess.Popen
    log_path: str

    def log(self) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()

    def engine_pid(self) -> int | None:
        """The engine process (the server's child), if running."""
        out = subprocess.run(["pgrep", "-P", str(self.process.pid)], capture_output=True, text=True).stdout.split()
        return int(out[0]) if out else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _end_with_parent() -> None:
    """In the server process before it runs (Linux): SIGTERM it when the test process dies, so a
    killed test run (a CI time limit, the memory killer) leaves no server holding its memory."""
    if sys.platform == "linux":
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1: PR_SET_PDEATHSIG


@contextlib.contextmanager
def running_server(*args: str, timeout_s: float = 180, env: dict | None = None, command: str = "serve") -> Iterator[Server]:
    """``sglang-core <command> --port P args...`` (``serve``, or ``router``), once its /health is 200."""
    port = free_port()
    log = tempfile.NamedTemporaryFile("w", prefix="sglang-core-server-", suffix=".log", delete=False)
    process = subprocess.Popen(
        [sys.executable, "-m", "sglang_core.cli", command, "--port", str(port), *args],
        stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}, preexec_fn=_end_with_parent,
    )
    server = Server(f"http://127.0.0.1:{port}", process, log.name)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"server exited with {process.returncode}:\n{server.log()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{server.url}/health", timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"server did not become healthy:\n{server.log()}")
            time.sleep(0.3)
        yield server
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        log.close()


@contextlib.contextmanager
def app_in_thread(app, **config) -> Iterator[str]:
    """``app`` served by uvicorn in a thread of this process on a free port; yields its URL.
    ``config``: more ``uvicorn.Config`` settings (``lifespan="off"`` for an app without an engine)."""
    import threading

    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, port=free_port(), log_level="critical", **config))
    thread = threading.Thread(target=server.run)
    thread.start()
    try:
        while not server.started:
            assert thread.is_alive(), "uvicorn did not start"
            time.sleep(0.05)
        yield f"http://127.0.0.1:{server.config.port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)

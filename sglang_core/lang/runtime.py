"""``sgl.Runtime``: a ``sglang-core serve`` subprocess on a free local port, for programs."""

from __future__ import annotations

import atexit
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import weakref
from typing import Any

import httpx

from sglang_core.lang.backend import LangBackend

_live: weakref.WeakSet[Runtime] = weakref.WeakSet()


@atexit.register
def _shutdown_all() -> None:
    for runtime in list(_live):
        runtime.shutdown()


def _server_args(flags: dict[str, Any]) -> tuple[list[str], dict[str, str]]:
    """Server settings as flags, and the env vars for those a flag cannot say:
    ``{"chunked_prefill_size": 512, "enable_request_log": True, "engine_in_subprocess": False}`` ->
    ``["--chunked-prefill-size", "512", "--enable-request-log"]``, ``{"SGLANG_CORE_ENGINE_IN_SUBPROCESS":
    "false"}`` (a boolean flag only switches on). None is left out."""
    args, env = [], {}
    for name, value in flags.items():
        flag = "--" + name.replace("_", "-")
        if value is None:
            continue
        if value is True:
            args.append(flag)
        elif value is False:
            env["SGLANG_CORE_" + name.upper()] = "false"
        elif isinstance(value, (list, tuple)):
            args += [flag, ",".join(str(v) for v in value)]
        else:
            args += [flag, str(value)]
    return args, env


class Runtime:
    """Start ``sglang-core serve`` (``model_path`` and any server flag as keywords) and wait until
    it is healthy. ``.url``, ``.endpoint`` (a ``RuntimeEndpoint``), ``.shutdown()``; a context
    manager; stopped at interpreter exit at the latest."""

    def __init__(self, model_path: str | None = None, *, timeout_s: float = 300.0, **flags: Any):
        if "port" in flags or "host" in flags:
            raise ValueError("port: Runtime picks a free local port itself")
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        self.api_key: str | None = flags.get("api_key")
        args = [sys.executable, "-m", "sglang_core.cli", "serve", "--host", "127.0.0.1", "--port", str(port)]
        flag_args, flag_env = _server_args({"model_path": model_path, **flags})
        args += flag_args
        self._endpoint: LangBackend | None = None
        self._log = tempfile.NamedTemporaryFile("w+", prefix="sglang-core-runtime-", suffix=".log", delete=False)
        # Passive OpenMP waits unless told otherwise: spinning idle threads would starve the
        # program's own process on a small machine.
        env = {"OMP_WAIT_POLICY": "PASSIVE", **os.environ, **flag_env}
        self.process = subprocess.Popen(args, stdout=self._log, stderr=subprocess.STDOUT, env=env)
        _live.add(self)
        try:
            self._wait_healthy(timeout_s)
        except BaseException:
            self.shutdown()
            raise

    def _wait_healthy(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited with code {self.process.returncode}:\n{self.log()[-4000:]}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"the server was not healthy after {timeout_s:g} s:\n{self.log()[-4000:]}")
            time.sleep(0.25)

    @property
    def endpoint(self) -> LangBackend:
        """A ``RuntimeEndpoint`` for this server (built once)."""
        if self._endpoint is None:
            from sglang_core.lang.backends import RuntimeEndpoint

            self._endpoint = RuntimeEndpoint(self.url, api_key=self.api_key)
        return self._endpoint

    def log(self) -> str:
        """The server's output so far."""
        with open(self._log.name, errors="replace") as f:
            return f.read()

    @property
    def alive(self) -> bool:
        return self.process.poll() is None

    def shutdown(self, timeout_s: float = 30.0) -> None:
        """Stop the server (SIGTERM, then SIGKILL after ``timeout_s``); safe to call twice."""
        if self._endpoint is not None:
            self._endpoint.shutdown()
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()
        _live.discard(self)

    def __enter__(self) -> Runtime:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.shutdown()

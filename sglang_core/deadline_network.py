"""An httpcore network backend whose every wait (connect, TLS handshake, each read and write) ends by
one deadline, so that a whole HTTP exchange does: httpcore's own timeouts bound each wait alone, and a
peer that sends a byte now and then, in the headers or the body, would restart them for ever."""

from __future__ import annotations

import ssl
import time
import typing

import httpcore


class DeadlineBackend(httpcore.NetworkBackend):
    """``backend`` (default: httpcore's sockets) with each wait cut to what is left until
    ``deadline`` (``time.monotonic()``); past it, ``httpcore.TimeoutException``."""

    def __init__(self, deadline: float, backend: httpcore.NetworkBackend | None = None):
        self.deadline = deadline
        self._backend = backend or httpcore.SyncBackend()

    def left(self, timeout: float | None) -> float:
        """How long the next wait may take: until the deadline, or ``timeout`` if sooner."""
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise httpcore.TimeoutException("the deadline has passed")
        return left if timeout is None else min(timeout, left)

    def connect_tcp(self, host: str, port: int, timeout: float | None = None, local_address: str | None = None,
                    socket_options: typing.Iterable | None = None) -> httpcore.NetworkStream:
        stream = self._backend.connect_tcp(host, port, self.left(timeout), local_address, socket_options)
        return DeadlineStream(stream, self)


class DeadlineStream(httpcore.NetworkStream):
    """A connection of a ``DeadlineBackend``: each read and write, and the TLS handshake, within its deadline."""

    def __init__(self, stream: httpcore.NetworkStream, backend: DeadlineBackend):
        self._stream = stream
        self._backend = backend

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return self._stream.read(max_bytes, self._backend.left(timeout))

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self._stream.write(buffer, self._backend.left(timeout))

    def close(self) -> None:
        self._stream.close()

    def start_tls(self, ssl_context: ssl.SSLContext, server_hostname: str | None = None,
                  timeout: float | None = None) -> httpcore.NetworkStream:
        tls = self._stream.start_tls(ssl_context, server_hostname, self._backend.left(timeout))
        return DeadlineStream(tls, self._backend)

    def get_extra_info(self, info: str) -> typing.Any:
        return self._stream.get_extra_info(info)

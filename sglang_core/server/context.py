"""What a serving-frontend plugin gets: the engine, the settings, and helpers that every HTTP API
needs (bounded admission, abort on client disconnect, metrics, OpenAI-style errors)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any, AsyncIterator, Awaitable, Iterator, TypeVar

from starlette.requests import Request

from sglang_core.engine import Engine
from sglang_core.server.errors import ErrorShape, error_body, error_response
from sglang_core.server.metrics import ServerMetrics
from sglang_core.server.settings import ServerSettings

T = TypeVar("T")


class Overloaded(Exception):
    """Too many requests in flight: answered with 503."""


class ClientGone(Exception):
    """The client disconnected before the response was ready."""


class ServerContext:
    def __init__(self, settings: ServerSettings, metrics: ServerMetrics):
        self.settings = settings
        self.metrics = metrics
        self.engine: Engine | None = None  # set once the engine has started
        self.in_flight = 0  # requests
        self.sequences_in_flight = 0  # their output sequences (prompts x n): what admission limits
        self.peak_in_flight = 0  # the most requests in flight at once since the last reset_peak()
        # Path prefix -> the error envelope its clients expect; OpenAI's everywhere else.
        self.error_shapes: dict[str, ErrorShape] = {}

    @property
    def model_name(self) -> str:
        return self.settings.served_model_name or (self.engine.model_path if self.engine else "unknown")

    error = staticmethod(error_response)

    def error_body_for(self, path: str, status: int, message: str, param: str | None = None) -> dict:
        """An error body in the envelope of the API that owns ``path`` (see ``error_shapes``), so
        errors raised before a route runs (auth, body size, validation) reach clients in the
        shape they parse."""
        for prefix, shape in self.error_shapes.items():
            if path.rstrip("/") == prefix or path.startswith(prefix + "/"):
                return shape(status, message, param)
        return error_body(status, message, param)

    @property
    def sequence_limit(self) -> int:
        """The most output sequences one request may ask for: ``max_sequences_per_request``, and
        never more than may be in flight at once (such a request could never be admitted)."""
        return min(self.settings.max_sequences_per_request, self.settings.max_queued_requests)

    def check_sequences(self, sequences: int, field: str) -> None:
        """Refuse a request of more output sequences than ``sequence_limit`` with a ValueError
        (400) naming ``field``, the request field to make smaller."""
        if sequences > self.sequence_limit:
            settings = self.settings
            flag = ("--max-sequences-per-request" if settings.max_sequences_per_request <= settings.max_queued_requests
                    else "--max-queued-requests")
            raise ValueError(f"{field}: the request asks for {sequences} output sequences (prompts x n); this "
                             f"server takes at most {self.sequence_limit} per request ({flag})")

    @contextlib.contextmanager
    def admission(self, sequences: int = 1, field: str = "prompt") -> Iterator[None]:
        """Count a request of ``sequences`` output sequences (prompts x n) in flight. Too many for
        one request: ValueError naming ``field`` (400); more than ``max_queued_requests``
        sequences in flight with it: Overloaded (503)."""
        self.check_sequences(sequences, field)
        if self.sequences_in_flight + sequences > self.settings.max_queued_requests:
            raise Overloaded(f"the server has {self.sequences_in_flight} sequences in flight (at most "
                             f"{self.settings.max_queued_requests}); try again later")
        self.in_flight += 1
        self.sequences_in_flight += sequences
        self.peak_in_flight = max(self.peak_in_flight, self.in_flight)
        try:
            yield
        finally:
            self.in_flight -= 1
            self.sequences_in_flight -= sequences

    async def admitted(self, events: AsyncIterator[str], sequences: int = 1,
                       field: str = "prompt") -> AsyncIterator[str]:
        """A streamed response's ``events`` under ``admission``, held until they end or are closed.
        The first item is ``""``, once admission is taken: the route awaits it, so a refusal is
        answered (400 or 503) before the stream's 200."""
        with self.admission(sequences, field):
            yield ""
            async with contextlib.aclosing(events):
                async for event in events:
                    yield event

    def reset_peak(self) -> int:
        """Start a new peak measurement from the requests in flight now; return the old peak."""
        peak, self.peak_in_flight = self.peak_in_flight, self.in_flight
        return peak

    async def stream(self, **generate_kwargs: Any) -> AsyncIterator[dict]:
        """``engine.async_generate(stream=True)`` for one request, recording latency metrics.
        Closing the iterator early (client gone) aborts the request and frees its memory."""
        start = last = time.monotonic()
        first = True
        chunk: dict | None = None
        stream = await self.engine.async_generate(stream=True, **generate_kwargs)
        try:
            async for chunk in stream:
                now = time.monotonic()
                (self.metrics.ttft if first else self.metrics.itl).observe(now - (start if first else last))
                first, last = False, now
                yield chunk
        finally:
            await stream.aclose()
            if chunk is not None and chunk["meta_info"]["finish_reason"] is not None:
                meta = chunk["meta_info"]
                self.metrics.e2e.observe(time.monotonic() - start)
                self.metrics.prompt_tokens.inc(meta["prompt_tokens"])
                self.metrics.cached_tokens.inc(meta["cached_tokens"])
                self.metrics.generation_tokens.inc(meta["completion_tokens"])

    async def complete(self, **generate_kwargs: Any) -> dict:
        """One request, non-streaming: the final result with the whole text."""
        text, chunk = [], None
        # aclosing: a cancelled caller closes the stream at once, which aborts the request.
        async with contextlib.aclosing(self.stream(**generate_kwargs)) as chunks:
            async for chunk in chunks:
                text.append(chunk["text"])
        return {**chunk, "text": "".join(text)}

    async def until_disconnect(self, request: Request, work: Awaitable[T]) -> T:
        """Run ``work``; if the client disconnects first, cancel it (which aborts its requests)."""
        task = asyncio.ensure_future(work)
        watcher = asyncio.ensure_future(_wait_for_disconnect(request))
        try:
            done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
            if task in done:
                return task.result()
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
            raise ClientGone()
        finally:
            watcher.cancel()


async def _wait_for_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return

"""``/generate`` with ``"stream": true``: server-sent events ``data: {json}\\n\\n``, then
``data: [DONE]\\n\\n``. Every job of the request runs at once; each event carries one job's whole
text so far (SGLang 0.2.10 semantics), its ``meta_info`` and its ``index``."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
from typing import Any, AsyncIterator

from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from sglang_core.server.context import ServerContext
from sglang_core.server.errors import error_body

from sglang_plugins.frontends.native.protocol import Job, response_item

Event = tuple[int, Any]  # (job index, a chunk dict or the exception that ended the job)


def sse(payload: Any) -> str:
    return f"data: {json.dumps(payload)}\n\n"


class GenerateStream:
    """Holds one streaming request's admission slot and a task per job feeding a shared queue.

    ``start`` waits for every job's first output, so that a prompt the engine rejects is still
    answered with a 400; ``close`` cancels what is left, which aborts those requests."""

    def __init__(self, ctx: ServerContext, jobs: list[Job]):
        self.jobs = jobs
        self.resources = contextlib.ExitStack()
        self.resources.enter_context(ctx.admission(len(jobs)))
        self.queue: asyncio.Queue[Event] = asyncio.Queue()
        self.early: collections.deque[Event] = collections.deque()
        self.tasks = [asyncio.ensure_future(self._pump(ctx, i, job)) for i, job in enumerate(jobs)]

    async def _pump(self, ctx: ServerContext, index: int, job: Job) -> None:
        stream = ctx.stream(**job.kwargs)
        try:
            async for chunk in stream:
                self.queue.put_nowait((index, chunk))
        except Exception as exc:
            self.queue.put_nowait((index, exc))
        finally:
            await stream.aclose()

    async def start(self) -> None:
        """Wait until every job has produced an output; raise the first job's error, if any."""
        seen: set[int] = set()
        while len(seen) < len(self.jobs):
            index, event = await self.queue.get()
            if isinstance(event, Exception):
                raise event
            seen.add(index)
            self.early.append((index, event))

    async def close(self) -> None:
        for task in self.tasks:
            task.cancel()
        self.resources.close()
        await asyncio.gather(*self.tasks, return_exceptions=True)

    async def events(self) -> AsyncIterator[str]:
        texts = [""] * len(self.jobs)
        active = set(range(len(self.jobs)))
        try:
            while active:
                index, event = self.early.popleft() if self.early else await self.queue.get()
                if isinstance(event, Exception):
                    yield sse(error_body(500, f"generation failed: {event}"))
                    break
                texts[index] += event["text"]
                if event["meta_info"]["finish_reason"] is not None:
                    active.discard(index)
                item = response_item({**event, "text": texts[index]})
                yield sse({**item, "index": index})
            yield "data: [DONE]\n\n"
        finally:
            await self.close()


class GenerateStreamResponse(StreamingResponse):
    """Closes the stream however the response ends, even if its body never started."""

    def __init__(self, stream: GenerateStream):
        super().__init__(stream.events(), media_type="text/event-stream")
        self.stream = stream

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.stream.close()

"""What chat and completions share: OpenAI fields -> engine requests, running a response's
choices concurrently, and accumulating each choice's text, logprobs and usage."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

from sglang_core.server.context import ServerContext
from sglang_core.server.generation import finish_reason, validated_params
from sglang_core.server.tool_parser import ToolCall

from sglang_plugins.frontends.openai.protocol import SamplingRequest
from sglang_plugins.frontends.tool_calling import MessageParser, MessagePiece

# SGLang names in the engine's error messages -> the OpenAI fields the client sent.
_OPENAI_NAMES = {"max_new_tokens": "max_tokens", **SamplingRequest.API_NAMES}


def sampling_params(req: SamplingRequest, max_new_tokens: int, vocab_size: int) -> dict[str, Any]:
    """OpenAI fields -> SGLang sampling params, validated by the engine's own rules now, so a bad
    value is a 400 before any response (streamed or not) has begun."""
    params = {
        "max_new_tokens": max_new_tokens, "temperature": req.temperature, "top_p": req.top_p, "top_k": req.top_k,
        "stop": req.stop, "presence_penalty": req.presence_penalty, "frequency_penalty": req.frequency_penalty,
        "seed": req.seed, "logit_bias": req.logit_bias, **req.sglang_params(),
    }
    return validated_params(params, vocab_size, _OPENAI_NAMES)


@dataclass
class TokenLogprob:
    token: str
    logprob: float | None  # None for the first prompt token, which nothing predicts
    top: list[tuple[str, float]] | None
    offset: int  # where the token starts in the choice's text


@dataclass
class Delta:
    """What one engine chunk added to a choice (``piece`` and ``calls`` when its message is parsed)."""

    text: str
    logprobs: list[TokenLogprob]
    finish_reason: str | None
    piece: MessagePiece | None = None


@dataclass
class Choice:
    """One choice of a response: fed the engine's chunks in order, it keeps the text so far,
    the token logprobs (when asked for) and the usage counts."""

    index: int
    logprobs: bool = False  # collect logprobs of the generated tokens
    echo: str = ""  # the prompt text, put before the generated text
    echo_logprobs: bool = False  # collect the prompt's logprobs too (the engine returns them)
    text: str = ""
    token_logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    # A chat message with tools or reasoning: the parser that splits its text, and what it found.
    message: MessageParser | None = None
    reasoning: str = ""
    content: str = ""
    tool_calls: list[tuple[str, ToolCall]] = field(default_factory=list)  # (call id, call)
    call_ids: list[str] = field(default_factory=list)  # of the calls begun, by index
    _started: bool = field(default=False, init=False, repr=False)
    _tokens_seen: int = field(default=0, init=False, repr=False)  # generated tokens given logprob entries
    _offset: int = field(default=0, init=False, repr=False)  # text length covered by logprob entries

    def update(self, chunk: dict) -> Delta:
        meta = chunk["meta_info"]
        reason = finish_reason(chunk)
        text, entries = chunk["text"], []
        if not self._started:
            self._started = True
            text = self.echo + text
            if self.echo_logprobs:
                entries += self._entries(meta["input_token_logprobs"], meta["input_top_logprobs"])
        if self.logprobs:
            # A matched stop token is not part of the text, so it gets no logprob entry either.
            stop_token = reason is not None and isinstance(reason.get("matched"), int)
            end = len(chunk["output_ids"]) - int(stop_token)
            start, self._tokens_seen = self._tokens_seen, end
            entries += self._entries(meta["output_token_logprobs"][start:end], meta["output_top_logprobs"][start:end])
        self.text += text
        self.token_logprobs += entries
        self.prompt_tokens, self.completion_tokens = meta["prompt_tokens"], meta["completion_tokens"]
        self.cached_tokens = meta["cached_tokens"]
        piece = None
        if self.message is not None:
            piece = self.message.feed(text)
            if reason is not None:
                piece += self.message.finish()
            self.call_ids += [f"call_{uuid.uuid4().hex[:24]}" for d in piece.deltas if d.name is not None]
            self.reasoning += piece.reasoning
            self.content += piece.content
            self.tool_calls += [(self.call_ids[len(self.tool_calls) + i], call) for i, call in enumerate(piece.calls)]
        if reason is not None:
            self.finish_reason = ("length" if reason["type"] == "length" else
                                  "tool_calls" if self.tool_calls else "stop")
        return Delta(text, entries, self.finish_reason if reason is not None else None, piece)

    def _entries(self, triples: list, tops: list) -> list[TokenLogprob]:
        entries = []
        for (logprob, _, token), top in zip(triples, tops):
            alternatives = None if logprob is None else [(t, lp) for lp, _, t in top or ()]
            entries.append(TokenLogprob(token, logprob, alternatives, self._offset))
            self._offset += len(token)
        return entries


def usage(choices: list[Choice], n: int) -> dict[str, Any]:
    """OpenAI usage; each prompt's tokens count once however many choices (n) it has."""
    firsts = choices[::n]
    prompt = sum(c.prompt_tokens for c in firsts)
    completion = sum(c.completion_tokens for c in choices)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": sum(c.cached_tokens for c in firsts)}}


async def merged(ctx: ServerContext, jobs: list[dict[str, Any]]) -> AsyncIterator[tuple[int, dict]]:
    """Run one engine request per job concurrently; yield ``(job index, chunk)`` as chunks come.

    Closing this iterator early (error, client gone) ends every engine request still running.
    """
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(index: int, kwargs: dict[str, Any]) -> None:
        try:
            async with contextlib.aclosing(ctx.stream(**kwargs)) as chunks:
                async for chunk in chunks:
                    queue.put_nowait((index, chunk))
            queue.put_nowait((index, None))
        except Exception as exc:  # handed to the consumer, which raises it
            queue.put_nowait((index, exc))

    tasks = [asyncio.create_task(pump(i, kwargs)) for i, kwargs in enumerate(jobs)]
    try:
        running = len(tasks)
        while running:
            index, item = await queue.get()
            if isinstance(item, Exception):
                raise item
            if item is None:
                running -= 1
            else:
                yield index, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

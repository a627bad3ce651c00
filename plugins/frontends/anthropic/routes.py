"""Anthropic's Messages API: ``POST /v1/messages`` (whole or streamed as Anthropic's server-sent
events) and ``POST /v1/messages/count_tokens``, with errors in Anthropic's envelope.

A request is one engine request: the conversation goes through the same chat template as
OpenAI's chat completions (``sglang_core.server.generation``), a final assistant turn is a
prefill the model continues, and the engine's finish reason becomes Anthropic's ``stop_reason``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import uuid
from typing import Any, AsyncIterator

from fastapi import FastAPI
from fastapi.responses import StreamingResponse
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from sglang_core.server.bodies import parse_body
from sglang_core.server.chat_templates import resolve_chat_template
from sglang_core.server.context import ServerContext
from sglang_core.server.generation import (
    RequestAborted, check_prompt, finish_reason, validated_params,
)
from sglang_core.server.openapi import ApiDocs

from sglang_core.server.tool_parser import CallDelta, ToolCall

from sglang_plugins.frontends.anthropic.protocol import Conversation, MessagesRequest
from sglang_plugins.frontends.anthropic.responses import (
    EXAMPLES, AnthropicError, CountTokensResponse, MessageResponse, MessageStreamEvent,
)
from sglang_plugins.frontends.media_messages import media_chat_prompt_ids
from sglang_plugins.frontends.tool_calling import MessageParser, MessagePiece, ToolCalling

logger = logging.getLogger("sglang_core.server.anthropic")

PATH = "/v1/messages"

# HTTP status -> Anthropic's error type (https://docs.anthropic.com/en/api/errors).
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error", 500: "api_error",
               503: "overloaded_error", 529: "overloaded_error"}


def error_body(status: int, message: str, param: str | None = None) -> dict[str, Any]:
    """Anthropic's error envelope; ``param`` has no place in it (the message names the field)."""
    kind = ERROR_TYPES.get(status, "invalid_request_error" if status < 500 else "api_error")
    return {"type": "error", "error": {"type": kind, "message": message}}


def mount(app: FastAPI, ctx: ServerContext) -> None:
    template = resolve_chat_template(ctx.settings.chat_template)  # a bad name fails at startup
    tool_calling = ToolCalling(ctx, template)  # so do unknown parser names
    ctx.error_shapes[PATH] = error_body
    docs = ApiDocs.for_app(app)

    @app.post(PATH, **docs.route(errors=AnthropicError, body=MessagesRequest, response=MessageResponse,
                                 stream=MessageStreamEvent, example=EXAMPLES["messages"], summary="Create a message"))
    async def create_message(request: Request) -> Response:
        req = parse_body(MessagesRequest, await request.body())
        if req.thinking_enabled and tool_calling.reasoning is None:
            raise ValueError("thinking: this server does not separate reasoning (start it with --reasoning-parser)")
        use = req.tool_use()
        ids, images = prompt_ids(ctx, req, template)
        max_new = check_prompt(ids, ctx.engine.info, "messages", req.max_tokens, "max_tokens")
        params = validated_params(req.sampling_params(max_new), ctx.engine.info.vocab_size,
                                  {"max_new_tokens": "max_tokens", **req.API_NAMES})
        new_parser = tool_calling.prepare(use, ids, params)
        head = {"id": f"msg_{uuid.uuid4().hex}", "type": "message", "role": "assistant", "model": ctx.model_name}
        job = {"input_ids": ids, "sampling_params": params, "rid": head["id"], "image_data": images or None}
        if req.stream:
            blocks = Blocks(new_parser() if new_parser else None)
            events = ctx.admitted(event_stream(ctx, head, job, blocks))  # one sequence: Anthropic has no n
            await anext(events)  # takes admission: a 503 goes out now, before the stream's 200
            return StreamingResponse(events, media_type="text/event-stream")
        with ctx.admission():
            result = await ctx.until_disconnect(request, ctx.complete(**job))
        try:
            stop = stop_fields(finish_reason(result))
        except RequestAborted as exc:
            return JSONResponse(error_body(500, f"the request was aborted: {exc}"), status_code=500)
        content = [{"type": "text", "text": result["text"]}]
        if new_parser is not None:
            parser = new_parser()
            content = message_blocks(parser.feed(result["text"]) + parser.finish())
            stop = with_tool_use(stop, any(block["type"] == "tool_use" for block in content))
        return JSONResponse({**head, "content": content, **stop,
                             "usage": usage(result["meta_info"]["prompt_tokens"], result["meta_info"]["completion_tokens"])})

    @app.post(PATH + "/count_tokens", **docs.route(errors=AnthropicError, body=Conversation, response=CountTokensResponse,
                                                   example=EXAMPLES["count_tokens"], summary="Count a conversation's tokens"))
    async def count_tokens(request: Request) -> Response:
        req = parse_body(Conversation, await request.body())
        ids, images = prompt_ids(ctx, req, template)
        if images:
            raise ValueError("messages: counting the tokens of images is not supported")
        return JSONResponse({"input_tokens": len(ids)})


def prompt_ids(ctx: ServerContext, req: Conversation, template: str | None) -> tuple[list[int], list[str]]:
    """The conversation and its tools through the chat template, then the assistant prefill, as
    token ids (each image as one image token), and the images."""
    messages, prefill, images = req.chat(ctx.engine.image_token)
    use = req.tool_use()
    tools = [f.for_template() for f in use.functions] if use is not None else None
    ids = media_chat_prompt_ids(ctx.engine.tokenizer, messages, template, [ctx.engine.image_token], prefill=prefill,
                                tools=tools, chat_template_kwargs=req.template_variables())
    return ids, images


def message_blocks(piece: MessagePiece) -> list[dict[str, Any]]:
    """A whole parsed message as Anthropic's content blocks: thinking, text, then each call."""
    blocks: list[dict[str, Any]] = []
    if piece.reasoning:
        blocks.append({"type": "thinking", "thinking": piece.reasoning, "signature": ""})
    if piece.content or not (piece.reasoning or piece.calls):
        blocks.append({"type": "text", "text": piece.content})
    blocks += [tool_use_block(call) for call in piece.calls]
    return blocks


def tool_use_block(call: ToolCall) -> dict[str, Any]:
    """A call as a ``tool_use`` block (a call cut short by max_tokens: the input is {}, as it is
    streamed before its ``input_json_delta``s)."""
    try:
        arguments = json.loads(call.arguments)
    except ValueError:
        arguments = {}
    return {"type": "tool_use", "id": f"toolu_{uuid.uuid4().hex[:24]}", "name": call.name, "input": arguments}


def stop_fields(reason: dict) -> dict[str, Any]:
    """The engine's finish reason as Anthropic's ``stop_reason`` and ``stop_sequence``: a matched
    stop string is a ``stop_sequence``, EOS (or a finished constraint) ``end_turn``."""
    if reason["type"] == "length":
        return {"stop_reason": "max_tokens", "stop_sequence": None}
    matched = reason.get("matched")
    if isinstance(matched, str):
        return {"stop_reason": "stop_sequence", "stop_sequence": matched}
    return {"stop_reason": "end_turn", "stop_sequence": None}


def with_tool_use(stop: dict[str, Any], called: bool) -> dict[str, Any]:
    """A message that ends in calls stops for ``tool_use``, unless it ran out of tokens."""
    return {"stop_reason": "tool_use", "stop_sequence": None} if called and stop["stop_reason"] == "end_turn" else stop


def usage(input_tokens: int, output_tokens: int) -> dict[str, int]:
    # input_tokens is the whole prompt: our automatic prefix cache is not Anthropic's opt-in
    # prompt caching, whose cache_* counts would be subtracted from it.
    return {"input_tokens": input_tokens, "output_tokens": output_tokens}


class Blocks:
    """The content blocks of a streamed message, as events: each piece of output extends the open
    block or closes it and opens the next (thinking, text, one per call). Without a parser the
    output is one text block, opened at once."""

    def __init__(self, parser: MessageParser | None):
        self.parser = parser
        self.index = -1
        self.open: str | None = None  # the type of the open block
        self.calls = 0

    def start(self) -> list[dict[str, Any]]:
        return [] if self.parser is not None else self._switch("text")

    def feed(self, text: str, final: bool) -> list[dict[str, Any]]:
        if self.parser is None:
            events = [_text_delta(self.index, text)] if text else []
            return events + (self._switch(None) if final else [])
        piece = self.parser.feed(text)
        if final:
            piece += self.parser.finish()
        events = []
        if piece.reasoning:
            events += self._switch("thinking")
            events.append({"type": "content_block_delta", "index": self.index,
                           "delta": {"type": "thinking_delta", "thinking": piece.reasoning}})
        # The open call's last pieces come before any text after it; the text before the next calls.
        ongoing = [part for part in piece.deltas if part.index < self.calls]
        events += self._arguments(ongoing)
        if piece.content:
            events += self._switch("text")
            events.append(_text_delta(self.index, piece.content))
        events += self._arguments(piece.deltas[len(ongoing):])
        if final:
            events += self._switch("text") if self.index < 0 else []  # a message has at least one block
            events += self._switch(None)
        return events

    def _arguments(self, parts: list[CallDelta]) -> list[dict[str, Any]]:
        """Calls' pieces as events: a call's first piece opens its block (closing the one before)."""
        events = []
        for part in parts:
            if part.name is not None:
                events += self._switch("tool_use", tool_use_block(ToolCall(part.name, "{}")))
                self.calls += 1
            if part.arguments:
                events.append({"type": "content_block_delta", "index": self.index,
                               "delta": {"type": "input_json_delta", "partial_json": part.arguments}})
        return events

    def _switch(self, kind: str | None, block: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        """Close the open block (unless it is ``kind``, and not a call); open one of ``kind``."""
        if kind is not None and kind == self.open and kind != "tool_use":
            return []
        events = [{"type": "content_block_stop", "index": self.index}] if self.open else []
        self.open = kind
        if kind is not None:
            self.index += 1
            empty = {"thinking": {"type": "thinking", "thinking": "", "signature": ""},
                     "text": {"type": "text", "text": ""}}
            events.append({"type": "content_block_start", "index": self.index,
                           "content_block": block or empty[kind]})
        return events


def _text_delta(index: int, text: str) -> dict[str, Any]:
    return {"type": "content_block_delta", "index": index, "delta": {"type": "text_delta", "text": text}}


async def event_stream(ctx: ServerContext, head: dict[str, Any], job: dict[str, Any],
                       blocks: Blocks) -> AsyncIterator[str]:
    """Anthropic's streaming events: ``message_start``, then per content block
    ``content_block_start``, ``content_block_delta``..., ``content_block_stop`` (a ``ping`` after
    the first start), ``message_delta`` (stop reason, output tokens), ``message_stop``; an
    ``error`` event if it fails once the 200 is out. Closing the stream early aborts the engine
    request."""
    try:
        start = {**head, "content": [], "stop_reason": None, "stop_sequence": None,
                 "usage": usage(len(job["input_ids"]), 0)}
        yield _event({"type": "message_start", "message": start})
        for event in blocks.start():
            yield _event(event)
        yield _event({"type": "ping"})
        async with contextlib.aclosing(ctx.stream(**job)) as chunks:
            async for chunk in chunks:
                reason = finish_reason(chunk)
                for event in blocks.feed(chunk["text"], final=reason is not None):
                    yield _event(event)
        stop = with_tool_use(stop_fields(reason), blocks.calls > 0)
        yield _event({"type": "message_delta", "delta": stop,
                      "usage": {"output_tokens": chunk["meta_info"]["completion_tokens"]}})
        yield _event({"type": "message_stop"})
    except RequestAborted as exc:
        yield _event(error_body(500, f"the request was aborted: {exc}"))
    except ValueError as exc:  # bad input the engine found (a regex it cannot compile): the client's fault
        yield _event(error_body(400, str(exc)))
    except Exception as exc:  # the 200 is out: report the error in the stream
        logger.exception("streamed message failed")
        yield _event(error_body(500, f"internal error: {exc}"))


def _event(data: dict[str, Any]) -> str:
    return f"event: {data['type']}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n"

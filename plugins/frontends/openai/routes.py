"""The OpenAI-compatible routes: ``/v1/models``, ``/v1/completions``, ``/v1/chat/completions``.

A request becomes one engine request per choice (``n`` per prompt, run concurrently); the
responses, streamed or not, are built from the same per-choice accumulators.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
import uuid
from dataclasses import dataclass
from typing import Any, AsyncIterator

from fastapi import FastAPI
from fastapi.responses import StreamingResponse
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from sglang_core.sampling.params import choice_seed
from sglang_core.server.chat_templates import resolve_chat_template
from sglang_core.server.context import ServerContext
from sglang_core.server.errors import error_body, param_of
from sglang_core.server.bodies import parse_body
from sglang_core.server.openapi import ApiDocs
from sglang_core.server.generation import RequestAborted, check_prompt

from sglang_plugins.frontends.media_messages import media_chat_prompt_ids
from sglang_plugins.frontends.openai.generation import Choice, merged, sampling_params, usage
from sglang_plugins.frontends.openai.protocol import ChatRequest, CompletionRequest, SamplingRequest
from sglang_plugins.frontends.openai.responses import (
    EXAMPLES, ChatCompletion, ChatCompletionChunk, Completion, CompletionChunk, ModelCard, ModelList,
)
from sglang_plugins.frontends.openai.shapes import ChatShape, CompletionShape
from sglang_plugins.frontends.tool_calling import ToolCalling

logger = logging.getLogger("sglang_core.server.openai")

CHAT, COMPLETION = ChatShape(), CompletionShape()


@dataclass
class Plan:
    """A validated request: its choices and, for each, the engine request that fills it."""

    choices: list[Choice]
    jobs: list[dict[str, Any]]
    n: int
    size_field: str = "n"  # the field a request of too many sequences (prompts x n) is told to shrink


def mount(app: FastAPI, ctx: ServerContext) -> None:
    template = resolve_chat_template(ctx.settings.chat_template)  # a bad name fails at startup
    tool_calling = ToolCalling(ctx, template)  # so do unknown parser names
    created = int(time.time())
    docs = ApiDocs.for_app(app)

    def model_card() -> dict[str, Any]:
        return {"id": ctx.model_name, "object": "model", "created": created, "owned_by": "sglang-core",
                "root": ctx.engine.model_path, "max_model_len": ctx.engine.info.context_len}

    @app.get("/v1/models", **docs.route(response=ModelList, summary="The served model"))
    async def list_models() -> Response:
        return JSONResponse({"object": "list", "data": [model_card()]})

    @app.get("/v1/models/{model_id:path}", **docs.route(response=ModelCard, summary="One model (404 unless served)"))
    async def get_model(model_id: str) -> Response:
        if model_id != ctx.model_name:
            return ctx.error(404, f"model {model_id!r} not found; this server serves {ctx.model_name!r}", "model")
        return JSONResponse(model_card())

    @app.post("/v1/completions", **docs.route(body=CompletionRequest, response=Completion, stream=CompletionChunk,
                                              example=EXAMPLES["completion"], summary="Complete a prompt"))
    async def completions(request: Request) -> Response:
        req = parse_body(CompletionRequest, await request.body())
        return await respond(ctx, request, req, COMPLETION, completion_plan(ctx, req), "cmpl")

    @app.post("/v1/chat/completions", **docs.route(body=ChatRequest, response=ChatCompletion, stream=ChatCompletionChunk,
                                                   example=EXAMPLES["chat"], summary="Answer a conversation"))
    async def chat_completions(request: Request) -> Response:
        req = parse_body(ChatRequest, await request.body())
        return await respond(ctx, request, req, CHAT, chat_plan(ctx, req, template, tool_calling), "chatcmpl")


# ---- requests -> plans ------------------------------------------------------------------------

def completion_plan(ctx: ServerContext, req: CompletionRequest) -> Plan:
    tokenizer, info = ctx.engine.tokenizer, ctx.engine.info
    prompts = [req.prompt] if isinstance(req.prompt, str) or _is_token_list(req.prompt) else req.prompt
    if not prompts:
        raise ValueError("prompt: must not be empty")
    size_field = "prompt" if len(prompts) > ctx.sequence_limit else "n"
    ctx.check_sequences(len(prompts) * req.n, size_field)  # before tokenizing them all
    plan = Plan([], [], req.n, size_field)
    for prompt in prompts:
        ids = prompt
        if isinstance(prompt, str):
            ids = tokenizer(prompt)["input_ids"] if prompt else []  # "" is an empty prompt, not just a BOS
        max_new = check_prompt(ids, info, "prompt", req.max_tokens, "max_tokens")
        echo = (prompt if isinstance(prompt, str) else tokenizer.decode(ids)) if req.echo else ""
        _add_choices(plan, req, ids, sampling_params(req, max_new, info.vocab_size), req.logprobs, echo)
    return plan


def chat_plan(ctx: ServerContext, req: ChatRequest, template: str | None, tool_calling: ToolCalling) -> Plan:
    tokenizer, info = ctx.engine.tokenizer, ctx.engine.info
    messages, images = [], []
    for i, message in enumerate(req.messages):
        rendered, urls = message.for_template(i, ctx.engine.image_token, ctx.engine.video_token)
        messages.append(rendered)
        images += urls
    use = req.tool_use()
    tools = [f.for_template() for f in use.functions] if use is not None else None
    ids = media_chat_prompt_ids(tokenizer, messages, template, [ctx.engine.image_token, ctx.engine.video_token],
                                add_generation_prompt=req.add_generation_prompt, tools=tools,
                                chat_template_kwargs=req.chat_template_kwargs)
    max_field, max_tokens = req.max_tokens_field
    max_new = check_prompt(ids, info, "messages", max_tokens, max_field)
    plan = Plan([], [], req.n)
    top = (req.top_logprobs or 0) if req.logprobs else None
    params = sampling_params(req, max_new, info.vocab_size)
    message_parser = tool_calling.prepare(use, ids, params)
    _add_choices(plan, req, ids, params, top)
    if message_parser is not None:
        for choice in plan.choices:
            choice.message = message_parser()
    if images:
        for job in plan.jobs:
            job["image_data"] = images
    return plan


def _is_token_list(prompt: list) -> bool:
    return bool(prompt) and isinstance(prompt[0], int)


def _add_choices(plan: Plan, req: SamplingRequest, ids: list[int], params: dict[str, Any],
                 top_logprobs: int | None, echo: str = "") -> None:
    """Add ``n`` choices for one prompt; ``top_logprobs`` None means no logprobs at all."""
    logprobs = top_logprobs is not None
    for j in range(req.n):
        index = len(plan.choices)
        plan.choices.append(Choice(index, logprobs=logprobs, echo=echo, echo_logprobs=bool(echo) and logprobs))
        seed = choice_seed(req.seed, j)
        plan.jobs.append({
            "input_ids": ids, "sampling_params": {**params, "seed": seed}, "return_logprob": logprobs,
            "logprob_start_len": 0 if echo and logprobs else -1, "top_logprobs_num": top_logprobs or 0,
            "return_text_in_logprobs": logprobs,
        })


# ---- plans -> responses -----------------------------------------------------------------------

async def respond(ctx: ServerContext, request: Request, req: SamplingRequest, shape: ChatShape | CompletionShape,
                  plan: Plan, id_prefix: str) -> Response:
    head = {"id": f"{id_prefix}-{uuid.uuid4().hex}", "object": shape.object, "created": int(time.time()),
            "model": ctx.model_name}
    for i, job in enumerate(plan.jobs):
        job["rid"] = f"{head['id']}-{i}"  # names the engine request in logs and aborts
    if req.stream:
        events = ctx.admitted(event_stream(ctx, shape, head, plan, req.include_usage),
                              len(plan.jobs), plan.size_field)
        await anext(events)  # takes admission: a 400 or 503 goes out now, before the stream's 200
        return StreamingResponse(events, media_type="text/event-stream")
    with ctx.admission(len(plan.jobs), plan.size_field):
        try:
            await ctx.until_disconnect(request, _run(ctx, plan))
        except RequestAborted as exc:
            return ctx.error(500, f"the request was aborted: {exc}")
    return JSONResponse({**head, "choices": [shape.choice(c) for c in plan.choices],
                         "usage": usage(plan.choices, plan.n)})


async def _run(ctx: ServerContext, plan: Plan) -> None:
    async with contextlib.aclosing(merged(ctx, plan.jobs)) as chunks:
        async for index, chunk in chunks:
            plan.choices[index].update(chunk)


async def event_stream(ctx: ServerContext, shape: ChatShape | CompletionShape, head: dict[str, Any], plan: Plan,
                       include_usage: bool) -> AsyncIterator[str]:
    """Server-sent events in OpenAI's chunk shapes, ending with ``[DONE]``; closing the stream
    early ends the engine requests."""

    def event(choices: list[dict[str, Any]], **extra: Any) -> str:
        return _sse({**head, "object": shape.chunk_object, "choices": choices, **extra})

    try:
        for choice in plan.choices:
            if (opening := shape.opening(choice)) is not None:
                yield event([opening])
        async with contextlib.aclosing(merged(ctx, plan.jobs)) as chunks:
            async for index, chunk in chunks:
                choice = plan.choices[index]
                for piece in shape.deltas(choice, choice.update(chunk)):
                    yield event([piece])
        if include_usage:
            yield event([], usage=usage(plan.choices, plan.n))
    except Exception as exc:  # the 200 is out: report the error in the stream
        yield _sse(_stream_error(exc))
    yield "data: [DONE]\n\n"


def _stream_error(exc: Exception) -> dict[str, Any]:
    if isinstance(exc, ValueError):
        return error_body(400, str(exc), param_of(str(exc)))
    if isinstance(exc, RequestAborted):
        return error_body(500, f"the request was aborted: {exc}")
    logger.exception("streamed request failed")
    return error_body(500, f"internal error: {exc}")


def _sse(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"

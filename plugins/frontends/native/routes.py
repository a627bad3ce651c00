"""The native API's routes: ``mount(app, ctx)`` adds them to the server's FastAPI app."""

from __future__ import annotations

import asyncio
import dataclasses

from fastapi import FastAPI
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response

from sglang_core.server.chat_templates import resolve_chat_template, role_markers
from sglang_core.server.bodies import parse_body
from sglang_core.server.context import ServerContext
from sglang_core.server.openapi import ApiDocs

from sglang_plugins.frontends.native.protocol import (AbortBody, GenerateBody, Job, TokenizeBody, parse_generate,
                                                      prompt_errors_named, response_item)
from sglang_plugins.frontends.native.responses import (EXAMPLES, GenerateResponse, GenerateStreamItem, ModelInfo,
                                                       PeakRequests, ServerArgs, ServerInfo, TokenizeResponse)
from sglang_plugins.frontends.native.streaming import GenerateStream, GenerateStreamResponse

HEALTH_TIMEOUT_S = 20.0


def mount(app: FastAPI, ctx: ServerContext) -> None:
    docs = ApiDocs.for_app(app)

    generate_docs = docs.route(body=GenerateBody, response=GenerateResponse, stream=GenerateStreamItem,
                               example=EXAMPLES["generate"], summary="Generate (SGLang 0.2.10's native API)")

    # One route per method, so that each has an operation id of its own in the document.
    @app.post("/generate", **generate_docs)
    @app.put("/generate", **generate_docs)
    async def generate(request: Request) -> Response:
        parsed = parse_generate(parse_body(GenerateBody, await request.body()), ctx.engine.info.vocab_size,
                                ctx.check_sequences)
        with prompt_errors_named(parsed.prompt_field):
            if parsed.stream:
                stream = GenerateStream(ctx, parsed.jobs)
                try:
                    await ctx.until_disconnect(request, stream.start())
                except BaseException:
                    await stream.close()
                    raise
                return GenerateStreamResponse(stream)
            with ctx.admission(len(parsed.jobs)):
                results = await ctx.until_disconnect(request, _complete_all(ctx, parsed.jobs))
        items = [response_item(r) for r in results]
        return JSONResponse(items[0] if parsed.single else items)

    @app.get("/health_generate", **docs.route(summary="200 once the engine has generated a token"))
    async def health_generate() -> Response:
        """200 once the engine has generated a token; 503 if it is dead or wedged."""
        if not ctx.engine.alive:
            return ctx.error(503, "the engine is not running")
        with ctx.admission():
            try:
                result = await asyncio.wait_for(
                    ctx.complete(input_ids=[0], sampling_params={"max_new_tokens": 1, "temperature": 0}),
                    HEALTH_TIMEOUT_S)
            except asyncio.TimeoutError:
                return ctx.error(503, f"the engine generated no token within {HEALTH_TIMEOUT_S:g} s")
            except Exception as exc:
                return ctx.error(503, f"the engine failed to generate: {exc}")
        if result["meta_info"]["finish_reason"]["type"] == "abort":
            return ctx.error(503, f"the generation was aborted: {result['meta_info']['finish_reason']}")
        return Response(status_code=200)

    @app.get("/get_model_info", **docs.route(response=ModelInfo))
    async def get_model_info() -> dict:
        """The model, plus its chat template as text around each role (``role_markers``), or
        null, and the text that stands for an image in a prompt (null: a text-only model), for
        clients such as the frontend language's ``RuntimeEndpoint``."""
        info = ctx.engine.info
        template = role_markers(ctx.engine.tokenizer, resolve_chat_template(ctx.settings.chat_template))
        return {"model_path": info.model_path, "tokenizer_path": info.tokenizer_path, "is_generation": True,
                "chat_template": template, "image_token": ctx.engine.image_token,
                "video_token": ctx.engine.video_token}

    @app.post("/tokenize", **docs.route(body=TokenizeBody, response=TokenizeResponse, example=EXAMPLES["tokenize"]))
    async def tokenize(request: Request) -> dict:
        """Token ids of ``text`` (a string, or a list of strings) as the engine tokenizes a prompt,
        so a client can split text exactly as the server does (``RuntimeEndpoint.select``)."""
        text = parse_body(TokenizeBody, await request.body()).text
        texts = [text] if isinstance(text, str) else text
        if not texts:
            raise ValueError("text: expected a string or a non-empty list of strings")
        ids = [ctx.engine.tokenizer(t)["input_ids"] for t in texts]
        return {"input_ids": ids[0] if isinstance(text, str) else ids}

    @app.get("/get_server_args", **docs.route(response=ServerArgs))
    async def get_server_args() -> dict:
        return ctx.settings.public_dict()

    @app.get("/get_server_info", **docs.route(response=ServerInfo))
    async def get_server_info() -> dict:
        """The settings, with what the engine resolved ("auto" device, dtype, backend, pool size)
        in place of what was configured, plus its memory report (summed over the live replicas
        under ``--dp-size``) and each replica's (``replicas``: alive, memory or null)."""
        report = await asyncio.to_thread(ctx.engine.memory_report)
        reports = await asyncio.to_thread(ctx.engine.memory_reports)
        return {**ctx.settings.public_dict(), **dataclasses.asdict(ctx.engine.info), "memory": report,
                "replicas": [{"alive": r is not None, "memory": r} for r in reports],
                "requests_in_flight": ctx.in_flight, "peak_requests_in_flight": ctx.peak_in_flight}

    @app.post("/reset_peak_requests_in_flight", **docs.route(response=PeakRequests))
    async def reset_peak_requests_in_flight() -> dict:
        """Start measuring ``peak_requests_in_flight`` afresh (it proves requests overlapped)."""
        return {"peak_requests_in_flight": ctx.reset_peak()}

    @app.get("/flush_cache", **docs.route(text="Cache flushed."))
    @app.post("/flush_cache", **docs.route(text="Cache flushed."))
    async def flush_cache() -> Response:
        if not await asyncio.to_thread(ctx.engine.flush_cache):
            return ctx.error(400, "cache not flushed: requests are in flight; retry when the server is idle")
        return PlainTextResponse("Cache flushed.\n")

    @app.post("/abort_request", **docs.route(body=AbortBody, example=EXAMPLES["abort_request"]))
    async def abort_request(request: Request) -> Response:
        ctx.engine.abort(parse_body(AbortBody, await request.body()).rid)
        return Response(status_code=200)


async def _complete_all(ctx: ServerContext, jobs: list[Job]) -> list[dict]:
    """Run every job at once; if one fails (or this is cancelled), cancel the rest."""
    tasks = [asyncio.ensure_future(ctx.complete(**job.kwargs)) for job in jobs]
    try:
        return await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

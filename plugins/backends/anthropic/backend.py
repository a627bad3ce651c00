"""``sgl.Anthropic(model, base_url=None, api_key=None, ...)``: the frontend language on Anthropic's
Messages API (or any server that speaks it, such as this one's ``/v1/messages``).

A chat backend: it reads ``Prompt.messages``. System turns become the ``system`` parameter, images
base64 image blocks, and a final assistant turn with text a prefill the model continues. On a
server that takes SGLang's extension fields (ours), constraints and the sampling extras travel in
the request body and ``select`` is constrained generation, as on the OpenAI chat backend.
"""

from __future__ import annotations

import base64
import json
from typing import Any, Iterator

from sglang_core.lang.backend import GenParams, GenResult, LangBackend, MissingExtraError, Prompt, SelectResult

from sglang_plugins.backends.api_common import (
    CHAT_SELECT_METHOD, regex_select, resolve_sglang_extensions, sglang_fields, unsupported,
)

# The Messages API requires max_tokens; a gen without one gets the engine's own default.
DEFAULT_MAX_TOKENS = 128


class AnthropicBackend(LangBackend):
    """Anthropic's Messages API through the official SDK.

    ``model``: the model name sent with every request. ``base_url`` / ``api_key``: as the SDK takes
    them (default: Anthropic's API and ``ANTHROPIC_API_KEY``). ``default_max_tokens``: for a gen
    without ``max_tokens``. Further keywords (``timeout``, ``max_retries``, ``default_headers``,
    ...) go to ``anthropic.Anthropic``.

    Supported: ``max_tokens``, ``stop``, images, streaming, and ``GenParams.extra`` passed through
    to ``messages.create``. ``temperature``, ``top_p`` and ``top_k`` are sent in the request body
    (``extra_body``): the SDK's current API version dropped them and Anthropic refuses them there
    (a 400), while servers that take them (older API versions, sglang-core's ``/v1/messages``)
    honour them.

    ``sglang_extensions``: the server takes SGLang's ``regex``, ``json_schema``, ``min_p``,
    ``ignore_eos``, ``stop_token_ids`` and the penalties in the body (sglang-core's
    ``/v1/messages`` does); None means "``base_url`` is given and is not api.anthropic.com". With
    them, ``select`` constrains the reply to a regex alternation of the choices. Without them
    those fields and ``select`` raise :class:`UnsupportedError` naming them (Anthropic's API has
    neither constraints nor logprobs). Logprobs are refused either way: Anthropic's response has
    no place for them.
    """

    name = "anthropic"
    supports_tools = True
    supports_images = True

    def __init__(self, model: str, base_url: str | None = None, api_key: str | None = None,
                 default_max_tokens: int = DEFAULT_MAX_TOKENS, sglang_extensions: bool | None = None,
                 **client_kwargs: Any):
        try:
            import anthropic
        except ImportError:
            raise MissingExtraError("anthropic", "anthropic", "anthropic") from None
        self.sglang_extensions = resolve_sglang_extensions(sglang_extensions, base_url, "api.anthropic.com")
        self.model = model
        self.default_max_tokens = default_max_tokens
        self.client = anthropic.Anthropic(base_url=base_url, api_key=api_key, **client_kwargs)

    def generate(self, prompt: Prompt, params: GenParams) -> GenResult:
        request, trim = self._request(prompt, params)
        message = self.client.messages.create(**request)
        text = "".join(block.text for block in message.content if block.type == "text")
        return GenResult(trim.feed(text) + trim.finish(), _meta_info(message))

    def generate_stream(self, prompt: Prompt, params: GenParams) -> Iterator[str | GenResult]:
        request, trim = self._request(prompt, params)
        pieces = []
        # Leaving the block (also when the caller stops early) closes the HTTP stream.
        with self.client.messages.stream(**request) as stream:
            for text in stream.text_stream:
                if piece := trim.feed(text):
                    pieces.append(piece)
                    yield piece
            message = stream.get_final_message()
        if piece := trim.finish():
            pieces.append(piece)
            yield piece
        yield GenResult("".join(pieces), _meta_info(message))

    def select(self, prompt: Prompt, choices: list[str], temperature: float,
               method: str = CHAT_SELECT_METHOD) -> SelectResult:
        if not self.sglang_extensions:
            raise unsupported(self.name, "select", "cannot score choices: Anthropic's Messages API returns no "
                                                   "logprobs and has no constraints (pass sglang_extensions=True "
                                                   "for sglang-core's /v1/messages; or use gen() and match its text)")
        return regex_select(self, prompt, choices, temperature, method)

    def shutdown(self) -> None:
        self.client.close()

    def _request(self, prompt: Prompt, params: GenParams) -> tuple[dict[str, Any], _LeadTrim]:
        """The ``messages.create`` keywords for one gen, and the trim its reply needs."""
        for name, asked in (("return_logprob", params.return_logprob), ("top_logprobs_num", params.top_logprobs_num)):
            if asked:
                raise unsupported(self.name, name, "gets no logprobs: Anthropic's response has no place for them")
        # Checked before anything is built: without extensions, the first set one is refused.
        extensions = sglang_fields(self.name, params, self.sglang_extensions,
                                   ("regex", "json_schema", "min_p", "ignore_eos", "stop_token_ids",
                                    "frequency_penalty", "presence_penalty"))
        system, messages = [], []
        turns = prompt.messages or ({"role": "user", "content": prompt.text},)  # a program without roles
        for turn in turns:
            blocks = _blocks(turn["content"])
            if turn["role"] == "system":
                system += blocks
            elif blocks:  # the API refuses empty turns; an empty one adds nothing anyway
                messages.append({"role": turn["role"], "content": blocks})
        trim = _LeadTrim("")
        if messages and messages[-1]["role"] == "assistant":
            last = messages[-1]["content"][-1]
            # The API refuses a prefill ending in whitespace: send it stripped, and drop that
            # whitespace from the reply when the model writes it again, as it is already in the text.
            if last["type"] == "text" and last["text"] != last["text"].rstrip():
                stripped = last["text"].rstrip()
                trim = _LeadTrim(last["text"][len(stripped):])
                if stripped:
                    last["text"] = stripped
                else:
                    messages[-1]["content"].pop()
                    if not messages[-1]["content"]:
                        messages.pop()
        request: dict[str, Any] = {
            "model": self.model, "messages": messages,
            "max_tokens": self.default_max_tokens if params.max_tokens is None else params.max_tokens,
        }
        if system:
            request["system"] = system
        if params.stop:
            request["stop_sequences"] = list(params.stop)
        if params.tools:
            request.update(_tools(params))
        # Sampling settings travel in the body: the SDK's API version has no such parameters.
        sampling = {name: getattr(params, name) for name in ("temperature", "top_p", "top_k")
                    if getattr(params, name) is not None}
        if sampling.get("top_k") == -1:  # the whole vocabulary: the API's default
            del sampling["top_k"]
        extra = dict(params.extra)
        body = {**sampling, **extensions, **extra.pop("extra_body", {})}
        if body:
            request["extra_body"] = body
        return {**request, **extra}, trim


class _LeadTrim:
    """Removes ``whitespace`` from the start of a reply (streamed piece by piece) when the reply
    begins with it; a reply that is a mere prefix of it becomes empty."""

    def __init__(self, whitespace: str):
        self.whitespace = whitespace
        self.held = ""
        self.decided = not whitespace

    def feed(self, piece: str) -> str:
        if self.decided:
            return piece
        self.held += piece
        if len(self.held) < len(self.whitespace) and self.whitespace.startswith(self.held):
            return ""  # too short to tell yet
        self.decided = True
        held, self.held = self.held, ""
        return held[len(self.whitespace):] if held.startswith(self.whitespace) else held

    def finish(self) -> str:
        """What is still held at the end: nothing, as it can only be a prefix of ``whitespace``."""
        self.decided, self.held = True, ""
        return ""


def _blocks(content: str | list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A turn's content as Anthropic content blocks (empty text left out)."""
    if isinstance(content, str):
        return [{"type": "text", "text": content}] if content else []
    blocks = []
    for part in content:
        if part["type"] == "image":
            image = part["image"]
            blocks.append({"type": "image", "source": {"type": "base64", "media_type": image.mime_type,
                                                        "data": base64.b64encode(image.data).decode()}})
        elif part["text"]:
            blocks.append({"type": "text", "text": part["text"]})
    return blocks


def _tools(params: GenParams) -> dict[str, Any]:
    """OpenAI function tools and tool choice (the language's) as Anthropic's ``tools`` and
    ``tool_choice`` (``required``: ``any``; a tool's name: ``tool``)."""
    tools = []
    for tool in params.tools:
        function = tool["function"]
        tools.append({"name": function["name"], "input_schema": function.get("parameters") or
                      {"type": "object", "properties": {}},
                      **({"description": function["description"]} if function.get("description") else {})})
    choice = {None: None, "auto": {"type": "auto"}, "none": {"type": "none"}, "required": {"type": "any"}}.get(
        params.tool_choice, {"type": "tool", "name": params.tool_choice})
    return {"tools": tools, **({"tool_choice": choice} if choice else {})}


def _meta_info(message: Any) -> dict[str, Any]:
    """Usage and finish in the engine's terms (``finish_reason`` as ``/generate`` reports it), plus
    Anthropic's own ``stop_reason`` and the message id."""
    if message.stop_reason == "max_tokens":
        finish = {"type": "length", "length": message.usage.output_tokens}
    else:
        finish = {"type": "stop", "matched": message.stop_sequence}
    meta = {"id": message.id, "prompt_tokens": message.usage.input_tokens,
            "completion_tokens": message.usage.output_tokens, "finish_reason": finish,
            "stop_reason": message.stop_reason}
    calls = [{"id": block.id, "name": block.name, "arguments": json.dumps(block.input, ensure_ascii=False)}
             for block in message.content if block.type == "tool_use"]
    return {**meta, "tool_calls": calls} if calls else meta

"""OpenAI request bodies as Pydantic models (strict, unknown fields ignored: see
``sglang_core.server.bodies``)."""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import Field

from sglang_core.server.bodies import SGLangSampling, StrictBody as _Body

from sglang_plugins.frontends.tool_calling import NO_PARAMETERS, Function, ToolUse


class StreamOptions(_Body):
    include_usage: bool = Field(False, description="end the stream with a chunk holding usage and no choices")


class JsonSchemaFormat(_Body):
    name: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None
    description: str | None = None


class ResponseFormat(_Body):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class SamplingRequest(SGLangSampling):
    """Fields chat and completions share, plus the SGLang sampling extensions clients send."""

    model: str | None = Field(None, description="accepted and ignored: the server serves one model")
    n: int = Field(1, ge=1, le=128, description="choices per prompt")
    temperature: float | None = Field(None, description="0: greedy; default 1", json_schema_extra={"minimum": 0})
    top_p: float | None = Field(None, description="default 1", json_schema_extra={"exclusiveMinimum": 0, "maximum": 1})
    stop: str | list[str] | None = Field(None, description="non-empty strings that end a choice (not included in it)")
    presence_penalty: float | None = Field(None, json_schema_extra={"minimum": -2, "maximum": 2})
    frequency_penalty: float | None = Field(None, json_schema_extra={"minimum": -2, "maximum": 2})
    seed: int | None = Field(None, description="makes sampling reproducible; choice j uses a seed derived from it")
    logit_bias: dict[str, float] | None = Field(None, description="token id (as text) -> finite bias added to its logit, clamped to [-100, 100] as OpenAI documents")
    stream: bool = Field(False, description="answer with server-sent events (text/event-stream)")
    stream_options: StreamOptions | None = None
    user: str | None = Field(None, description="accepted and ignored")
    top_k: int | None = Field(None, description="SGLang extension: -1 (off) or >= 1", json_schema_extra={"minimum": -1})
    response_format: ResponseFormat | None = Field(None, description="json_object or json_schema: constrain the output")

    @property
    def include_usage(self) -> bool:
        return self.stream and self.stream_options is not None and self.stream_options.include_usage

    def constraint(self) -> dict[str, str]:
        """The output constraint as sampling params: SGLang's ``regex`` / ``json_schema`` /
        ``ebnf``, or OpenAI's ``response_format`` (``json_object``: any JSON object)."""
        fmt = self.response_format
        given = [name for name, value in (("regex", self.regex), ("json_schema", self.json_schema), ("ebnf", self.ebnf),
                                          ("response_format", fmt if fmt and fmt.type != "text" else None))
                 if value is not None]
        if len(given) > 1:
            raise ValueError(f"{given[1]}: give only one of regex, json_schema, ebnf and response_format")
        if fmt is None or fmt.type == "text":
            return super().constraint()
        if fmt.type == "json_object":
            return {"json_schema": json.dumps({"type": "object"})}
        if fmt.json_schema is None or fmt.json_schema.schema_ is None:
            raise ValueError("response_format.json_schema.schema: required for type 'json_schema'")
        return {"json_schema": json.dumps(fmt.json_schema.schema_)}

    def check_supported(self) -> None:
        """Raise ``ValueError("<field>: ...")`` for a feature this server does not have yet."""
        self.constraint()


class CompletionRequest(SamplingRequest):
    prompt: str | list[str] | list[int] | list[list[int]] = Field(
        description="a prompt as text or token ids, or a batch of them")
    max_tokens: int | None = Field(16, ge=0, description="null: as many as the context leaves")
    logprobs: int | None = Field(None, ge=0, le=20, description="return this many top alternatives per token")
    echo: bool = Field(False, description="put the prompt before the completion")
    suffix: str | None = Field(None, description="refused unless empty")
    best_of: int | None = Field(None, description="refused unless equal to n")

    def check_supported(self) -> None:
        super().check_supported()
        if self.suffix:
            raise ValueError("suffix: is not supported")
        if self.best_of is not None and self.best_of != self.n:
            raise ValueError(f"best_of: only best_of == n is supported, got best_of={self.best_of}, n={self.n}")


class ImageUrl(_Body):
    url: str
    detail: Literal["auto", "low", "high"] | None = None  # one resolution per model: accepted, not used


class VideoUrl(_Body):
    url: str = Field(description="a video file (data URL or base64; URLs and files where allowed): the server "
                                 "samples its frames")


class ContentPart(_Body):
    type: str
    text: str = ""
    image_url: ImageUrl | None = None
    video_url: VideoUrl | None = None


class FunctionCall(_Body):
    name: str
    arguments: str  # a JSON object, as text


class ToolCallItem(_Body):
    """A call in an assistant message of the conversation (one the model made earlier)."""

    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCallItem] | None = None  # assistant messages
    tool_call_id: str | None = None  # tool messages: the call they answer

    def for_template(self, index: int, image_token: str | None = None,
                     video_token: str | None = None) -> tuple[dict[str, Any], list[Any]]:
        """The message as chat templates expect it (text content as one string, each image (video)
        as the model's ``image_token`` (``video_token``), a call's arguments as an object:
        templates write them with ``tojson``) and its media in order, as the engine's
        ``image_data`` takes them (an image's URL, ``{"video": URL}``)."""
        content, media = self.content, []
        if isinstance(content, list):
            texts = []
            for j, part in enumerate(content):
                if part.type in ("image_url", "video_url"):
                    kind = part.type.removesuffix("_url")
                    token = image_token if kind == "image" else video_token
                    if token is None:
                        raise ValueError(f"messages.{index}.content.{j}: this model takes no {kind}s")
                    source = getattr(part, part.type)
                    if source is None:
                        raise ValueError(f"messages.{index}.content.{j}.{part.type}: required for type {part.type!r}")
                    texts.append(token)
                    media.append(source.url if kind == "image" else {"video": source.url})
                elif part.type == "text":
                    texts.append(part.text)
                else:
                    raise ValueError(f"messages.{index}.content.{j}: {part.type!r} content is not supported "
                                     "(text, image_url and video_url)")
            content = "\n".join(texts)
        if self.role == "tool" and self.tool_call_id is None:
            raise ValueError(f"messages.{index}.tool_call_id: required in a tool message")
        message = self.model_dump(exclude_none=True)
        # Templates know "system"; "developer" is OpenAI's newer name for it.
        message.update(role="system" if self.role == "developer" else self.role, content=content or "")
        if self.tool_calls:
            message["tool_calls"] = [{"id": call.id, "type": "function", "function": {
                "name": call.function.name, "arguments": _arguments(call.function.arguments,
                                                                    f"messages.{index}.tool_calls.{j}")}}
                for j, call in enumerate(self.tool_calls)]
        return message, media


def _arguments(text: str, where: str) -> dict[str, Any]:
    try:
        arguments = json.loads(text)
    except ValueError:
        arguments = None
    if not isinstance(arguments, dict):
        raise ValueError(f"{where}.function.arguments: must be a JSON object, got {text!r}")
    return arguments


class FunctionDefinition(_Body):
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON Schema of an object; none: no parameters
    strict: bool | None = None  # accepted: forced calls always follow the schema


class Tool(_Body):
    type: Literal["function"]
    function: FunctionDefinition


class ToolName(_Body):
    name: str


class NamedToolChoice(_Body):
    type: Literal["function"]
    function: ToolName


class ChatRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1, description="the conversation, through the chat template")
    max_tokens: int | None = Field(None, ge=0, description="null: as many as the context leaves")
    max_completion_tokens: int | None = Field(None, ge=0, description="OpenAI's newer name for max_tokens; wins over it")
    logprobs: bool = Field(False, description="return the generated tokens' logprobs")
    top_logprobs: int | None = Field(None, ge=0, le=20, description="alternatives per token (needs logprobs)")
    tools: list[Tool] | None = Field(None, description="functions the model may call")
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = Field(
        None, description="default: auto with tools, none without")
    parallel_tool_calls: bool | None = Field(None, description="default true: more than one call per message")
    add_generation_prompt: bool = Field(True, description="SGLang extension: end the prompt with the assistant's turn")
    chat_template_kwargs: dict[str, Any] | None = Field(
        None, description="SGLang and vLLM extension: further variables for the chat template "
                          "(Qwen3's enable_thinking)")

    @property
    def max_tokens_field(self) -> tuple[str, int | None]:
        """Which of the two length fields the client used, and its value."""
        if self.max_completion_tokens is not None:
            return "max_completion_tokens", self.max_completion_tokens
        return "max_tokens", self.max_tokens

    def check_supported(self) -> None:
        super().check_supported()
        self.tool_use()
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs: requires logprobs to be true")


    def tool_use(self) -> ToolUse | None:
        """The request's tools and tool choice (None: no tools); ValueError naming the field for
        a choice that names no tool, a forced choice without tools, or malformed tools."""
        functions = []
        for i, tool in enumerate(self.tools or ()):
            parameters = tool.function.parameters
            if parameters is not None and parameters.get("type", "object") != "object":
                raise ValueError(f"tools.{i}.function.parameters: must be a JSON Schema of type 'object'")
            if any(f.name == tool.function.name for f in functions):
                raise ValueError(f"tools.{i}.function.name: {tool.function.name!r} is given twice")
            functions.append(Function(tool.function.name, parameters or NO_PARAMETERS, tool.function.description))
        choice = self.tool_choice
        if not functions:
            if choice not in (None, "none"):
                raise ValueError("tool_choice: only 'none' is allowed when no tools are given")
            return None
        parallel = self.parallel_tool_calls is not False
        if isinstance(choice, NamedToolChoice):
            if not any(f.name == choice.function.name for f in functions):
                raise ValueError(f"tool_choice.function.name: no tool named {choice.function.name!r} in tools")
            return ToolUse(functions, "named", choice.function.name, parallel)
        return ToolUse(functions, choice or "auto", parallel=parallel)  # OpenAI's default with tools: auto

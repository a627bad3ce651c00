"""The OpenAI routes' response bodies as Pydantic models, for the OpenAPI document (the routes
build them as dicts in ``shapes``; the schema-driven fuzz test checks that the two agree)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

FinishReason = Literal["stop", "length", "tool_calls"]


class ModelCard(BaseModel):
    id: str = Field(description="the served model name (--served-model-name, else the model path)")
    object: Literal["model"]
    created: int
    owned_by: str
    root: str = Field(description="the model path")
    max_model_len: int = Field(description="context length in tokens")


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelCard]


class CachedTokens(BaseModel):
    cached_tokens: int = Field(description="prompt tokens read from the prefix cache")


class Usage(BaseModel):
    prompt_tokens: int = Field(description="each prompt counted once, however many choices (n) it has")
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: CachedTokens


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None] = Field(description="null for the first prompt token (echo)")
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None
    finish_reason: FinishReason | None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class CompletionChunk(BaseModel):
    """One server-sent event of a streamed completion; a last one with ``usage`` and no choices
    when ``stream_options.include_usage``."""

    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[TokenLogprob]


class CalledFunction(BaseModel):
    name: str
    arguments: str = Field(description="a JSON object, as text")


class MessageToolCall(BaseModel):
    id: str
    type: Literal["function"]
    function: CalledFunction


class AssistantMessage(BaseModel):
    role: Literal["assistant"]
    content: str | None = Field(description="null when the message is only tool calls")
    reasoning_content: str | None = Field(None, description="the model's reasoning (with --reasoning-parser)")
    tool_calls: list[MessageToolCall] | None = None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None
    finish_reason: FinishReason | None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class FunctionDelta(BaseModel):
    name: str | None = None
    arguments: str | None = None


class ToolCallDelta(BaseModel):
    """A call's first delta has its index, id, type, name and empty arguments; the next, its arguments."""

    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: FunctionDelta


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None
    finish_reason: FinishReason | None


class ChatCompletionChunk(BaseModel):
    """One server-sent event of a streamed chat completion; a last one with ``usage`` and no
    choices when ``stream_options.include_usage``."""

    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


EXAMPLES: dict[str, dict[str, Any]] = {
    "chat": {"model": "default", "messages": [{"role": "user", "content": "Name three colours."}],
             "max_tokens": 32, "temperature": 0},
    "completion": {"model": "default", "prompt": "The capital of France is", "max_tokens": 8, "temperature": 0},
}

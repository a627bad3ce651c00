"""The Anthropic routes' response bodies and error envelope as Pydantic models, for the OpenAPI
document (the routes build them as dicts; the schema-driven fuzz test checks that the two agree)."""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, Field, RootModel

StopReason = Literal["end_turn", "max_tokens", "stop_sequence", "tool_use"]

ErrorType = Literal["invalid_request_error", "authentication_error", "permission_error", "not_found_error",
                    "request_too_large", "rate_limit_error", "api_error", "overloaded_error"]


class ErrorDetail(BaseModel):
    type: ErrorType
    message: str = Field(description="what went wrong; names the field at fault")


class AnthropicError(BaseModel):
    """Anthropic's error envelope (also an ``error`` event of a failed stream)."""

    type: Literal["error"]
    error: ErrorDetail


class TextBlock(BaseModel):
    type: Literal["text"]
    text: str


class ThinkingBlock(BaseModel):
    type: Literal["thinking"]
    thinking: str = Field(description="the model's reasoning (with --reasoning-parser)")
    signature: str = Field(description="always empty: this server signs nothing")


class ToolUseBlock(BaseModel):
    type: Literal["tool_use"]
    id: str
    name: str
    input: dict[str, Any] = Field(description="the call's arguments ({} in a stream's content_block_start)")


Block = Annotated[Union[TextBlock, ThinkingBlock, ToolUseBlock], Field(discriminator="type")]


class AnthropicUsage(BaseModel):
    input_tokens: int = Field(description="the whole prompt (the automatic prefix cache is not Anthropic's prompt caching)")
    output_tokens: int


class MessageResponse(BaseModel):
    id: str
    type: Literal["message"]
    role: Literal["assistant"]
    model: str
    content: list[Block]
    stop_reason: StopReason | None
    stop_sequence: str | None = Field(description="the stop sequence that ended the message, if one did")
    usage: AnthropicUsage


class CountTokensResponse(BaseModel):
    input_tokens: int


class MessageStart(BaseModel):
    type: Literal["message_start"]
    message: MessageResponse


class ContentBlockStart(BaseModel):
    type: Literal["content_block_start"]
    index: int
    content_block: Block


class TextDelta(BaseModel):
    type: Literal["text_delta"]
    text: str


class ThinkingDelta(BaseModel):
    type: Literal["thinking_delta"]
    thinking: str


class InputJsonDelta(BaseModel):
    type: Literal["input_json_delta"]
    partial_json: str


class ContentBlockDelta(BaseModel):
    type: Literal["content_block_delta"]
    index: int
    delta: Annotated[Union[TextDelta, ThinkingDelta, InputJsonDelta], Field(discriminator="type")]


class ContentBlockStop(BaseModel):
    type: Literal["content_block_stop"]
    index: int


class Ping(BaseModel):
    type: Literal["ping"]


class StopFields(BaseModel):
    stop_reason: StopReason
    stop_sequence: str | None


class OutputTokens(BaseModel):
    output_tokens: int


class MessageDelta(BaseModel):
    type: Literal["message_delta"]
    delta: StopFields
    usage: OutputTokens


class MessageStop(BaseModel):
    type: Literal["message_stop"]


class MessageStreamEvent(RootModel[Annotated[Union[MessageStart, ContentBlockStart, ContentBlockDelta,
                                                    ContentBlockStop, Ping, MessageDelta, MessageStop,
                                                    AnthropicError], Field(discriminator="type")]]):
    """One server-sent event of a streamed message (``event: <type>`` then ``data: <this>``)."""


EXAMPLES: dict[str, dict[str, Any]] = {
    "messages": {"model": "default", "max_tokens": 32, "messages": [{"role": "user", "content": "Name three colours."}]},
    "count_tokens": {"model": "default", "messages": [{"role": "user", "content": "Name three colours."}]},
}

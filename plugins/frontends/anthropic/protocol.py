"""Anthropic Messages request bodies as Pydantic models, and their conversion to chat-template
messages (strict types, unknown fields ignored: see ``sglang_core.server.bodies``)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field

from sglang_core.server.bodies import SGLangSampling, StrictBody


class ImageSource(StrictBody):
    type: Literal["base64", "url"] | None = None  # checked when used: a refused block names itself first
    media_type: str | None = None
    data: str | None = None
    url: str | None = None

    def image_data(self, where: str) -> str:
        """The image as the engine's ``image_data`` takes it: a data URL, or the URL."""
        if self.type is None:
            raise ValueError(f"{where}.type: Field required")
        if self.type == "url":
            if self.url is None:
                raise ValueError(f"{where}.url: Field required")
            return self.url
        if self.data is None or self.media_type is None:
            raise ValueError(f"{where}: a base64 source needs media_type and data")
        return f"data:{self.media_type};base64,{self.data}"


class ContentBlock(StrictBody):
    """One block of a message's (or the system prompt's) content. ``text`` and, for a model that
    takes images, ``image`` can be served; the rest are parsed so that the error names them."""

    type: str
    text: str | None = None
    source: ImageSource | None = None


class Message(StrictBody):
    role: Literal["user", "assistant"]
    content: str | list[ContentBlock]


class Conversation(StrictBody):
    """What ``/v1/messages/count_tokens`` reads: the model's input, without generation settings."""

    model: str
    messages: list[Message]
    system: str | list[ContentBlock] | None = None
    tools: list[Any] | None = None
    tool_choice: dict[str, Any] | None = None
    thinking: dict[str, Any] | None = None

    def check_supported(self) -> None:
        if self.tools:
            raise ValueError("tools: tool use is not supported")
        if self.tool_choice is not None and self.tool_choice.get("type") not in ("auto", "none"):
            raise ValueError("tool_choice: tool use is not supported")
        if self.thinking is not None and self.thinking.get("type") != "disabled":
            raise ValueError("thinking: extended thinking is not supported")

    def chat(self, image_token: str | None = None) -> tuple[list[dict[str, str]], str, list[str]]:
        """The conversation as chat-template messages, the assistant prefill (the text of a final
        assistant turn, which the model continues; ``""`` when the last turn is the user's) and the
        images, in order, each written as ``image_token`` in its message (None: the model takes no
        images). Consecutive turns of one role are joined into one, as Anthropic does."""
        if not self.messages:
            raise ValueError("messages: at least one message is required")
        if self.messages[0].role != "user":  # chat templates expect the conversation to open with the user
            raise ValueError("messages.0.role: the first message must use the user role")
        turns: list[dict[str, str]] = []
        images: list[str] = []
        if self.system:
            turns.append({"role": "system", "content": _text(self.system, "system")})
        for i, message in enumerate(self.messages):
            text = _text(message.content, f"messages.{i}.content", image_token, images)
            last = i == len(self.messages) - 1
            if not text and not (last and message.role == "assistant"):
                raise ValueError(f"messages.{i}: all messages must have non-empty content except for the "
                                 "optional final assistant message")
            if turns and turns[-1]["role"] == message.role:
                turns[-1]["content"] += "\n" + text
            else:
                turns.append({"role": message.role, "content": text})
        if turns[-1]["role"] != "assistant":
            return turns, "", images
        prefill = turns.pop()["content"]
        # Anthropic's rule: the model continues the text as is, and a trailing space would be a
        # token boundary the model rarely produces itself.
        if prefill != prefill.rstrip():
            raise ValueError("messages: final assistant content cannot end with trailing whitespace")
        return turns, prefill, images


def _text(content: str | list[ContentBlock], where: str, image_token: str | None = None,
          images: list[str] | None = None) -> str:
    """A content string, or its text blocks joined by newlines, each image block written as
    ``image_token`` and its source appended to ``images``; any other block is a 400 naming it."""
    if isinstance(content, str):
        return content
    texts = []
    for j, block in enumerate(content):
        if block.type == "image" and image_token is not None and images is not None:
            if block.source is None:
                raise ValueError(f"{where}.{j}.source: Field required")
            images.append(block.source.image_data(f"{where}.{j}.source"))
            texts.append(image_token)
            continue
        if block.type == "image":
            raise ValueError(f"{where}.{j}: image content is not supported: this server's model reads text only")
        if block.type != "text":
            raise ValueError(f"{where}.{j}: {block.type!r} content blocks are not supported (text only)")
        if block.text is None:
            raise ValueError(f"{where}.{j}.text: Field required")
        texts.append(block.text)
    return "\n".join(texts)


class MessagesRequest(Conversation, SGLangSampling):
    """A ``/v1/messages`` body: Anthropic's fields, plus SGLang's extensions (``regex``,
    ``json_schema``, ``min_p``, ``ignore_eos``, ``stop_token_ids``, ... as our OpenAI frontend
    takes them) and the penalties, which Anthropic's API lacks; a request without them is served
    as Anthropic does."""

    max_tokens: int = Field(ge=1)
    stop_sequences: list[Annotated[str, Field(min_length=1)]] | None = None
    temperature: float | None = Field(None, ge=0, le=1)
    top_p: float | None = Field(None, ge=0, le=1)
    top_k: int | None = Field(None, ge=1)
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    stream: bool = False
    metadata: dict[str, Any] | None = None  # accepted and ignored: it only tags requests at Anthropic

    def check_supported(self) -> None:
        super().check_supported()
        self.constraint()  # two constraints are a 400 before the prompt is built

    def sampling_params(self, max_new_tokens: int) -> dict[str, Any]:
        """The engine's sampling params (None: unset), before ``validated_params``."""
        return {"max_new_tokens": max_new_tokens, "temperature": self.temperature, "top_p": self.top_p,
                "top_k": self.top_k, "stop": self.stop_sequences, "frequency_penalty": self.frequency_penalty,
                "presence_penalty": self.presence_penalty, **self.sglang_params()}

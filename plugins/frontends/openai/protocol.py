"""OpenAI request bodies as Pydantic models (strict, unknown fields ignored: see
``sglang_core.server.bodies``)."""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import Field

from sglang_core.server.bodies import SGLangSampling, StrictBody as _Body


class StreamOptions(_Body):
    include_usage: bool = False


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

    model: str | None = None
    n: int = Field(1, ge=1, le=128)
    temperature: float | None = None
    top_p: float | None = None
    stop: str | list[str] | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    seed: int | None = None
    logit_bias: dict[str, float] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    top_k: int | None = None  # an SGLang extension; the others come from SGLangSampling
    response_format: ResponseFormat | None = None

    @property
    def include_usage(self) -> bool:
        return self.stream and self.stream_options is not None and self.stream_options.include_usage

    def constraint(self) -> dict[str, str]:
        """The output constraint as sampling params: SGLang's ``regex`` / ``json_schema``, or
        OpenAI's ``response_format`` (``json_object``: any JSON object)."""
        fmt = self.response_format
        given = [name for name, value in (("regex", self.regex), ("json_schema", self.json_schema),
                                          ("response_format", fmt if fmt and fmt.type != "text" else None))
                 if value is not None]
        if len(given) > 1:
            raise ValueError(f"{given[1]}: give only one of regex, json_schema and response_format")
        if fmt is None or fmt.type == "text":
            return super().constraint()
        if fmt.type == "json_object":
            return {"json_schema": json.dumps({"type": "object"})}
        if fmt.json_schema is None or fmt.json_schema.schema_ is None:
            raise ValueError("response_format.json_schema.schema: required for type 'json_schema'")
        return {"json_schema": json.dumps(fmt.json_schema.schema_)}

    def check_supported(self) -> None:
        """Raise ``ValueError("<field>: ...")`` for a feature this server does not have yet."""
        if (self.model_extra or {}).get("ebnf") is not None:
            raise ValueError("ebnf: grammar constraints are not supported yet (regex and json_schema are)")
        self.constraint()


class CompletionRequest(SamplingRequest):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=0)  # null: as many as the context leaves
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None

    def check_supported(self) -> None:
        super().check_supported()
        if self.suffix:
            raise ValueError("suffix: is not supported")
        if self.best_of is not None and self.best_of != self.n:
            raise ValueError(f"best_of: only best_of == n is supported, got best_of={self.best_of}, n={self.n}")


class ImageUrl(_Body):
    url: str
    detail: Literal["auto", "low", "high"] | None = None  # one resolution per model: accepted, not used


class ContentPart(_Body):
    type: str
    text: str = ""
    image_url: ImageUrl | None = None


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None

    def for_template(self, index: int, image_token: str | None = None) -> tuple[dict[str, Any], list[str]]:
        """The message as chat templates expect it (text content as one string, each image as the
        model's ``image_token``) and the URLs of its images, in order."""
        content, images = self.content, []
        if isinstance(content, list):
            texts = []
            for j, part in enumerate(content):
                if part.type == "image_url":
                    if image_token is None:
                        raise ValueError(f"messages.{index}.content.{j}: this model takes no images")
                    if part.image_url is None:
                        raise ValueError(f"messages.{index}.content.{j}.image_url: required for type 'image_url'")
                    texts.append(image_token)
                    images.append(part.image_url.url)
                elif part.type == "text":
                    texts.append(part.text)
                else:
                    raise ValueError(f"messages.{index}.content.{j}: {part.type!r} content is not supported "
                                     "(text and image_url)")
            content = "\n".join(texts)
        message = self.model_dump(exclude_none=True)
        # Templates know "system"; "developer" is OpenAI's newer name for it.
        message.update(role="system" if self.role == "developer" else self.role, content=content or "")
        return message, images


class ChatRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=0)
    max_completion_tokens: int | None = Field(None, ge=0)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[Any] | None = None
    tool_choice: Any = None
    add_generation_prompt: bool = True

    @property
    def max_tokens_field(self) -> tuple[str, int | None]:
        """Which of the two length fields the client used, and its value."""
        if self.max_completion_tokens is not None:
            return "max_completion_tokens", self.max_completion_tokens
        return "max_tokens", self.max_tokens

    def check_supported(self) -> None:
        super().check_supported()
        if self.tools:
            raise ValueError("tools: tool calling is not supported yet")
        if self.tool_choice not in (None, "none"):
            raise ValueError("tool_choice: tool calling is not supported yet")
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs: requires logprobs to be true")


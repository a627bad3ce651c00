"""Anthropic Messages request bodies as Pydantic models, and their conversion to chat-template
messages (strict types, unknown fields ignored: see ``sglang_core.server.bodies``)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field

from sglang_core.server.bodies import SGLangSampling, StrictBody

from sglang_plugins.frontends.tool_calling import Function, ToolUse


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
    """One block of a message's (or the system prompt's) content: ``text``, ``image`` (for a model
    that takes images), ``tool_use`` (an assistant's call), ``tool_result`` (the user's answer to
    one), ``thinking`` (an earlier answer's reasoning, not shown to the model again); the rest are
    parsed so that the error names them."""

    type: str
    text: str | None = None
    source: ImageSource | None = None  # image
    id: str | None = None  # tool_use
    name: str | None = None  # tool_use
    input: dict[str, Any] | None = None  # tool_use
    tool_use_id: str | None = None  # tool_result
    content: str | list[ContentBlock] | None = None  # tool_result
    is_error: bool | None = None  # tool_result


class Message(StrictBody):
    role: Literal["user", "assistant"]
    content: str | list[ContentBlock]


class ToolDefinition(StrictBody):
    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: str | None = None
    input_schema: dict[str, Any]
    type: str | None = None  # "custom" or none; Anthropic's own server tools cannot run here


class ToolChoice(StrictBody):
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None  # type "tool"
    disable_parallel_tool_use: bool | None = None


# Anthropic's tool_choice -> the tool-use modes of the frontends.
_MODES = {"auto": "auto", "any": "required", "tool": "named", "none": "none"}


class Conversation(StrictBody):
    """What ``/v1/messages/count_tokens`` reads: the model's input, without generation settings."""

    model: str = Field(description="accepted and ignored: the server serves one model")
    messages: list[Message] = Field(description="the conversation; a final assistant message is continued")
    system: str | list[ContentBlock] | None = Field(None, description="the system prompt (text blocks)")
    tools: list[ToolDefinition] | None = Field(None, description="custom tools the model may call")
    tool_choice: ToolChoice | None = Field(None, description="default: auto")
    thinking: dict[str, Any] | None = Field(
        None, description='{"type": "enabled"} or {"type": "disabled"}: the chat template\'s enable_thinking '
                          "(Qwen3); enabled needs --reasoning-parser, which returns reasoning as thinking blocks; "
                          "budget_tokens ignored")

    def check_supported(self) -> None:
        self.tool_use()
        if self.thinking is not None and self.thinking.get("type") not in ("enabled", "disabled"):
            raise ValueError(f"thinking.type: must be 'enabled' or 'disabled', got {self.thinking.get('type')!r}")

    @property
    def thinking_enabled(self) -> bool:
        return self.thinking is not None and self.thinking.get("type") == "enabled"

    def template_variables(self) -> dict[str, Any]:
        """The chat template's variables this request sets: ``thinking`` switches templates that
        let the model think or not (``enable_thinking``: Qwen3's); templates without it ignore it."""
        return {} if self.thinking is None else {"enable_thinking": self.thinking_enabled}

    def tool_use(self) -> ToolUse | None:
        """The request's tools and tool choice (None: no tools); ValueError naming the field for
        a server tool, a choice naming no tool, or a forced choice without tools."""
        functions = []
        for i, tool in enumerate(self.tools or ()):
            if tool.type not in (None, "custom"):
                raise ValueError(f"tools.{i}.type: {tool.type!r} is a tool Anthropic's servers run; this server "
                                 "runs none (custom tools only)")
            if tool.input_schema.get("type") != "object":
                raise ValueError(f"tools.{i}.input_schema.type: must be 'object'")
            if any(f.name == tool.name for f in functions):
                raise ValueError(f"tools.{i}.name: {tool.name!r} is given twice")
            functions.append(Function(tool.name, tool.input_schema, tool.description))
        choice = self.tool_choice or ToolChoice(type="auto")
        if not functions:
            if choice.type not in ("auto", "none"):
                raise ValueError(f"tool_choice.type: {choice.type!r} needs tools")
            return None
        if choice.type == "tool" and not any(f.name == choice.name for f in functions):
            raise ValueError(f"tool_choice.name: no tool named {choice.name!r} in tools")
        return ToolUse(functions, _MODES[choice.type], choice.name if choice.type == "tool" else None,
                       parallel=not choice.disable_parallel_tool_use)

    def chat(self, image_token: str | None = None) -> tuple[list[dict[str, Any]], str, list[str]]:
        """The conversation as chat-template messages, the assistant prefill (the text of a final
        assistant turn, which the model continues; ``""`` when the last turn is the user's) and the
        images, in order, each written as ``image_token`` in its message (None: the model takes no
        images).
        Consecutive text turns of one role are joined into one, as Anthropic does; an assistant's
        ``tool_use`` blocks become its ``tool_calls``, a user's ``tool_result`` blocks ``tool``
        messages (before the user's text, as Anthropic orders them)."""
        if not self.messages:
            raise ValueError("messages: at least one message is required")
        if self.messages[0].role != "user":  # chat templates expect the conversation to open with the user
            raise ValueError("messages.0.role: the first message must use the user role")
        turns: list[dict[str, Any]] = []
        images: list[str] = []
        if self.system:
            turns.append({"role": "system", "content": _text(self.system, "system")})
        for i, message in enumerate(self.messages):
            text, calls, results = _blocks(message.content, f"messages.{i}.content", message.role, image_token,
                                           images)
            last = i == len(self.messages) - 1
            if calls and last:
                raise ValueError(f"messages.{i}: a final assistant message cannot hold tool_use: its "
                                 "results come in a user message")
            if not (text or calls or results) and not (last and message.role == "assistant"):
                raise ValueError(f"messages.{i}: all messages must have non-empty content except for the "
                                 "optional final assistant message")
            turns += results
            if calls:
                turns.append({"role": "assistant", "content": text, "tool_calls": calls})
            elif text or not results:
                if turns and turns[-1]["role"] == message.role and "tool_calls" not in turns[-1]:
                    turns[-1]["content"] += "\n" + text
                else:
                    turns.append({"role": message.role, "content": text})
        if turns[-1]["role"] != "assistant" or "tool_calls" in turns[-1]:
            return turns, "", images
        prefill = turns.pop()["content"]
        # Anthropic's rule: the model continues the text as is, and a trailing space would be a
        # token boundary the model rarely produces itself.
        if prefill != prefill.rstrip():
            raise ValueError("messages: final assistant content cannot end with trailing whitespace")
        return turns, prefill, images


def _blocks(content: str | list[ContentBlock], where: str, role: str, image_token: str | None = None,
            images: list[str] | None = None) -> tuple[str, list[dict[str, Any]], list[dict[str, Any]]]:
    """A message's content -> its text, its calls (assistant) and its tool results (user), in
    the chat template's terms; each image block is written as ``image_token`` and its source
    appended to ``images``."""
    if isinstance(content, str):
        return content, [], []
    texts, calls, results = [], [], []
    for j, block in enumerate(content):
        at = f"{where}.{j}"
        if block.type == "tool_use" and role == "assistant":
            for name in ("id", "name", "input"):
                if getattr(block, name) is None:
                    raise ValueError(f"{at}.{name}: Field required")
            calls.append({"id": block.id, "type": "function",
                          "function": {"name": block.name, "arguments": block.input}})
        elif block.type == "tool_result" and role == "user":
            if block.tool_use_id is None:
                raise ValueError(f"{at}.tool_use_id: Field required")
            result = _text(block.content or "", f"{at}.content")
            results.append({"role": "tool", "tool_call_id": block.tool_use_id,
                            "content": f"Error: {result}" if block.is_error else result})
        elif block.type == "image" and image_token is not None and images is not None:
            if block.source is None:
                raise ValueError(f"{at}.source: Field required")
            images.append(block.source.image_data(f"{at}.source"))
            texts.append(image_token)
        elif block.type not in ("thinking", "redacted_thinking") or role != "assistant":
            texts.append(_block_text(block, at))
    return "\n".join(texts), calls, results


def _text(content: str | list[ContentBlock], where: str) -> str:
    """A content string, or its text blocks joined by newlines; any other block is a 400 naming it."""
    if isinstance(content, str):
        return content
    return "\n".join(_block_text(block, f"{where}.{j}") for j, block in enumerate(content))


def _block_text(block: ContentBlock, where: str) -> str:
    if block.type == "image":
        raise ValueError(f"{where}: image content is not supported: this server's model reads text only")
    if block.type != "text":
        raise ValueError(f"{where}: {block.type!r} content blocks are not supported here")
    if block.text is None:
        raise ValueError(f"{where}.text: Field required")
    return block.text


class MessagesRequest(Conversation, SGLangSampling):
    """A ``/v1/messages`` body: Anthropic's fields, plus SGLang's extensions (``regex``,
    ``json_schema``, ``min_p``, ``ignore_eos``, ``stop_token_ids``, ... as our OpenAI frontend
    takes them) and the penalties, which Anthropic's API lacks; a request without them is served
    as Anthropic does."""

    max_tokens: int = Field(ge=1, description="most tokens to generate")
    stop_sequences: list[Annotated[str, Field(min_length=1)]] | None = Field(
        None, description="strings that end the message (reported as stop_sequence)")
    temperature: float | None = Field(None, ge=0, le=1, description="0: greedy; default 1")
    top_p: float | None = Field(None, ge=0, le=1)
    top_k: int | None = Field(None, ge=1)
    frequency_penalty: float | None = Field(None, description="SGLang extension",
                                            json_schema_extra={"minimum": -2, "maximum": 2})
    presence_penalty: float | None = Field(None, description="SGLang extension",
                                           json_schema_extra={"minimum": -2, "maximum": 2})
    stream: bool = Field(False, description="answer with Anthropic's server-sent events")
    metadata: dict[str, Any] | None = None  # accepted and ignored: it only tags requests at Anthropic

    def check_supported(self) -> None:
        super().check_supported()
        self.constraint()  # two constraints are a 400 before the prompt is built

    def sampling_params(self, max_new_tokens: int) -> dict[str, Any]:
        """The engine's sampling params (None: unset), before ``validated_params``."""
        return {"max_new_tokens": max_new_tokens, "temperature": self.temperature, "top_p": self.top_p,
                "top_k": self.top_k, "stop": self.stop_sequences, "frequency_penalty": self.frequency_penalty,
                "presence_penalty": self.presence_penalty, **self.sglang_params()}

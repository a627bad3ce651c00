"""What the hosted-API backends (OpenAI, LiteLLM, Anthropic, Vertex AI) share: checking what a
backend can do, when a server takes SGLang's extension fields and which GenParams they carry,
chat turns from a :class:`Prompt`, GenParams in OpenAI's request fields, accumulating a response
(whole or streamed) into a :class:`GenResult`, and the constrained chat ``select``.

Only the standard library and ``sglang_core`` are imported here; each SDK is imported by the
backend that needs it.
"""

from __future__ import annotations

import base64
import json
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator
from urllib.parse import urlparse

from sglang_core.choices import check_select_args
from sglang_core.lang.backend import GenParams, GenResult, LangBackend, Prompt, SelectResult, UnsupportedError

# The only method the chat paths accept: they pick by constrained generation, not by prompt
# logprobs, so no other normalisation can be honoured (see docs/plugins.md).
CHAT_SELECT_METHOD = "token_length_normalized"


def unsupported(backend: str, field_name: str, why: str) -> UnsupportedError:
    """An :class:`UnsupportedError` naming the field, as every backend words it."""
    return UnsupportedError(f"{field_name}: the {backend} backend {why}")


def resolve_sglang_extensions(value: bool | None, base_url: str | None, vendor_host: str) -> bool:
    """``sglang_extensions`` as given, or for None: on when ``base_url`` names a server other than
    the vendor's own API (``vendor_host``), which never takes SGLang's fields."""
    if value is None:
        return base_url is not None and urlparse(base_url).hostname != vendor_host
    if not isinstance(value, bool):
        raise ValueError(f"sglang_extensions: must be True, False or None, got {value!r}")
    return value


# GenParams fields our servers take as SGLang request fields, as sent. None: not asked for; a
# value that is the server's default (min_p or a penalty of 0, ignore_eos False) asks for nothing.
_SGLANG_FIELDS: dict[str, Callable[[GenParams], Any]] = {
    "regex": lambda p: p.regex, "json_schema": lambda p: p.json_schema, "top_k": lambda p: p.top_k,
    "min_p": lambda p: p.min_p or None, "ignore_eos": lambda p: p.ignore_eos or None,
    "stop_token_ids": lambda p: list(p.stop_token_ids) or None,
    "frequency_penalty": lambda p: p.frequency_penalty or None,
    "presence_penalty": lambda p: p.presence_penalty or None,
}


def sglang_fields(backend: str, params: GenParams, extensions: bool, names: Iterable[str]) -> dict[str, Any]:
    """The set GenParams among ``names`` (keys of ``_SGLANG_FIELDS``) as request-body fields for
    ``extra_body``. Without ``extensions`` a set one is an :class:`UnsupportedError` naming it,
    rather than silently dropped."""
    extra = {name: value for name in names if (value := _SGLANG_FIELDS[name](params)) is not None}
    if extra and not extensions:
        raise unsupported(backend, next(iter(extra)), "was not told the server takes SGLang's extra sampling "
                                                      "fields (pass sglang_extensions=True for an sglang-core "
                                                      "or SGLang server)")
    return extra


def parse_schema(params: GenParams) -> dict[str, Any] | None:
    """``params.json_schema`` (JSON text) as an object, or None."""
    if params.json_schema is None:
        return None
    try:
        schema = json.loads(params.json_schema)
    except (TypeError, json.JSONDecodeError) as exc:
        raise ValueError(f"json_schema: not valid JSON: {exc}") from None
    if not isinstance(schema, dict):
        raise ValueError("json_schema: must be a JSON object")
    return schema


def check_choices(backend: str, prompt: Prompt, choices: list[str], method: str, chat: bool) -> None:
    """``ValueError`` for a bad select call; ``UnsupportedError`` for a method a chat path cannot do."""
    # A chat path sends the conversation, which chat_turns checks, so its text is not checked here.
    check_select_args(prompt.text if not chat else "(conversation)", choices, method)
    if chat and method != CHAT_SELECT_METHOD:
        raise unsupported(backend, "method", f"picks a choice by constrained generation on chat models, so it "
                                             f"cannot score {method!r} (that needs prompt logprobs; use a "
                                             f"completion model or sgl.RuntimeEndpoint)")


def chat_turns(backend: str, prompt: Prompt) -> list[dict[str, Any]]:
    """The conversation a chat API continues: ``prompt.messages`` without the open (empty)
    assistant turn the program is generating into; for a program without roles, its text (and
    images) as one user turn, which the model answers.

    Chat APIs write a new assistant turn; they cannot continue a partial one or write as another
    role, so those programs get an :class:`UnsupportedError`.
    """
    if not prompt.messages and prompt.open_role is None:
        if not prompt.text.strip():
            raise ValueError("prompt: the program has written nothing for the model to answer")
        images = [{"type": "image", "image": image} for image in prompt.images]
        content = [{"type": "text", "text": prompt.text}, *images] if images else prompt.text
        return [{"role": "user", "content": content}]
    messages = list(prompt.messages)
    if prompt.open_role != "assistant" or not messages or messages[-1]["role"] != "assistant":
        raise unsupported(backend, "role", "generates only as the assistant of a chat: put gen/select inside "
                                           "`with s.assistant():` (or sgl.assistant(...))")
    partial = messages.pop()["content"]
    if (partial if isinstance(partial, str) else "".join(p.get("text", "") for p in partial)).strip():
        raise unsupported(backend, "role", "cannot continue a partly written assistant turn; gen must come "
                                           "first in the assistant turn")
    if not messages:
        raise ValueError("messages: the conversation is empty; write a user turn before generating")
    return messages


def openai_messages(backend: str, prompt: Prompt) -> list[dict[str, Any]]:
    """Chat turns in OpenAI's message format; images become ``image_url`` parts (data URLs)."""
    out = []
    for message in chat_turns(backend, prompt):
        content = message["content"]
        if not isinstance(content, str):
            content = [{"type": "text", "text": part["text"]} if part["type"] == "text" else
                       {"type": "image_url", "image_url": {"url": data_url(part["image"].data,
                                                                           part["image"].mime_type)}}
                       for part in content]
        out.append({"role": message["role"], "content": content})
    return out


def data_url(data: bytes, mime_type: str) -> str:
    return f"data:{mime_type};base64,{base64.b64encode(data).decode()}"


def openai_sampling(backend: str, params: GenParams, extensions: bool, chat: bool = True) -> dict[str, Any]:
    """GenParams -> keyword arguments of OpenAI's ``chat.completions.create`` (LiteLLM takes the
    same) or, with ``chat=False``, ``completions.create``.

    ``extensions``: the server takes SGLang's extra fields (``regex``, ``top_k``, ``min_p``,
    ``ignore_eos``, ``stop_token_ids``, and ``json_schema`` on completions, which have no
    ``response_format``), sent in ``extra_body``; without them those fields are an
    :class:`UnsupportedError` rather than silently dropped.
    """
    kwargs: dict[str, Any] = {name: value for name, value in (
        ("max_tokens", params.max_tokens), ("stop", list(params.stop) or None),
        ("temperature", params.temperature), ("top_p", params.top_p),
        ("frequency_penalty", params.frequency_penalty), ("presence_penalty", params.presence_penalty),
    ) if value is not None}
    schema = parse_schema(params)
    if schema is not None and chat:
        # OpenAI's structured outputs; our server maps response_format onto its json_schema.
        kwargs["response_format"] = {"type": "json_schema", "json_schema": {"name": "output", "schema": schema}}
    names = ("regex", *(() if chat else ("json_schema",)), "top_k", "min_p", "ignore_eos", "stop_token_ids")
    extra = sglang_fields(backend, params, extensions, names)
    extra.update(params.extra)
    if extra:
        kwargs["extra_body"] = extra
    return kwargs


def choice_regex(choices: list[str]) -> str:
    """A regex that matches exactly one of ``choices``."""
    return "(" + "|".join(re.escape(c) for c in choices) + ")"


def regex_select(backend: LangBackend, prompt: Prompt, choices: list[str], temperature: float,
                 method: str) -> SelectResult:
    """``select`` on a chat path whose server takes SGLang's ``regex``: one ``generate`` constrained
    to the alternation of the choices, so the model writes one of them verbatim."""
    check_choices(backend.name, prompt, choices, method, chat=True)
    # Enough tokens for the longest choice: a token holds at least one byte.
    budget = max(len(c.encode()) for c in choices) + 1
    result = backend.generate(prompt, GenParams(max_tokens=budget, temperature=temperature,
                                                regex=choice_regex(choices)))
    return picked(backend.name, choices, result.text, "regex")


def choice_schema(choices: list[str]) -> dict[str, Any]:
    """A JSON Schema whose instances are ``{"choice": <one of choices>}``."""
    return {"type": "object", "properties": {"choice": {"type": "string", "enum": list(choices)}},
            "required": ["choice"], "additionalProperties": False}


@dataclass
class Collector:
    """Accumulates a response, whole or chunk by chunk, into a :class:`GenResult`.

    ``finish_reason`` is ``{"type": "stop" | "length" | <the API's other reasons>}``. Logprobs
    are kept as ``(logprob, None, token_text)``, the native API's triples without the token id,
    which hosted APIs do not report.
    """

    text: str = ""
    meta: dict[str, Any] = field(default_factory=dict)

    def add_tool_calls(self, calls: list[Any] | None) -> None:
        """OpenAI's ``tool_calls`` of a message, or of a streamed delta (a call's first piece has
        its id and name, the next ones more of its arguments) into ``meta["tool_calls"]``."""
        listed = self.meta.setdefault("tool_calls", []) if calls else []
        for position, call in enumerate(calls or ()):
            index = getattr(call, "index", None)
            index = position if index is None else index
            if index == len(listed):
                listed.append({"id": call.id, "name": call.function.name, "arguments": ""})
            listed[index]["arguments"] += call.function.arguments or ""

    def add(self, text: str | None, finish_reason: str | None = None,
            logprobs: list[tuple[float, None, str]] | None = None,
            top_logprobs: list[list[tuple[float, None, str]]] | None = None) -> str:
        """Add one piece; returns its text ("" for none)."""
        self.text += text or ""
        if finish_reason is not None:
            # The engine's form, as every backend reports it; the API does not say which stop matched.
            self.meta["finish_reason"] = {"type": finish_reason}
        if logprobs:
            self.meta.setdefault("output_token_logprobs", []).extend(logprobs)
        if top_logprobs:
            self.meta.setdefault("output_top_logprobs", []).extend(top_logprobs)
        return text or ""

    def usage(self, prompt_tokens: int | None, completion_tokens: int | None, cached_tokens: int | None) -> None:
        for key, value in (("prompt_tokens", prompt_tokens), ("completion_tokens", completion_tokens),
                           ("cached_tokens", cached_tokens)):
            if value is not None:
                self.meta[key] = value

    def result(self) -> GenResult:
        return GenResult(self.text, dict(self.meta))


def add_openai_usage(collector: Collector, usage: Any) -> None:
    """OpenAI's ``usage`` object (LiteLLM's has the same fields), if the response has one."""
    if usage is None:
        return
    details = getattr(usage, "prompt_tokens_details", None)
    collector.usage(usage.prompt_tokens, usage.completion_tokens, getattr(details, "cached_tokens", None))


def add_chat_choice(collector: Collector, choice: Any, streamed: bool) -> str:
    """One chat choice (a whole ``message`` or a streamed ``delta``) into ``collector``."""
    body = choice.delta if streamed else choice.message
    collector.add_tool_calls(getattr(body, "tool_calls", None))
    entries = (getattr(choice, "logprobs", None) and choice.logprobs.content) or []
    return collector.add(
        getattr(body, "content", None), choice.finish_reason,
        [(e.logprob, None, e.token) for e in entries],
        [[(t.logprob, None, t.token) for t in e.top_logprobs or ()] for e in entries if e.top_logprobs],
    )


def chat_logprob_kwargs(params: GenParams) -> dict[str, Any]:
    """Chat APIs' logprob fields for ``return_logprob`` / ``top_logprobs_num``."""
    if not params.return_logprob:
        return {}
    return {"logprobs": True, **({"top_logprobs": params.top_logprobs_num} if params.top_logprobs_num else {})}


def tool_kwargs(params: GenParams) -> dict[str, Any]:
    """Chat APIs' ``tools`` and ``tool_choice`` (a tool's name: OpenAI's named choice)."""
    if not params.tools:
        return {}
    choice = params.tool_choice
    if choice not in (None, "auto", "none", "required"):
        choice = {"type": "function", "function": {"name": choice}}
    return {"tools": list(params.tools), **({} if choice is None else {"tool_choice": choice})}


class ChatCompletionsBackend(LangBackend):
    """A backend over an OpenAI-format chat API: subclasses provide :meth:`_create`.

    ``select`` is constrained generation: with ``sglang_extensions`` the output is constrained
    to a regex alternation of the choices (the model writes one of them verbatim), otherwise to
    the JSON ``{"choice": <enum>}`` through ``response_format`` (OpenAI's structured outputs).
    """

    supports_images = True
    supports_tools = True

    def __init__(self, model: str, sglang_extensions: bool):
        if not isinstance(model, str) or not model:
            raise ValueError(f"model: must be a non-empty string, got {model!r}")
        if not isinstance(sglang_extensions, bool):
            raise ValueError(f"sglang_extensions: must be True or False, got {sglang_extensions!r}")
        self.model = model
        self.sglang_extensions = sglang_extensions

    def _create(self, messages: list[dict[str, Any]], stream: bool, **kwargs: Any) -> Any:
        """Send one chat request; an OpenAI-shaped response, or an iterator of chunks."""
        raise NotImplementedError

    def _chat_kwargs(self, params: GenParams) -> dict[str, Any]:
        return {**openai_sampling(self.name, params, self.sglang_extensions), **chat_logprob_kwargs(params),
                **tool_kwargs(params)}

    def generate(self, prompt: Prompt, params: GenParams) -> GenResult:
        response = self._create(openai_messages(self.name, prompt), False, **self._chat_kwargs(params))
        collector = Collector()
        add_chat_choice(collector, response.choices[0], streamed=False)
        add_openai_usage(collector, response.usage)
        return collector.result()

    def generate_stream(self, prompt: Prompt, params: GenParams) -> Iterator[str | GenResult]:
        chunks = self._create(openai_messages(self.name, prompt), True, stream_options={"include_usage": True},
                              **self._chat_kwargs(params))
        collector = Collector()
        for chunk in chunks:
            if chunk.choices and (text := add_chat_choice(collector, chunk.choices[0], streamed=True)):
                yield text
            add_openai_usage(collector, getattr(chunk, "usage", None))
        yield collector.result()

    def select(self, prompt: Prompt, choices: list[str], temperature: float,
               method: str = CHAT_SELECT_METHOD) -> SelectResult:
        if self.sglang_extensions:
            return regex_select(self, prompt, choices, temperature, method)
        check_choices(self.name, prompt, choices, method, chat=True)
        # Enough tokens for the longest choice (a token holds at least one byte), plus JSON framing.
        budget = max(len(c.encode()) for c in choices) + 16
        response = self._create(openai_messages(self.name, prompt), False, max_tokens=budget, temperature=temperature,
                                response_format={"type": "json_schema", "json_schema": {
                                    "name": "choice", "schema": choice_schema(choices), "strict": True}})
        return picked(self.name, choices, _json_choice(response.choices[0].message.content or ""), "json_schema")


def _json_choice(text: str) -> str:
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return text
    return value.get("choice", text) if isinstance(value, dict) else text


def picked(backend: str, choices: list[str], answer: str, strategy: str) -> SelectResult:
    """The :class:`SelectResult` for a choice the model generated under a constraint; scores are
    1 for the pick and 0 for the others (no logprobs are involved)."""
    if answer not in choices:
        raise RuntimeError(f"select: the {backend} backend constrained the answer to the choices ({strategy}) but "
                           f"the API returned {answer!r}; the server does not enforce the constraint")
    index = choices.index(answer)
    return SelectResult(answer, index, [float(i == index) for i in range(len(choices))],
                        {"strategy": f"constrained generation ({strategy})"})

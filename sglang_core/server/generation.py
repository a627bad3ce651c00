"""What every generating frontend shares, whatever its wire format: chat messages -> prompt ids
through the chat template, prompt and length checks, sampling-param validation, and telling an
aborted engine request from a finished one."""

from __future__ import annotations

import inspect
from typing import Any

import jinja2

from sglang_core.engine_core import ModelInfo
from sglang_core.sampling.params import SamplingParams


class RequestAborted(Exception):
    """The engine ended a request early (aborted, out of memory, engine died)."""


def finish_reason(chunk: dict) -> dict | None:
    """An engine chunk's finish reason (None while running); an abort raises ``RequestAborted``,
    or ``ValueError`` (a 400) when the request itself was at fault (a constraint that cannot be
    compiled: ``status_code`` 400)."""
    reason = chunk["meta_info"]["finish_reason"]
    if reason is not None and reason["type"] == "abort":
        if reason.get("status_code") == 400:
            raise ValueError(reason.get("message") or "invalid request")
        raise RequestAborted(reason.get("message") or "aborted")
    return reason


def chat_prompt_ids(tokenizer: Any, messages: list[dict[str, Any]], template: str | None,
                    add_generation_prompt: bool = True, prefill: str = "",
                    tools: list[dict[str, Any]] | None = None,
                    chat_template_kwargs: dict[str, Any] | None = None) -> list[int]:
    """Render ``messages`` (``{"role", "content": str}``, and the tool-calling keys templates
    read: ``tool_calls``, ``tool_call_id``) with the chat template (``template``, or the
    tokenizer's when None) and tokenize; ``tools`` go to the template as its ``tools``,
    ``chat_template_kwargs`` as further variables (Qwen3's ``enable_thinking``); ``prefill`` is
    appended after the generation prompt, so the model continues an assistant turn that has
    already begun."""
    if template is None and not tokenizer.chat_template:
        raise ValueError("messages: the model's tokenizer has no chat template; start the server with "
                         "--chat-template (a Jinja file, or chatml or llama-3)")
    extra = chat_template_kwargs or {}
    for key in extra:
        if key in _reserved_template_variables(tokenizer):
            raise ValueError(f"chat_template_kwargs: {key!r} is set by the request itself, not a template variable")
    try:
        text = tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                             add_generation_prompt=add_generation_prompt, tools=tools, **extra)
    except (jinja2.TemplateError, ValueError) as exc:  # ValueError: transformers' own checks (no messages, ...)
        raise ValueError(f"messages: the chat template rejected them: {exc}") from None
    return tokenizer(text + prefill, add_special_tokens=False)["input_ids"]  # the template wrote any BOS itself


def _reserved_template_variables(tokenizer: Any) -> set[str]:
    """What a client's template variables must not set: ``messages`` and the arguments of the
    tokenizer's ``apply_chat_template`` (``tools``, ``add_generation_prompt``, ``tokenize``...)."""
    parameters = inspect.signature(tokenizer.apply_chat_template).parameters.values()
    return {"messages"} | {p.name for p in parameters if p.kind is not p.VAR_KEYWORD}


def check_prompt(ids: list[int], info: ModelInfo, prompt_field: str, max_tokens: int | None,
                 max_tokens_field: str) -> int:
    """Validate a tokenized prompt against the model; return the max_new_tokens to ask for."""
    if not ids:
        raise ValueError(f"{prompt_field}: must not be empty")
    if any(not 0 <= t < info.vocab_size for t in ids):
        raise ValueError(f"{prompt_field}: token ids must be in [0, {info.vocab_size})")
    room = info.context_len - len(ids)
    if room <= 0:
        raise ValueError(f"{prompt_field}: {len(ids)} tokens leave no room in the context length {info.context_len}")
    if max_tokens is None:
        return room
    if max_tokens > room:
        raise ValueError(f"{max_tokens_field}: {len(ids)} prompt tokens + {max_tokens_field}={max_tokens} exceed "
                         f"the context length {info.context_len}")
    return max_tokens


def validated_params(params: dict[str, Any], vocab_size: int, api_names: dict[str, str]) -> dict[str, Any]:
    """Drop unset (None) params and check the rest by the engine's own rules now, so a bad value
    is a 400 before any response (streamed or not) has begun. ``api_names`` maps SGLang names in
    the engine's messages to the fields the client sent (``max_new_tokens`` -> ``max_tokens``)."""
    params = {k: v for k, v in params.items() if v is not None}
    try:
        SamplingParams.from_dict(params).validate(vocab_size)
    except ValueError as exc:
        message = str(exc)
        for ours, theirs in api_names.items():
            message = message.replace(ours, theirs)
        raise ValueError(message) from None
    return params

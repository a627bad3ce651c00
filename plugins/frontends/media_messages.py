"""Chat messages for a model that takes images or videos, rendered as the chat template takes them.

The OpenAI and Anthropic frontends write each image (video) of a message as the model's image
(video) token in the message's text, its pieces joined by newlines: what a template that reads
string content takes. Checkpoints' own templates often read Hugging Face's content parts
(``[{"type": "text", "text": ...}, {"type": "image"}]``) instead: llava-hf's write nothing for a
string (neither its images nor its text), Qwen2-VL's write the parts without the joining
newlines. A template that reads parts (it writes a probe part's text, not the part itself) gets
the messages as parts, as transformers renders them; any other the strings, as before."""

from __future__ import annotations

import functools
import re
from typing import Any

import jinja2

from sglang_core.server.generation import chat_prompt_ids

PROBE_TEXT = "probe-3f9c"


def media_chat_prompt_ids(tokenizer: Any, messages: list[dict[str, Any]], template: str | None,
                          tokens: list[str | None], **kwargs: Any) -> list[int]:
    """``chat_prompt_ids`` for a model whose media are written as ``tokens`` (its image token,
    its video token; None for a kind it does not take) in ``messages``' text."""
    kinds = {token: kind for kind, token in zip(("image", "video"), tokens) if token}
    if kinds and reads_content_parts(tokenizer, template):
        messages = [with_content_parts(message, kinds) for message in messages]
    return chat_prompt_ids(tokenizer, messages, template, **kwargs)


@functools.lru_cache(maxsize=8)
def reads_content_parts(tokenizer: Any, template: str | None) -> bool:
    """Whether ``template`` (None: the tokenizer's own) writes a text part's text (a template
    reading strings writes the part itself, as Python prints a dict, or fails)."""
    probe = [{"role": "user", "content": [{"type": "text", "text": PROBE_TEXT}]}]
    try:
        text = tokenizer.apply_chat_template(probe, chat_template=template, tokenize=False)
    except (jinja2.TemplateError, TypeError, ValueError):  # a template that cannot take parts at all
        return False
    return PROBE_TEXT in text and "'type'" not in text


def with_content_parts(message: dict[str, Any], kinds: dict[str, str]) -> dict[str, Any]:
    """``message`` with its string content as content parts: text, and one ``{"type": kind}`` per
    media token (``kinds``: token -> kind), the newline that joined a token to the text beside it dropped."""
    content = message.get("content")
    if not isinstance(content, str):
        return message
    pattern = re.compile("|".join(re.escape(token) for token in sorted(kinds, key=len, reverse=True)))
    parts: list[dict[str, str]] = []
    start = 0
    for match in pattern.finditer(content):
        _add_text(parts, content[start : match.start()], after_media=start > 0, before_media=True)
        parts.append({"type": kinds[match.group()]})
        start = match.end()
    _add_text(parts, content[start:], after_media=start > 0, before_media=False)
    return {**message, "content": parts}


def _add_text(parts: list[dict[str, str]], text: str, after_media: bool, before_media: bool) -> None:
    if after_media:
        text = text.removeprefix("\n")
    if before_media:
        text = text.removesuffix("\n")
    if text:
        parts.append({"type": "text", "text": text})

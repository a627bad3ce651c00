"""Chat messages holding images or videos, rendered as the checkpoint's chat template takes them.

The OpenAI and Anthropic frontends write each image (video) of a message as the model's image
(video) token in the message's text, its pieces joined by newlines: what a template that reads
string content takes. Checkpoints' own templates often read Hugging Face's content parts
(``[{"type": "text", "text": ...}, {"type": "image"}]``) instead: LLaVA's write nothing for a
string, Qwen2-VL's write the parts without the joining newlines. So the parts are rendered first
and kept where the template wrote every image and video token of the request; otherwise the
string form, as before."""

from __future__ import annotations

import re
from typing import Any

from sglang_core.server.generation import chat_prompt_ids


def media_chat_prompt_ids(tokenizer: Any, messages: list[dict[str, Any]], template: str | None,
                          tokens: dict[str, str], counts: dict[str, int], **kwargs: Any) -> list[int]:
    """``chat_prompt_ids`` for ``messages`` whose text holds media: ``tokens`` maps each kind
    ("image", "video") to the token written for one, ``counts`` to how many the request has."""
    tokens = {kind: token for kind, token in tokens.items() if token and counts.get(kind)}
    if tokens:
        parts = [with_content_parts(message, tokens) for message in messages]
        try:
            ids = chat_prompt_ids(tokenizer, parts, template, **kwargs)
        except ValueError:  # a template that cannot take content parts
            ids = None
        if ids is not None:
            text = tokenizer.decode(ids)
            if all(text.count(token) == counts[kind] for kind, token in tokens.items()):
                return ids
    return chat_prompt_ids(tokenizer, messages, template, **kwargs)


def with_content_parts(message: dict[str, Any], tokens: dict[str, str]) -> dict[str, Any]:
    """``message`` with its string content as content parts: text, and one ``{"type": kind}`` per
    token, the newline that joined a token to the text beside it dropped."""
    content = message.get("content")
    if not isinstance(content, str):
        return message
    kinds = {token: kind for kind, token in tokens.items()}
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

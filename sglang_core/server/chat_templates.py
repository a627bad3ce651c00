"""Built-in chat templates for ``--chat-template NAME``, for models whose tokenizer has none."""

from __future__ import annotations

from pathlib import Path

BUILTIN: dict[str, str] = {
    "chatml": (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    ),
    "llama-3": (
        "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
        "{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
        "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
    ),
}


def resolve_chat_template(spec: str | None) -> str | None:
    """``--chat-template``: a built-in name or a Jinja file -> the template; None -> None (use
    the tokenizer's). Raises ``ValueError`` naming the choices for anything else."""
    if spec is None:
        return None
    if spec in BUILTIN:
        return BUILTIN[spec]
    path = Path(spec).expanduser()
    if path.is_file():
        return path.read_text()
    raise ValueError(f"chat_template: {spec!r} is neither a file nor a built-in template "
                     f"({', '.join(sorted(BUILTIN))})")


def role_markers(tokenizer, template: str | None = None) -> dict | None:
    """The chat template (``template``, else the tokenizer's) as text around each role's content:
    ``{"role_prefix": {role: str}, "role_suffix": {role: str}, "stop": [str]}``, for clients that
    write roles into a completion prompt (the frontend language). ``stop`` ends an assistant turn.

    Found by rendering conversations whose contents are markers and cutting the text at them, so
    it works for any template whose turns are rendered independently of each other; None when
    there is no template or it cannot render these conversations (e.g. it forbids a system turn).
    """
    if template is None and not getattr(tokenizer, "chat_template", None):
        return None
    mark = [f"SGLMARK{i}X" for i in range(5)]
    roles = ["system", "user", "assistant", "user", "assistant"]

    def cut(count: int) -> list[str]:
        """Render the first ``count`` turns; the text between consecutive markers."""
        messages = [{"role": r, "content": m} for r, m in zip(roles[:count], mark[:count])]
        text = tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False)
        pieces = []
        for m in mark[:count]:
            before, found, text = text.partition(m)
            if not found:
                raise ValueError(f"marker {m} was not rendered")
            pieces.append(before)
        return pieces + [text]

    try:
        full = cut(5)  # head, sys->user, user->assistant, assistant->user, user->assistant, tail
        after_user = cut(2)[-1]
    except Exception:  # a template that refuses these turns: the client falls back to plain text
        return None
    head, between_su, between_ua, between_au, _, assistant_suffix = full
    if not (between_au.startswith(assistant_suffix) and between_ua.startswith(after_user)):
        return None
    user_prefix = between_au[len(assistant_suffix):]
    if not between_su.endswith(user_prefix):
        return None
    bos = getattr(tokenizer, "bos_token", None)
    # Tokenizing the prompt adds the BOS itself where the tokenizer does so; don't write it twice.
    if bos and head.startswith(bos) and tokenizer("x")["input_ids"][:1] == [tokenizer.bos_token_id]:
        head = head[len(bos):]
    prefix = {"system": head, "user": user_prefix, "assistant": between_ua[len(after_user):]}
    suffix = {"system": between_su[: len(between_su) - len(user_prefix)], "user": after_user,
              "assistant": assistant_suffix}
    stop = assistant_suffix.strip()
    return {"role_prefix": prefix, "role_suffix": suffix, "stop": [stop] if stop else []}

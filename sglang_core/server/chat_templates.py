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

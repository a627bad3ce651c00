"""Loading a model's tokenizer and the token ids that end generation."""

from __future__ import annotations

import json
from pathlib import Path


def load_tokenizer(path: Path | str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception as exc:
        raise ValueError(f"cannot load a tokenizer from {path}: {exc}") from exc


def eos_token_ids(tokenizer, model_folder: Path | str) -> set[int]:
    """The tokenizer's EOS plus every ``eos_token_id`` of generation_config.json / config.json."""
    ids: set[int] = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    for name in ("generation_config.json", "config.json"):
        file = Path(model_folder) / name
        if file.is_file():
            value = json.loads(file.read_text()).get("eos_token_id")
            ids.update(int(v) for v in (value if isinstance(value, list) else [value]) if v is not None)
    return ids

"""Loading a model's tokenizer and the token ids that end generation."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path


def load_tokenizer(path: Path | str):
    from transformers import AutoTokenizer

    try:
        # Never the checkpoint's own tokenizer code (nor an interactive prompt asking whether to run it):
        # transformers then reads tokenizer.json with its generic class.
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)
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


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def has_tokenizer(folder: Path | str) -> bool:
    return any((Path(folder) / name).is_file() for name in TOKENIZER_FILES)


def placeholder_tokenizer(vocab_size: int, eos_token_id: int | None) -> Path:
    """A folder holding a stand-in tokenizer of ``vocab_size`` tokens (``<t0>``, ``<t1>``, ...).

    For ``--load-format dummy`` with a bare config folder: random weights make text meaningless
    anyway, but requests (token ids in, ids and text out) then run as with a real model.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    eos = eos_token_id if eos_token_id is not None else vocab_size - 1
    folder = Path.home() / ".cache" / "sglang_core" / "placeholder_tokenizers" / f"vocab{vocab_size}-eos{eos}"
    if has_tokenizer(folder):
        return folder
    vocab = {f"<t{i}>": i for i in range(vocab_size)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<t0>"))
    tok.pre_tokenizer = pre_tokenizers.Split(pattern=">", behavior="merged_with_previous")
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=f"<t{eos}>", unk_token="<t0>")
    staging = folder.with_name(folder.name + f".tmp{os.getpid()}")
    fast.save_pretrained(staging)
    try:
        os.replace(staging, folder)  # atomic: a concurrent process sees all of it or none
    except OSError:  # another process made it first
        shutil.rmtree(staging, ignore_errors=True)
    return folder

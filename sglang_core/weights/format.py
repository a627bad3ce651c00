"""What a weight-format plugin provides (hook ``register_weight_formats``).

A format turns what the user named with ``--model-path`` (a file or a folder) into a folder
holding ``config.json`` and the tokenizer, and into ``(Hugging Face name, tensor)`` pairs read
one tensor at a time, which the model's ``load_weights`` consumes. The built-in formats are
``safetensors`` (``plugins/weights/safetensors``) and ``gguf`` (``plugins/weights/gguf``).
"""

from __future__ import annotations

import abc
from pathlib import Path
from typing import Iterator

import torch


class WeightFormat(abc.ABC):
    """One checkpoint format, built as ``cls()`` (no arguments)."""

    @abc.abstractmethod
    def claims(self, path: Path) -> bool:
        """Whether ``--load-format auto`` should read ``path`` (a file or a folder) with this format:
        a cheap look at names, never a full read. Among the formats that claim a path the one
        registered with the highest ``priority`` wins."""

    def config_folder(self, path: Path) -> Path:
        """The folder with ``config.json`` and the tokenizer for ``path``: by default ``path``
        itself, a Hugging Face folder. A format whose files carry the config themselves (GGUF)
        writes such a folder once and returns it. Raise ``ValueError`` for a path it cannot read."""
        if not (path.is_dir() and (path / "config.json").is_file()):
            raise ValueError(f"model_path {str(path)!r} has no config.json (is it a Hugging Face model folder?)")
        return path

    @abc.abstractmethod
    def iter_weights(self, path: Path) -> Iterator[tuple[str, torch.Tensor]]:
        """Every tensor of the checkpoint at ``path`` as ``(Hugging Face name, tensor)``, read and
        yielded one at a time so a large checkpoint is never in memory whole. Raise ``ValueError``
        naming the file for unreadable data."""

"""Find a model's folder and config, and stream its weights (safetensors or dummy)."""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from torch import nn


@dataclass(frozen=True)
class ModelSource:
    folder: Path  # holds config.json (and weights + tokenizer unless dummy)
    load_format: str  # "safetensors" or "dummy"
    origin: str  # what the user named (or the embedded default)


def resolve_model_source(model_path: str | None, load_format: str) -> ModelSource:
    """Turn ``--model-path``/``--load-format`` into a folder to load, converting GGUF once."""
    if model_path is None:
        from sglang_core.weights.default_model import default_model_path

        return ModelSource(default_model_path(), _weights_format(load_format), "SmolLM2-135M-Instruct")
    path = Path(model_path).expanduser()
    if not path.exists():
        raise ValueError(f"model_path {model_path!r} does not exist (expected a Hugging Face folder or a .gguf file; "
                         "no model hub is reached)")
    if path.is_file():
        if path.suffix != ".gguf" and load_format != "gguf":
            raise ValueError(f"model_path {model_path!r} is a file; only .gguf files are loadable as files")
        return ModelSource(gguf_to_cached_folder(path), _weights_format(load_format), str(path))
    if load_format == "gguf":
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) != 1:
            raise ValueError(f"model_path {model_path!r}: load_format gguf needs exactly one .gguf file, found {len(ggufs)}")
        return ModelSource(gguf_to_cached_folder(ggufs[0]), "safetensors", str(path))
    if not (path / "config.json").is_file():
        raise ValueError(f"model_path {model_path!r} has no config.json (is it a Hugging Face model folder?)")
    if load_format != "dummy" and not glob.glob(str(path / "*.safetensors")):
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return ModelSource(gguf_to_cached_folder(ggufs[0]), "safetensors", str(path))
        raise ValueError(f"model_path {model_path!r} has no *.safetensors weights (use --load-format dummy for random weights)")
    return ModelSource(path, _weights_format(load_format), str(path))


def gguf_to_cached_folder(path: Path) -> Path:
    from sglang_core.weights.default_model import gguf_to_cached_folder as convert

    return convert(path)


def _weights_format(load_format: str) -> str:
    return "dummy" if load_format == "dummy" else "safetensors"


def load_config(folder: Path):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(str(folder), local_files_only=True)
    except Exception as exc:
        raise ValueError(f"cannot read the model config in {folder}: {exc}") from exc


def iter_safetensors(folder: Path) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import safe_open

    files = sorted(glob.glob(os.path.join(folder, "*.safetensors")))
    if not files:
        raise ValueError(f"no *.safetensors files in {folder}")
    for file in files:
        try:
            with safe_open(file, framework="pt") as f:
                for name in f.keys():
                    yield name, f.get_tensor(name)
        except (OSError, RuntimeError) as exc:
            raise ValueError(f"cannot read weights from {file}: {exc}") from exc


def init_dummy_weights(model: nn.Module, seed: int) -> None:
    """Random weights of the right shapes, for speed work: small normal noise, norms at one."""
    generators: dict[torch.device, torch.Generator] = {}
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name:
                param.fill_(1.0)
                continue
            # Generate on the parameter's device: an 8B model's noise made on the host is slow to move.
            gen = generators.setdefault(param.device, torch.Generator(device=param.device).manual_seed(seed))
            param.normal_(0.0, 0.02, generator=gen)

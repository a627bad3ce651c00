"""Read a Hugging Face folder's ``*.safetensors`` files, tensor by tensor (memory-mapped, no pickle)."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import torch

from sglang_core.weights.format import WeightFormat


class SafetensorsFormat(WeightFormat):
    def claims(self, path: Path) -> bool:
        return path.is_dir() and any(path.glob("*.safetensors"))

    def iter_weights(self, path: Path) -> Iterator[tuple[str, torch.Tensor]]:
        from safetensors import safe_open

        files = sorted(path.glob("*.safetensors"))
        if not files:
            raise ValueError(f"no *.safetensors files in {path}")
        for file in files:
            try:
                with safe_open(str(file), framework="pt") as f:
                    for name in f.keys():
                        yield name, f.get_tensor(name)
            except (OSError, RuntimeError) as exc:
                raise ValueError(f"cannot read weights from {file}: {exc}") from exc

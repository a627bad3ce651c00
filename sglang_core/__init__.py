"""sglang-core: a small-core, plugin-based LLM serving engine."""

from typing import Any

__all__ = ["Engine", "EngineSettings"]


def __getattr__(name: str) -> Any:
    # Lazy, so that `sglang-core plugins` and plugin discovery do not import torch.
    if name == "Engine":
        from sglang_core.engine import Engine

        return Engine
    if name == "EngineSettings":
        from sglang_core.config import EngineSettings

        return EngineSettings
    raise AttributeError(name)

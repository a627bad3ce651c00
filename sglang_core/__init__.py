"""sglang-core: a small-core, plugin-based LLM serving engine."""

from typing import Any

__all__ = ["Engine", "EngineSettings"]  # plus the frontend language's names (sglang_core.lang.__all__)


def __getattr__(name: str) -> Any:
    # Lazy, so that `sglang-core plugins` and plugin discovery do not import torch.
    if name == "Engine":
        from sglang_core.engine import Engine

        return Engine
    if name == "EngineSettings":
        from sglang_core.config import EngineSettings

        return EngineSettings
    # The frontend language, `import sglang_core as sgl; sgl.gen(...)`: torch-free, so also lazy
    # only to keep plain `import sglang_core` minimal.
    import sglang_core.lang

    if name in sglang_core.lang.__all__:
        return getattr(sglang_core.lang, name)
    raise AttributeError(name)

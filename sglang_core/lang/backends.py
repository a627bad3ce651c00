"""Building API backends by registry name, and the default backend programs run on.

The core imports no backend: ``sgl.OpenAI(...)`` looks ``"openai"`` up in the ``api_backends``
registry that plugins fill through ``register_api_backends`` and builds ``cls(*args, **kwargs)``.
"""

from __future__ import annotations

import os
import threading
from typing import Any

from sglang_core.lang.backend import LangBackend

_default: LangBackend | None = None
_default_lock = threading.Lock()


class BackendNotFoundError(ValueError):
    """No loaded plugin registers an API backend under the name asked for."""


def load_backend(name: str, *args: Any, **kwargs: Any) -> LangBackend:
    """Build the API backend registered as ``name`` (plugins chosen as for the engine:
    ``SGLANG_CORE_PLUGINS`` or every installed one)."""
    from sglang_core.plugins import PluginManager

    registry = PluginManager(os.environ.get("SGLANG_CORE_PLUGINS")).registry("api_backends")
    if name not in registry:
        known = ", ".join(sorted(registry.names())) or "none"
        raise BackendNotFoundError(f"backend: no API backend named {name!r} is registered (registered: {known}); "
                                   f"install or enable the plugin that provides it")
    backend = registry.get(name).load()(*args, **kwargs)
    if not isinstance(backend, LangBackend):
        raise TypeError(f"the API backend registered as {name!r} built a {type(backend).__name__}, "
                        f"not a sglang_core.lang.backend.LangBackend")
    return backend


def RuntimeEndpoint(url: str, api_key: str | None = None, **kwargs: Any) -> LangBackend:  # noqa: N802 (SGLang's name)
    """A running ``sglang-core serve`` (its native API) at ``url``."""
    return load_backend("runtime_endpoint", url, api_key=api_key, **kwargs)


def OpenAI(model: str, *args: Any, **kwargs: Any) -> LangBackend:  # noqa: N802
    """An OpenAI-compatible API (``base_url=``, ``api_key=``)."""
    return load_backend("openai", model, *args, **kwargs)


def Anthropic(model: str, *args: Any, **kwargs: Any) -> LangBackend:  # noqa: N802
    """Anthropic's Messages API."""
    return load_backend("anthropic", model, *args, **kwargs)


def LiteLLM(model: str, *args: Any, **kwargs: Any) -> LangBackend:  # noqa: N802
    """Any model LiteLLM reaches."""
    return load_backend("litellm", model, *args, **kwargs)


def VertexAI(model: str, *args: Any, **kwargs: Any) -> LangBackend:  # noqa: N802
    """Google Vertex AI."""
    return load_backend("vertexai", model, *args, **kwargs)


def set_default_backend(backend: LangBackend) -> None:
    """The backend ``run`` / ``run_batch`` use when none is passed."""
    global _default
    if not isinstance(backend, LangBackend):
        raise ValueError(f"backend: expected an API backend (sgl.RuntimeEndpoint(...), ...), got {backend!r}")
    with _default_lock:
        _default = backend


def resolve_backend(backend: LangBackend | None) -> LangBackend:
    """``backend`` if given, else the default; a ``ValueError`` when there is neither."""
    if backend is None:
        backend = _default
        if backend is None:
            raise ValueError("backend: none given and no default set; call sgl.set_default_backend(...) "
                             "or pass backend=")
    if not isinstance(backend, LangBackend):
        raise ValueError(f"backend: expected an API backend, got {backend!r}")
    return backend

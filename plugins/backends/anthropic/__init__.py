"""Built-in API backend of the frontend language: Anthropic's Messages API through the official
``anthropic`` SDK (``sgl.Anthropic("claude-...")``; ``pip install 'sglang-core[anthropic]'``).
The SDK is imported only when a backend is built."""

from sglang_core.hookspecs import hookimpl


@hookimpl
def register_api_backends(register):
    register("anthropic", "sglang_plugins.backends.anthropic.backend:AnthropicBackend")

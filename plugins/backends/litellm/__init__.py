"""Built-in API backend plugin: ``sgl.LiteLLM`` (any provider LiteLLM reaches). The backend module,
and the ``litellm`` SDK it needs, are imported only when a program builds one."""

from sglang_core.hookspecs import hookimpl


@hookimpl
def register_api_backends(register):
    register("litellm", "sglang_plugins.backends.litellm.backend:LiteLLMBackend")

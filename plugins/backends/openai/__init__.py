"""Built-in API backend plugin: ``sgl.OpenAI`` (OpenAI's API or any server that speaks it). The
backend module, and the ``openai`` SDK it needs, are imported only when a program builds one."""

from sglang_core.hookspecs import hookimpl


@hookimpl
def register_api_backends(register):
    register("openai", "sglang_plugins.backends.openai.backend:OpenAIBackend")

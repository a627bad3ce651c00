"""Built-in frontend plugin: OpenAI-compatible ``/v1/models``, ``/v1/completions`` and
``/v1/chat/completions``. The routes module is imported only when the server mounts it."""

from sglang_core.hookspecs import hookimpl


@hookimpl
def register_frontends(register):
    register("openai", "sglang_plugins.frontends.openai.routes:mount")

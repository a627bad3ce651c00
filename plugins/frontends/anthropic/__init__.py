"""Built-in frontend plugin: Anthropic's Messages API, ``POST /v1/messages``, so the official
``anthropic`` client works against this server. The routes module is imported only when mounted."""

from sglang_core.hookspecs import hookimpl


@hookimpl
def register_frontends(register):
    register("anthropic", "sglang_plugins.frontends.anthropic.routes:mount")

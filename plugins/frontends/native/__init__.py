"""Built-in frontend: SGLang's native HTTP API (``/generate`` and the server-management routes),
wire-compatible with SGLang 0.2.10 so its clients work unchanged."""

from sglang_core.hookspecs import hookimpl


@hookimpl
def register_frontends(register):
    register("native", "sglang_plugins.frontends.native.routes:mount")

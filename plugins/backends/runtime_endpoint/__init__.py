"""Built-in API backend: ``sgl.RuntimeEndpoint(url)``, a running ``sglang-core serve`` reached
through its native API (``/generate``, ``/get_model_info``)."""

from sglang_core.hookspecs import hookimpl


@hookimpl
def register_api_backends(register):
    register("runtime_endpoint", "sglang_plugins.backends.runtime_endpoint.backend:RuntimeEndpoint")

"""Built-in model plugin: Mixtral (8x7B, 8x22B)."""

from sglang_core.hookspecs import hookimpl


@hookimpl
def register_models(register):
    register("MixtralForCausalLM", "sglang_plugins.models.mixtral.model:MixtralForCausalLM")

"""Built-in model plugin: StarCoder2."""

from sglang_core.hookspecs import hookimpl


@hookimpl
def register_models(register):
    register("Starcoder2ForCausalLM", "sglang_plugins.models.starcoder2.model:Starcoder2ForCausalLM")

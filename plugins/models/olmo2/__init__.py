"""Built-in model plugin: OLMo 2."""

from sglang_core.hookspecs import hookimpl


@hookimpl
def register_models(register):
    register("Olmo2ForCausalLM", "sglang_plugins.models.olmo2.model:Olmo2ForCausalLM")

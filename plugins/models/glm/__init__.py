"""Built-in model plugin: GLM-4 (GLM-4-9B in transformers' format, GLM-4-0414 and GLM-Z1)."""

from sglang_core.hookspecs import hookimpl


@hookimpl
def register_models(register):
    register("GlmForCausalLM", "sglang_plugins.models.glm.model:GlmForCausalLM")
    register("Glm4ForCausalLM", "sglang_plugins.models.glm.model:Glm4ForCausalLM")

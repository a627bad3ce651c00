"""Built-in model plugin: Cohere's Command-R family (Command-R, R+, R7B, Command A)."""

from sglang_core.hookspecs import hookimpl


@hookimpl
def register_models(register):
    register("CohereForCausalLM", "sglang_plugins.models.cohere.model:CohereForCausalLM")
    register("Cohere2ForCausalLM", "sglang_plugins.models.cohere.model:Cohere2ForCausalLM")

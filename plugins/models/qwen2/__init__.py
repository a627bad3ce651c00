"""Built-in model plugin: the Qwen family (Qwen 1.5, 2, 2.5 and 3)."""

from sglang_core.hookspecs import hookimpl


@hookimpl
def register_models(register):
    register("Qwen2ForCausalLM", "sglang_plugins.models.qwen2.model:Qwen2ForCausalLM")
    register("Qwen3ForCausalLM", "sglang_plugins.models.qwen2.model:Qwen3ForCausalLM")

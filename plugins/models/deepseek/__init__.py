"""Built-in model plugin: DeepSeek-V2 and DeepSeek-V3 (Multi-head Latent Attention)."""

from sglang_core.hookspecs import hookimpl


@hookimpl
def register_models(register):
    register("DeepseekV2ForCausalLM", "sglang_plugins.models.deepseek.model:DeepseekV2ForCausalLM")
    register("DeepseekV3ForCausalLM", "sglang_plugins.models.deepseek.model:DeepseekV3ForCausalLM")

"""Built-in model plugin: Qwen's MoE models (Qwen1.5-MoE, Qwen2-MoE, Qwen3-MoE)."""

from sglang_core.hookspecs import hookimpl

ARCHITECTURES = ("Qwen2MoeForCausalLM", "Qwen3MoeForCausalLM")


@hookimpl
def register_models(register):
    for arch in ARCHITECTURES:
        register(arch, f"sglang_plugins.models.qwen_moe.model:{arch}")

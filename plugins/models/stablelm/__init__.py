"""Built-in model plugin: StableLM (StableLM-3B-4E1T, StableLM 2 1.6B and 12B, Stable Code)."""

from sglang_core.hookspecs import hookimpl


@hookimpl
def register_models(register):
    register("StableLmForCausalLM", "sglang_plugins.models.stablelm.model:StableLmForCausalLM")

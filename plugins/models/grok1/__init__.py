"""Built-in model plugin: Grok-1 (checkpoints that ship their own modeling code)."""

from sglang_core.hookspecs import hookimpl


@hookimpl
def register_models(register):
    register("Grok1ModelForCausalLM", "sglang_plugins.models.grok1.model:Grok1ModelForCausalLM")

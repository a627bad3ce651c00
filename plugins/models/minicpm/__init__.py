"""Built-in model plugin: MiniCPM 1, 2 and 4 (checkpoints that ship their own modeling code)."""

from sglang_core.hookspecs import hookimpl


@hookimpl
def register_models(register):
    register("MiniCPMForCausalLM", "sglang_plugins.models.minicpm.model:MiniCPMForCausalLM")

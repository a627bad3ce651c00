"""Built-in model plugin: DBRX (Databricks' 132B MoE)."""

from sglang_core.hookspecs import hookimpl


@hookimpl
def register_models(register):
    register("DbrxForCausalLM", "sglang_plugins.models.dbrx.model:DbrxForCausalLM")

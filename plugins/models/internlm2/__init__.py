"""Built-in model plugin: InternLM2 and InternLM2.5 (checkpoints that ship their own modeling code)."""

from sglang_core.hookspecs import hookimpl


@hookimpl
def register_models(register):
    register("InternLM2ForCausalLM", "sglang_plugins.models.internlm2.model:InternLM2ForCausalLM")

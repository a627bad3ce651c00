"""Built-in model plugin: BigCode's GPTBigCode (StarCoder 1, StarCoderBase, SantaCoder, WizardCoder)."""

from sglang_core.hookspecs import hookimpl


@hookimpl
def register_models(register):
    register("GPTBigCodeForCausalLM", "sglang_plugins.models.gpt_bigcode.model:GPTBigCodeForCausalLM")

"""Built-in model plugin: the Llama family (Llama 2/3/3.1, Mistral, SmolLM2)."""

from sglang_core.hookspecs import hookimpl

ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM")


@hookimpl
def register_models(register):
    for arch in ARCHITECTURES:
        register(arch, f"sglang_plugins.models.llama.model:{arch}")

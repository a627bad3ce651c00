"""Built-in model plugin: the Gemma family (Gemma 1, Gemma 2, Gemma 3 text)."""

from sglang_core.hookspecs import hookimpl

ARCHITECTURES = ("GemmaForCausalLM", "Gemma2ForCausalLM", "Gemma3ForCausalLM")


@hookimpl
def register_models(register):
    for arch in ARCHITECTURES:
        register(arch, f"sglang_plugins.models.gemma.model:{arch}")

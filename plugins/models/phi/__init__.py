"""Built-in model plugin: Microsoft's Phi family (Phi-1, Phi-1.5, Phi-2; Phi-3, Phi-3.5, Phi-4-mini)."""

from sglang_core.hookspecs import hookimpl

ARCHITECTURES = ("PhiForCausalLM", "Phi3ForCausalLM")


@hookimpl
def register_models(register):
    for arch in ARCHITECTURES:  # each class is named after its architecture
        register(arch, f"sglang_plugins.models.phi.model:{arch}")

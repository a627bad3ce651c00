"""Built-in model plugin: IBM's Granite MoE models (Granite 3.0 1B-A400M / 3B-A800M, PowerMoE,
and the shared-expert variant)."""

from sglang_core.hookspecs import hookimpl

ARCHITECTURES = ("GraniteMoeForCausalLM", "GraniteMoeSharedForCausalLM")


@hookimpl
def register_models(register):
    for arch in ARCHITECTURES:
        register(arch, f"sglang_plugins.models.granitemoe.model:{arch}")

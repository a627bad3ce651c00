"""sglang-core plugin: IBM Granite (``GraniteForCausalLM``).

This module is what the entry point names, so it stays tiny: listing plugins
(``sglang-core plugins``) imports it, and the lazy ``"module:attr"`` target means the model code
(and torch work) is imported only when an engine actually serves a Granite checkpoint.
"""

from sglang_core.hookspecs import hookimpl


@hookimpl
def register_models(register):
    register("GraniteForCausalLM", "sglang_granite.model:GraniteForCausalLM")

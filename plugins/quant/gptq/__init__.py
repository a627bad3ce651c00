"""Built-in quantization plugin: GPTQ checkpoints (AutoGPTQ / GPTQModel, ``quant_method: gptq``)."""

from sglang_core.hookspecs import hookimpl


@hookimpl
def register_quant_methods(register):
    register("gptq", "sglang_plugins.quant.gptq.method:GPTQMethod")

"""Built-in quantization plugin: AutoAWQ checkpoints (``quant_method: awq``, GEMM packing)."""

from sglang_core.hookspecs import hookimpl


@hookimpl
def register_quant_methods(register):
    register("awq", "sglang_plugins.quant.awq.method:AWQMethod")

"""Built-in quantization plugin: compressed-tensors checkpoints (llm-compressor), whose config
groups may each follow another scheme: FP8 (``float-quantized``, through the fp8 plugin's
method), int8 weights and activations (``int-quantized``: W8A8, W8A16) and packed 4- or 8-bit
weights (``pack-quantized``: W4A16, W8A16)."""

from sglang_core.hookspecs import hookimpl


@hookimpl
def register_quant_methods(register):
    register("compressed-tensors", "sglang_plugins.quant.compressed_tensors.method:CompressedTensorsMethod")

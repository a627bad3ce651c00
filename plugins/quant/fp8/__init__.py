"""FP8 (e4m3) linear layers: AutoFP8 ("fp8") checkpoints, block-wise ``weight_block_size`` ones
(DeepSeek-V3, Qwen3-FP8), and ``--quantization fp8`` on a 16/32-bit checkpoint (weights quantized
per output channel at load). compressed-tensors "float-quantized" groups load through the
compressed-tensors plugin, which builds this plugin's ``Fp8LinearMethod`` from each group's
``compressed_tensors_scheme``."""

from sglang_core.hookspecs import hookimpl


@hookimpl
def register_quant_methods(register):
    register("fp8", "sglang_plugins.quant.fp8.method:Fp8LinearMethod")

"""AutoAWQ "GEMM" checkpoints: 4-bit weights with a zero point and a scale per group of input
features.

Tensors of a linear layer with ``in`` input and ``out`` output features, group size ``g``:
``qweight`` int32 ``[in, out/8]``, ``qzeros`` int32 ``[in/g, out/8]``, ``scales`` ``[in/g, out]``.
An int32 packs 8 neighbouring output features, but not in order: its 4-bit slots (bits 4i..4i+3,
i = 0..7) hold features 0, 2, 4, 6, 1, 3, 5, 7 of the 8. The weight is ``W[k, n] = (q[k, n] -
z[k // g, n]) * s[k // g, n]``.

CPU path: each forward dequantises the layer's weight from the packed tensors and runs a float
matmul (nothing is cached, so the model keeps its quantized size in memory).
"""

from __future__ import annotations

from typing import Any

import torch

from sglang_core.kernels import linear
from sglang_core.layers.quant import QuantMethod, weight_param
from sglang_plugins.quant.fused import all_parts_match
from sglang_plugins.quant.packing import config_value, require_bool, unpack_ints

BITS = 4
PACK = 32 // BITS


def unpack_awq(words: torch.Tensor) -> torch.Tensor:
    """``[rows, cols]`` int32 words -> ``[rows, cols * 8]`` 4-bit values in output-feature order."""
    rows, cols = words.shape
    # Slot 4h + k holds feature 2k + h (the order 0, 2, 4, 6, 1, 3, 5, 7): swapping h and k sorts them.
    slots = unpack_ints(words, BITS, dim=1).reshape(rows, cols, 2, PACK // 2)
    return slots.transpose(2, 3).reshape(rows, cols * PACK)


class AWQMethod(QuantMethod):
    def __init__(self, quant_config: Any, prefix: str):
        bits = config_value(quant_config, "bits", config_value(quant_config, "w_bit"))
        if bits != BITS:
            raise ValueError(f"quantization_config.bits must be {BITS} for AWQ, not {bits!r}")
        group = config_value(quant_config, "group_size", config_value(quant_config, "q_group_size"))
        if not isinstance(group, int) or isinstance(group, bool) or group <= 0:
            raise ValueError(f"quantization_config.group_size must be a positive integer for AWQ, not {group!r}")
        if not require_bool(quant_config, "zero_point", True):
            raise ValueError("quantization_config.zero_point false (symmetric AWQ) is not supported")
        version = str(config_value(quant_config, "version", "gemm")).lower()
        if version != "gemm":
            raise ValueError(f"quantization_config.version {version!r} is not supported; only 'gemm' packing is")
        skipped = config_value(quant_config, "modules_to_not_convert", None) or []
        if not isinstance(skipped, (list, tuple)):
            raise ValueError(f"quantization_config.modules_to_not_convert must be a list, not {skipped!r}")
        self.group_size = group
        self.modules_to_not_convert = tuple(skipped)

    @classmethod
    def for_layer(cls, quant_config: Any, prefix: str) -> AWQMethod | None:
        """None (left in float) when AutoAWQ's rule skips the layer: some listed name is a substring
        of the checkpoint module's path, of all the modules a fused layer stands for."""
        method = cls(quant_config, prefix)
        skipped = all_parts_match(prefix, lambda module: any(name in module for name in method.modules_to_not_convert),
                                  "modules_to_not_convert")
        return None if skipped else method

    def create_weights(self, layer, input_size, output_sizes, params_dtype, weight_loader) -> None:
        if input_size % self.group_size:
            raise ValueError(f"quantization_config.group_size {self.group_size} does not divide the layer's "
                             f"{input_size} input features")
        out, groups = sum(output_sizes), input_size // self.group_size
        if out % PACK:
            raise ValueError(f"AWQ packs {PACK} output features to an int32; {out} is not a multiple")
        packed = {"input_dim": 0, "output_dim": 1, "packed_dim": 1, "packed_factor": PACK}
        layer.qweight = weight_param(torch.zeros(input_size, out // PACK, dtype=torch.int32), weight_loader, **packed)
        layer.qzeros = weight_param(torch.zeros(groups, out // PACK, dtype=torch.int32), weight_loader, **packed)
        layer.scales = weight_param(torch.zeros(groups, out, dtype=params_dtype), weight_loader,
                                    input_dim=0, output_dim=1)

    def dequantized_weight(self, layer) -> torch.Tensor:
        """The layer's weight as ``[out, in]`` floats of the scales' dtype."""
        scales = layer.scales.float()
        zeros = unpack_awq(layer.qzeros).float()
        w = (unpack_awq(layer.qweight).float() - zeros.repeat_interleave(self.group_size, 0)) \
            * scales.repeat_interleave(self.group_size, 0)
        return w.t().to(layer.scales.dtype)

    def apply(self, layer, x, bias):
        return linear(x, self.dequantized_weight(layer).to(x.dtype), bias)

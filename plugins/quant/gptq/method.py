"""GPTQ checkpoints (AutoGPTQ, GPTQModel): 4- or 8-bit weights with a zero point and a scale per
group of input features.

Tensors of a linear layer with ``in`` input and ``out`` output features, ``p = 32 / bits`` values
per int32 (lowest bits first), ``G`` groups: ``qweight`` int32 ``[in/p, out]`` packed along the
input, ``qzeros`` int32 ``[G, out/p]`` packed along the output, ``scales`` ``[G, out]``, ``g_idx``
int32 ``[in]`` (the group of each input feature; with ``desc_act`` a shuffled assignment). The
weight is ``W[k, n] = (q[k, n] - z[g_idx[k], n]) * s[g_idx[k], n]``, where a checkpoint of
``checkpoint_format: gptq`` (the original one) stores every zero point less one, so ``z`` is the
stored value + 1; ``gptq_v2`` stores it as it is. ``sym`` needs no special case: a symmetric
checkpoint stores the middle value as every zero point.

Under tensor parallelism a row-parallel layer's rank holds a slice of the input features. Without
``desc_act`` its groups are a slice too; with ``desc_act`` the slice's features may belong to any
group, so every rank holds all groups' scales and zeros and looks them up by ``g_idx``.

CPU path: each forward dequantises the layer's weight from the packed tensors and runs a float
matmul (nothing is cached, so the model keeps its quantized size in memory).
"""

from __future__ import annotations

from typing import Any

import torch

from sglang_core.kernels import linear
from sglang_core.layers.quant import QuantMethod, weight_param
from sglang_plugins.quant.packing import config_value, rank_groups, require_bool, unpack_ints

SUPPORTED_BITS = (4, 8)
FORMAT_ZERO_OFFSET = {"gptq": 1, "gptq_v2": 0}


class GPTQMethod(QuantMethod):
    def __init__(self, quant_config: Any, prefix: str):
        bits = config_value(quant_config, "bits")
        if bits not in SUPPORTED_BITS:
            raise ValueError(f"quantization_config.bits must be one of {SUPPORTED_BITS} for GPTQ, not {bits!r}")
        group = config_value(quant_config, "group_size", -1)
        if not isinstance(group, int) or isinstance(group, bool) or (group <= 0 and group != -1):
            raise ValueError(f"quantization_config.group_size must be a positive integer or -1, not {group!r}")
        checkpoint_format = config_value(quant_config, "checkpoint_format", "gptq")
        if checkpoint_format not in FORMAT_ZERO_OFFSET:
            raise ValueError(f"quantization_config.checkpoint_format must be one of {sorted(FORMAT_ZERO_OFFSET)}, "
                             f"not {checkpoint_format!r}")
        if require_bool(quant_config, "is_marlin_format", False):
            raise ValueError("quantization_config.is_marlin_format true (Marlin's repacked layout) is not supported")
        require_bool(quant_config, "sym", True)  # validated only: the stored zero points say it all
        if require_bool(quant_config, "lm_head", False):
            raise ValueError("quantization_config.lm_head true (a quantized LM head) is not supported")
        if config_value(quant_config, "dynamic", None):
            raise ValueError("quantization_config.dynamic (GPTQModel's per-module overrides) is not supported")
        self.desc_act = require_bool(quant_config, "desc_act", False)
        self.bits, self.pack, self.group_size = bits, 32 // bits, group
        self.zero_offset = FORMAT_ZERO_OFFSET[checkpoint_format]
        self.prefix = prefix

    def create_weights(self, layer, input_size, output_sizes, params_dtype, weight_loader) -> None:
        out = sum(output_sizes)
        if input_size % self.pack or out % self.pack:
            raise ValueError(f"quantization_config.bits {self.bits} packs {self.pack} values to an int32; a layer of "
                             f"{input_size} inputs and {out} outputs does not pack")
        group_size = None if self.group_size == -1 else self.group_size
        groups, groups_split = rank_groups(layer, input_size, group_size, self.desc_act,
                                           "quantization_config.group_size")
        group_dim = 0 if groups_split else None
        layer.qweight = weight_param(torch.zeros(input_size // self.pack, out, dtype=torch.int32), weight_loader,
                                     input_dim=0, output_dim=1, packed_dim=0, packed_factor=self.pack)
        layer.qzeros = weight_param(torch.zeros(groups, out // self.pack, dtype=torch.int32), weight_loader,
                                    input_dim=group_dim, output_dim=1, packed_dim=1, packed_factor=self.pack)
        layer.scales = weight_param(torch.zeros(groups, out, dtype=params_dtype), weight_loader,
                                    input_dim=group_dim, output_dim=1)
        layer.g_idx = weight_param(torch.zeros(input_size, dtype=torch.int32), weight_loader, input_dim=0)

    def process_weights_after_loading(self, layer) -> None:
        if self.desc_act:
            return
        # Without desc_act the groups are looked up by position, so the checkpoint's g_idx must agree
        # (up to this rank's first group) or the weight would be silently wrong.
        g_idx = layer.g_idx.long()
        if not torch.equal(g_idx - g_idx[0], self.input_groups(layer)):
            raise ValueError(f"quantization_config.desc_act is false, but {self.prefix}.g_idx assigns input "
                             f"features to groups out of order (an act-order checkpoint?)")

    def input_groups(self, layer) -> torch.Tensor:
        """The group (row of ``scales``/``qzeros``) of each of this rank's input features."""
        if self.desc_act:
            return layer.g_idx.long()
        inputs = layer.g_idx.shape[0]
        if self.group_size == -1:
            return torch.zeros(inputs, dtype=torch.long, device=layer.g_idx.device)
        # Without desc_act groups are consecutive runs, and a rank's groups are its own slice.
        return torch.arange(inputs, device=layer.g_idx.device) // self.group_size

    def dequantized_weight(self, layer) -> torch.Tensor:
        """The layer's weight as ``[out, in]`` floats of the scales' dtype."""
        groups = self.input_groups(layer)
        zeros = unpack_ints(layer.qzeros, self.bits, dim=1).float() + self.zero_offset
        values = unpack_ints(layer.qweight, self.bits, dim=0).float()
        w = (values - zeros[groups]) * layer.scales.float()[groups]
        return w.t().to(layer.scales.dtype)

    def apply(self, layer, x, bias):
        return linear(x, self.dequantized_weight(layer).to(x.dtype), bias)

"""GPTQ checkpoints (AutoGPTQ, GPTQModel): 4- or 8-bit weights with a zero point and a scale per
group of input features.

Tensors of a linear layer with ``in`` input and ``out`` output features, ``p = 32 / bits`` values
per int32 (lowest bits first), ``G`` groups: ``qweight`` int32 ``[in/p, out]`` packed along the
input, ``qzeros`` int32 ``[G, out/p]`` packed along the output, ``scales`` ``[G, out]``, ``g_idx``
int32 ``[in]`` (the group of each input feature; with ``desc_act`` a shuffled assignment). The
weight is ``W[k, n] = (q[k, n] - z[g_idx[k], n]) * s[g_idx[k], n]``, where a checkpoint of
``checkpoint_format: gptq`` (the original one) stores every zero point less one, so ``z`` is the
stored value + 1; ``gptq_v2`` stores it as it is (transformers' GPTQConfig names the field
``format``). Words are int32 (GPTQModel's ``pack_dtype``). ``sym`` needs no special case: a
symmetric checkpoint stores the middle value as every zero point. With
``modules_in_block_to_quantize`` only the listed modules are packed, the rest float.

Under tensor parallelism a row-parallel layer's rank holds a slice of the input features. Without
``desc_act`` its groups are a slice too; with ``desc_act`` the slice's features may belong to any
group, so every rank holds all groups' scales and zeros and looks them up by ``g_idx``.

On CUDA a linear layer's forward is ``int_matmul``'s kernel, which dequantises in registers. CPU
path: each forward dequantises the layer's weight from the packed tensors and runs a float matmul
(nothing is cached, so the model keeps its quantized size in memory). An MoE layer's
experts are packed the same way, expert by expert (``GPTQExpertsMethod``); with ``lm_head: true``
(GPTQModel) the LM head too, split by vocabulary rows under tensor parallelism.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import torch

from sglang_core.kernels.moe_weight import QuantizedExperts
from sglang_core.layers.parallel import RowParallelLinear
from sglang_core.layers.quant import QuantMethod, weight_param
from sglang_plugins.quant.dummy import fill_group_index, fill_positive_scales, uniform_code_std
from sglang_plugins.quant.fused import all_parts_match
from sglang_plugins.quant.int_weight import IntWeight
from sglang_plugins.quant.packing import (DequantizingExpertsMethod, config_value, dequantize_packed_along_k,
                                          load_expert_part_vector, packed_linear, rank_groups, require_bool)

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
        # GPTQModel (and transformers before v5) name the format checkpoint_format; transformers'
        # GPTQConfig writes format, reading checkpoint_format over it where both are present.
        field = "checkpoint_format" if config_value(quant_config, "checkpoint_format") else "format"
        checkpoint_format = str(config_value(quant_config, field, "gptq")).lower()
        if checkpoint_format not in FORMAT_ZERO_OFFSET:
            raise ValueError(f"quantization_config.{field} must be one of {sorted(FORMAT_ZERO_OFFSET)}, "
                             f"not {checkpoint_format!r}")
        pack_dtype = config_value(quant_config, "pack_dtype", "int32")
        if pack_dtype != "int32":
            raise ValueError(f"quantization_config.pack_dtype {pack_dtype!r} is not supported; only int32 words are")
        if require_bool(quant_config, "is_marlin_format", False):
            raise ValueError("quantization_config.is_marlin_format true (Marlin's repacked layout) is not supported")
        require_bool(quant_config, "sym", True)  # validated only: the stored zero points say it all
        self.quantized_head = require_bool(quant_config, "lm_head", False)
        self.block_modules = _block_modules(config_value(quant_config, "modules_in_block_to_quantize"))
        if config_value(quant_config, "dynamic", None):
            raise ValueError("quantization_config.dynamic (GPTQModel's per-module overrides) is not supported")
        self.desc_act = require_bool(quant_config, "desc_act", False)
        self.bits, self.pack, self.group_size = bits, 32 // bits, group
        self.zero_offset = FORMAT_ZERO_OFFSET[checkpoint_format]
        self.prefix = prefix

    @classmethod
    def for_layer(cls, quant_config: Any, prefix: str) -> GPTQMethod | None:
        """None (left in float) for a layer ``modules_in_block_to_quantize`` leaves out: with that
        list, a module is quantized when its path ends with one of the names (optimum's rule), all
        the modules a fused layer stands for alike."""
        method = cls(quant_config, prefix)
        if method.block_modules is None:
            return method
        quantized = all_parts_match(prefix, lambda module: module.endswith(method.block_modules),
                                    "modules_in_block_to_quantize")
        return method if quantized else None

    @classmethod
    def for_embedding(cls, quant_config: Any, prefix: str) -> GPTQMethod | None:
        """GPTQModel's ``lm_head: true`` packs the (untied) LM head like a linear layer
        (``lm_head.qweight``, ...); input embedding tables stay float."""
        method = cls(quant_config, prefix)
        return method if prefix == "lm_head" and method.quantized_head else None

    @classmethod
    def for_experts(cls, quant_config: Any, prefix: str) -> GPTQExpertsMethod | None:
        """None (float experts) when ``modules_in_block_to_quantize`` names no expert's module."""
        method = cls(quant_config, prefix)
        if method.block_modules is not None and not any("experts" in name.split(".") for name in method.block_modules):
            return None
        return GPTQExpertsMethod(method)

    def create_weights(self, layer, input_size, output_sizes, params_dtype, weight_loader) -> None:
        ranks = layer.tp.size if isinstance(layer, RowParallelLinear) else 1
        for name, param in self.packed_params(input_size, sum(output_sizes), ranks, params_dtype, weight_loader).items():
            setattr(layer, name, param)
        layer.g_idx = weight_param(torch.zeros(input_size, dtype=torch.int32), weight_loader, input_dim=0)

    def packed_params(self, input_size: int, out: int, input_ranks: int, params_dtype: torch.dtype,
                      weight_loader: Callable[..., None], experts: int | None = None) -> dict[str, torch.nn.Parameter]:
        """``qweight``, ``qzeros`` and ``scales`` of a weight of ``input_size`` inputs (this rank's, of
        ``input_ranks`` ranks splitting them) and ``out`` outputs; with ``experts``, stacked
        ``[experts, ...]`` (the metadata is one expert's)."""
        if input_size % self.pack or out % self.pack:
            raise ValueError(f"quantization_config.bits {self.bits} packs {self.pack} values to an int32; a layer of "
                             f"{input_size} inputs and {out} outputs does not pack")
        group_size = None if self.group_size == -1 else self.group_size
        groups, groups_split = rank_groups(input_size, input_ranks, group_size, self.desc_act,
                                           "quantization_config.group_size")
        group_dim = 0 if groups_split else None
        lead = () if experts is None else (experts,)
        return {"qweight": weight_param(torch.zeros(*lead, input_size // self.pack, out, dtype=torch.int32),
                                        weight_loader, input_dim=0, output_dim=1, packed_dim=0,
                                        packed_factor=self.pack),
                "qzeros": weight_param(torch.zeros(*lead, groups, out // self.pack, dtype=torch.int32), weight_loader,
                                       input_dim=group_dim, output_dim=1, packed_dim=1, packed_factor=self.pack),
                "scales": weight_param(torch.zeros(*lead, groups, out, dtype=params_dtype), weight_loader,
                                       input_dim=group_dim, output_dim=1)}

    def own_dummy_params(self, layer: torch.nn.Module) -> set[str]:
        return {"scales", "g_idx"}

    def init_dummy_weights(self, layer: torch.nn.Module, generator: torch.Generator) -> None:
        self.init_dummy_tensors(layer.scales, layer.g_idx, generator)

    def init_dummy_tensors(self, scales: torch.Tensor, g_idx: torch.Tensor, generator: torch.Generator) -> None:
        """Positive ``scales`` ``[..., G, out]`` for the core's random codes and zero points, and a
        valid ``g_idx`` ``[..., in]``: in order, or shuffled with desc_act."""
        fill_positive_scales(scales, uniform_code_std(self.bits, random_zero_point=True), generator)
        fill_group_index(g_idx, scales.shape[-2], None if self.group_size == -1 else self.group_size, self.desc_act,
                         generator)

    def process_weights_after_loading(self, layer) -> None:
        self.check_g_idx(layer.g_idx, self.prefix)

    def check_g_idx(self, g_idx: torch.Tensor, name: str) -> None:
        """Without desc_act the groups are looked up by position, so the checkpoint's g_idx must agree
        (up to this rank's first group) or the weight would be silently wrong."""
        if self.desc_act:
            return
        g_idx = g_idx.long()
        if not torch.equal(g_idx - g_idx[0], self.input_groups(g_idx)):
            raise ValueError(f"quantization_config.desc_act is false, but {name}.g_idx assigns input "
                             f"features to groups out of order (an act-order checkpoint?)")

    def input_groups(self, g_idx: torch.Tensor) -> torch.Tensor:
        """The group (row of ``scales``/``qzeros``) of each of this rank's input features."""
        if self.desc_act:
            return g_idx.long()
        inputs = g_idx.shape[0]
        if self.group_size == -1:
            return torch.zeros(inputs, dtype=torch.long, device=g_idx.device)
        # Without desc_act groups are consecutive runs, and a rank's groups are its own slice.
        return torch.arange(inputs, device=g_idx.device) // self.group_size

    def dequantize(self, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
                   g_idx: torch.Tensor) -> torch.Tensor:
        """One weight's packed tensors as ``[out, in]`` floats of the scales' dtype."""
        return dequantize_packed_along_k(qweight, qzeros, scales, self.bits, self.zero_offset, self.input_groups(g_idx))

    def dequantized_weight(self, layer) -> torch.Tensor:
        """The layer's weight as ``[out, in]`` floats of the scales' dtype."""
        return self.dequantize(layer.qweight, layer.qzeros, layer.scales, layer.g_idx)

    def int_weight(self, layer) -> IntWeight:
        """The layer's packed tensors as the integer matmul kernel reads them."""
        return IntWeight(layer.qweight, layer.scales, self.bits, zeros=layer.qzeros,
                         zero_offset=self.zero_offset, group_size=None if self.group_size == -1 else self.group_size,
                         g_idx=layer.g_idx if self.desc_act else None)

    def apply(self, layer, x, bias):
        return packed_linear(self, layer, x, bias)


class GPTQExpertsMethod(DequantizingExpertsMethod):
    """An MoE layer's experts as GPTQ quantizes them (Qwen1.5-MoE-A2.7B-GPTQ-Int4): each expert's
    gate/up/down packed like a linear layer's (``experts.<e>.gate_proj.qweight``, ...), stacked
    into ``w13_qweight``, ``w2_scales``, ... Each part keeps its own ``g_idx`` (``w13_g_idx``
    ``[E, 2, H]``: with desc_act gate and up are ordered apart), so w13 dequantizes part by part.
    The fused kernel reads groups by position, so desc_act experts take the dequantizing path."""

    def __init__(self, method: GPTQMethod):
        self.method = method

    def create_weights(self, layer, num_experts, hidden_size, intermediate_size, params_dtype, weight_loader) -> None:
        # stem: (inputs, outputs, ranks splitting the inputs, parts); down's inputs are split as a row-parallel layer's.
        shapes = {"w13": (hidden_size, 2 * intermediate_size, 1, 2),
                  "w2": (intermediate_size, hidden_size, layer.tp.size, 1)}
        for stem, (inputs, out, input_ranks, parts) in shapes.items():
            params = self.method.packed_params(inputs, out, input_ranks, params_dtype, weight_loader, num_experts)
            for name, param in params.items():
                setattr(layer, f"{stem}_{name}", param)
            g_idx = weight_param(torch.zeros(num_experts, parts, inputs, dtype=torch.int32),
                                 functools.partial(load_expert_part_vector, layer.tp), input_dim=0)
            setattr(layer, f"{stem}_g_idx", g_idx)

    def own_dummy_params(self, layer: torch.nn.Module) -> set[str]:
        return {"w13_scales", "w13_g_idx", "w2_scales", "w2_g_idx"}

    def init_dummy_weights(self, layer: torch.nn.Module, generator: torch.Generator) -> None:
        for stem in ("w13", "w2"):
            self.method.init_dummy_tensors(getattr(layer, f"{stem}_scales"), getattr(layer, f"{stem}_g_idx"), generator)

    def process_weights_after_loading(self, layer) -> None:
        for stem in ("w13", "w2"):
            for expert, parts in enumerate(getattr(layer, f"{stem}_g_idx")):
                for g_idx in parts:
                    self.method.check_g_idx(g_idx, f"{self.method.prefix}.{expert}.{stem}")

    def fused_weight(self, layer, stem: str) -> QuantizedExperts | None:
        method = self.method
        if method.desc_act:
            return None
        qweight, qzeros, scales = (getattr(layer, f"{stem}_{name}").transpose(1, 2)
                                   for name in ("qweight", "qzeros", "scales"))
        group = None if method.group_size == -1 else method.group_size
        return QuantizedExperts(qweight, scales, "int", scale_cols=group, bits=method.bits, packed_dim=2, zeros=qzeros,
                                zero_offset=method.zero_offset)

    def dequantized(self, layer, stem: str, expert: int) -> torch.Tensor:
        qweight, qzeros, scales = (getattr(layer, f"{stem}_{name}")[expert] for name in ("qweight", "qzeros", "scales"))
        g_idx = getattr(layer, f"{stem}_g_idx")[expert]
        parts = g_idx.shape[0]
        out = scales.shape[1] // parts
        return torch.cat([self.method.dequantize(qweight.narrow(1, part * out, out),
                                                 qzeros.narrow(1, part * out // self.method.pack, out // self.method.pack),
                                                 scales.narrow(1, part * out, out), g_idx[part])
                          for part in range(parts)])


def _block_modules(lists: Any) -> tuple[str, ...] | None:
    """``modules_in_block_to_quantize`` (lists of module names within a block, quantized one list
    after another) as one tuple of names, or None (every linear layer quantized)."""
    if lists is None:
        return None
    if not isinstance(lists, list) or not all(isinstance(names, list) and all(isinstance(n, str) for n in names)
                                              for names in lists):
        raise ValueError(f"quantization_config.modules_in_block_to_quantize must be a list of lists of module names, "
                         f"not {lists!r}")
    return tuple(name for names in lists for name in names)

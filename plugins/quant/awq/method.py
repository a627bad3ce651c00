"""AutoAWQ "GEMM" checkpoints: 4-bit weights with a zero point and a scale per group of input
features.

Tensors of a linear layer with ``in`` input and ``out`` output features, group size ``g``:
``qweight`` int32 ``[in, out/8]``, ``qzeros`` int32 ``[in/g, out/8]``, ``scales`` ``[in/g, out]``
(group size -1: one group of all input features, as AutoAWQ packs it).
An int32 packs 8 neighbouring output features, but not in order: its 4-bit slots (bits 4i..4i+3,
i = 0..7) hold features 0, 2, 4, 6, 1, 3, 5, 7 of the 8. The weight is ``W[k, n] = (q[k, n] -
z[k // g, n]) * s[k // g, n]``.

After loading, a linear layer's words are repacked once, on its device, into GPTQ's layout
(``qweight`` ``[in/8, out]``: 8 consecutive input features a word, lowest bits first; ``qzeros``
``[in/g, out/8]`` in output order; same sizes, the originals freed) and the layer is computed as a
GPTQ layer is, with AWQ's zero points (the stored value, no offset). Words along K are what the
one-row GEMV (``int_gemv``) reads fastest: on AWQ's words it took 1.8x GPTQ's time at the same
shapes (H100, 2026-12-07), moving the 8 features' partial sums between warps. Every path reads
the one layout, so nothing depends on the device: on CUDA ``int_gemv`` (one row) or
``int_matmul`` (more), which dequantise in registers; on the CPU each forward dequantises the
layer's weight and runs a float matmul (nothing is cached, so the model keeps its quantized size
in memory). An MoE layer's experts are packed the same way, expert by expert
(``AWQExpertsMethod``), and kept as loaded: the fused MoE kernel reads AWQ's layout.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from sglang_core.kernels.moe_weight import QuantizedExperts
from sglang_core.layers.quant import QuantMethod, weight_param
from sglang_plugins.quant.dummy import fill_positive_scales, uniform_code_std
from sglang_plugins.quant.fused import all_parts_match
from sglang_plugins.quant.int_weight import IntWeight
from sglang_plugins.quant.packing import (DequantizingExpertsMethod, config_value, dequantize_packed_along_k,
                                          pack_ints, packed_linear, rank_groups, require_bool, unpack_ints)

BITS = 4
PACK = 32 // BITS
# The std of q - z for random codes and zero points, as the core's dummy init leaves them.
DUMMY_CODE_STD = uniform_code_std(BITS, random_zero_point=True)
REPACK_ROWS = 512  # input features repacked at a time: bounds the int64 values held beside the two layouts


def unpack_awq(words: torch.Tensor) -> torch.Tensor:
    """``[rows, cols]`` int32 words -> ``[rows, cols * 8]`` 4-bit values in output-feature order."""
    rows, cols = words.shape
    # Slot 4h + k holds feature 2k + h (the order 0, 2, 4, 6, 1, 3, 5, 7): swapping h and k sorts them.
    slots = unpack_ints(words, BITS, dim=1).reshape(rows, cols, 2, PACK // 2)
    return slots.transpose(2, 3).reshape(rows, cols * PACK)


def repack_along_k(qweight: torch.Tensor) -> torch.Tensor:
    """AWQ's ``[K, N/8]`` words -> ``[K/8, N]`` words of 8 consecutive input features each, in
    order (GPTQ's layout), on ``qweight``'s device."""
    k, cols = qweight.shape
    out = torch.empty(k // PACK, cols * PACK, dtype=torch.int32, device=qweight.device)
    for start in range(0, k, REPACK_ROWS):
        rows = unpack_awq(qweight[start:start + REPACK_ROWS])
        out[start // PACK:(start + rows.shape[0]) // PACK] = pack_ints(rows, BITS, dim=0)
    return out


class AWQMethod(QuantMethod):
    def __init__(self, quant_config: Any, prefix: str):
        bits = config_value(quant_config, "bits", config_value(quant_config, "w_bit"))
        if bits != BITS:
            raise ValueError(f"quantization_config.bits must be {BITS} for AWQ, not {bits!r}")
        group = config_value(quant_config, "group_size", config_value(quant_config, "q_group_size"))
        if not isinstance(group, int) or isinstance(group, bool) or (group <= 0 and group != -1):
            raise ValueError(f"quantization_config.group_size must be a positive integer or -1 for AWQ, "
                             f"not {group!r}")
        if not require_bool(quant_config, "zero_point", True):
            raise ValueError("quantization_config.zero_point false (symmetric AWQ) is not supported")
        # AutoAWQ names the packing version; transformers' AwqConfig writes it as format too, reading
        # version over format where both are present.
        field = "version" if config_value(quant_config, "version") else "format"
        packing = str(config_value(quant_config, field, "gemm")).lower()
        if packing != "gemm":
            raise ValueError(f"quantization_config.{field} {packing!r} is not supported; only 'gemm' packing is")
        skipped = config_value(quant_config, "modules_to_not_convert", None) or []
        if not isinstance(skipped, (list, tuple)):
            raise ValueError(f"quantization_config.modules_to_not_convert must be a list, not {skipped!r}")
        self.group_size = None if group == -1 else group  # None: one group of all input features
        self.modules_to_not_convert = tuple(skipped)

    @classmethod
    def for_layer(cls, quant_config: Any, prefix: str) -> AWQMethod | None:
        """None (left in float) when AutoAWQ's rule skips the layer: some listed name is a substring
        of the checkpoint module's path, of all the modules a fused layer stands for."""
        method = cls(quant_config, prefix)
        skipped = all_parts_match(prefix, lambda module: any(name in module for name in method.modules_to_not_convert),
                                  "modules_to_not_convert")
        return None if skipped else method

    @classmethod
    def for_experts(cls, quant_config: Any, prefix: str) -> AWQExpertsMethod | None:
        method = cls(quant_config, prefix)
        skipped = any(name in prefix for name in method.modules_to_not_convert)
        return None if skipped else AWQExpertsMethod(method)

    def create_weights(self, layer, input_size, output_sizes, params_dtype, weight_loader) -> None:
        if input_size % PACK:  # process_weights_after_loading packs 8 input features to a word
            raise ValueError(f"AWQ layers are repacked {PACK} input features to an int32; {input_size} inputs do not pack")
        for name, param in self.packed_params(input_size, sum(output_sizes), params_dtype, weight_loader).items():
            setattr(layer, name, param)

    def packed_params(self, input_size: int, out: int, params_dtype: torch.dtype, weight_loader: Callable[..., None],
                      experts: int | None = None) -> dict[str, torch.nn.Parameter]:
        """``qweight``, ``qzeros`` and ``scales`` of a weight of ``input_size`` inputs and ``out``
        outputs; with ``experts``, stacked ``[experts, ...]`` (the metadata is one expert's)."""
        # Groups split with the input features across row-parallel ranks; one group of all is whole on each.
        groups, groups_split = rank_groups(input_size, 1, self.group_size, False, "quantization_config.group_size")
        if out % PACK:
            raise ValueError(f"AWQ packs {PACK} output features to an int32; {out} is not a multiple")
        lead, group_dim = () if experts is None else (experts,), 0 if groups_split else None
        packed = {"output_dim": 1, "packed_dim": 1, "packed_factor": PACK}
        return {"qweight": weight_param(torch.zeros(*lead, input_size, out // PACK, dtype=torch.int32), weight_loader,
                                        input_dim=0, **packed),
                "qzeros": weight_param(torch.zeros(*lead, groups, out // PACK, dtype=torch.int32), weight_loader,
                                       input_dim=group_dim, **packed),
                "scales": weight_param(torch.zeros(*lead, groups, out, dtype=params_dtype), weight_loader,
                                       input_dim=group_dim, output_dim=1)}

    def own_dummy_params(self, layer: torch.nn.Module) -> set[str]:
        return {"scales"}

    def init_dummy_weights(self, layer: torch.nn.Module, generator: torch.Generator) -> None:
        fill_positive_scales(layer.scales, DUMMY_CODE_STD, generator)

    def dequantize(self, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
        """One weight's tensors in AWQ's layout (an expert's) as ``[out, in]`` floats of the scales' dtype."""
        group = qweight.shape[0] // scales.shape[0]
        zeros = unpack_awq(qzeros).float()
        w = (unpack_awq(qweight).float() - zeros.repeat_interleave(group, 0)) \
            * scales.float().repeat_interleave(group, 0)
        return w.t().to(scales.dtype)

    def process_weights_after_loading(self, layer) -> None:
        """AWQ's words -> GPTQ's layout (the module's docstring), replacing the loaded parameters."""
        layer.qweight = torch.nn.Parameter(repack_along_k(layer.qweight.data), requires_grad=False)
        layer.qzeros = torch.nn.Parameter(pack_ints(unpack_awq(layer.qzeros.data), BITS, dim=1), requires_grad=False)

    def dequantized_weight(self, layer) -> torch.Tensor:
        """The (repacked) layer's weight as ``[out, in]`` floats of the scales' dtype."""
        inputs = layer.qweight.shape[0] * PACK
        groups = torch.arange(inputs, device=layer.qweight.device) // (self.group_size or inputs)
        return dequantize_packed_along_k(layer.qweight, layer.qzeros, layer.scales, BITS, 0, groups)

    def int_weight(self, layer) -> IntWeight:
        """The (repacked) layer's tensors as the integer kernels read them."""
        return IntWeight(layer.qweight, layer.scales, BITS, zeros=layer.qzeros, group_size=self.group_size)

    def apply(self, layer, x, bias):
        return packed_linear(self, layer, x, bias)


class AWQExpertsMethod(DequantizingExpertsMethod):
    """An MoE layer's experts as AutoAWQ quantizes them: each expert's w1/w3/w2 packed like a
    linear layer's (``experts.<e>.w1.qweight``, ...), stacked into ``w13_qweight``, ``w2_scales``, ..."""

    def __init__(self, method: AWQMethod):
        self.method = method

    def create_weights(self, layer, num_experts, hidden_size, intermediate_size, params_dtype, weight_loader) -> None:
        for stem, (inputs, out) in {"w13": (hidden_size, 2 * intermediate_size),
                                    "w2": (intermediate_size, hidden_size)}.items():
            for name, param in self.method.packed_params(inputs, out, params_dtype, weight_loader, num_experts).items():
                setattr(layer, f"{stem}_{name}", param)

    def own_dummy_params(self, layer: torch.nn.Module) -> set[str]:
        return {"w13_scales", "w2_scales"}

    def init_dummy_weights(self, layer: torch.nn.Module, generator: torch.Generator) -> None:
        for stem in ("w13", "w2"):
            fill_positive_scales(getattr(layer, f"{stem}_scales"), DUMMY_CODE_STD, generator)

    def fused_weight(self, layer, stem: str) -> QuantizedExperts:
        # Gate's words never run into up's: the loader packs each part's outputs by whole words.
        qweight, qzeros, scales = (getattr(layer, f"{stem}_{name}").transpose(1, 2)
                                   for name in ("qweight", "qzeros", "scales"))
        return QuantizedExperts(qweight, scales, "int", scale_cols=self.method.group_size, bits=BITS, packed_dim=1,
                                interleaved=True, zeros=qzeros)

    def dequantized(self, layer, stem: str, expert: int) -> torch.Tensor:
        return self.method.dequantize(*(getattr(layer, f"{stem}_{name}")[expert]
                                        for name in ("qweight", "qzeros", "scales")))

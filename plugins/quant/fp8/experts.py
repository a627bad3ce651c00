"""FP8 (e4m3) routed experts of an MoE layer, as the linear layers' schemes store them per expert.

Checkpoint tensors per expert and projection (``experts.<e>.w1.weight``, ...): the e4m3 ``weight``
and, by scheme, ``weight_scale`` per tensor (Mixtral-FP8, compressed-tensors ``tensor``) or per
output channel, ``weight_scale_inv`` per block (DeepSeek-V3), ``input_scale`` for static
activations. As in the linear method, per-tensor scales stay one per part (gate and up of w13
each keep theirs) and become one per output row after loading; a static input scale is the
largest of the expert's gate and up scales for its gate_up input (one input, quantized once).

On CUDA (where ``fused_moe_activation`` names the gate's activation) the fused MoE kernel computes
the experts, dequantizing each e4m3 weight tile in registers to the activations' dtype: weight-only
FP8, the activations are not rounded to e4m3 (see ``kernels/fused_moe.py`` for why). CPU path: each
expert that got tokens is dequantized and computed in float, its inputs rounded to e4m3 as an FP8
grouped GEMM would (per token, per token and block-wide group, or by the static scale); experts no
token chose are not touched.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from sglang_core.layers.experts import EXPERT_PARTS, PART_SLOTS
from sglang_core.kernels.moe_weight import QuantizedExperts
from sglang_core.layers.moe import KernelExpertsMethod
from sglang_core.layers.quant import weight_param
from sglang_plugins.quant.fp8.block import dequantize_weight, quantize_dequantize_groups
from sglang_plugins.quant.fp8.dummy import fp8_dummy_params, init_dummy_fp8
from sglang_plugins.quant.fp8.e4m3 import FP8, FP8_MAX, MIN_SCALE, quantize, round_trip, token_scale
from sglang_plugins.quant.fp8.scheme import Fp8Scheme

def _load_part_scale(param: torch.Tensor, loaded: torch.Tensor, shard_id: tuple[int | None, str]) -> None:
    """One per-tensor scale per expert and part; ``expert_id`` None: one scale per expert, stacked."""
    expert, part = shard_id
    slots = PART_SLOTS[EXPERT_PARTS[part]]
    if expert is None:
        if loaded.numel() != param.shape[0]:
            raise ValueError(f"stacked per-tensor scales of shape {tuple(loaded.shape)}: expected one per expert")
        param.data[:, slots] = loaded.reshape(-1, 1).to(param.dtype)
        return
    if loaded.numel() != 1:
        raise ValueError(f"a per-tensor scale has one element, got shape {tuple(loaded.shape)}")
    param.data[int(expert), slots] = loaded.reshape(()).to(param.dtype)


def _frozen(data: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(data, requires_grad=False)


class Fp8ExpertsMethod(KernelExpertsMethod):
    def __init__(self, scheme: Fp8Scheme, prefix: str):
        self.scheme = scheme
        self.prefix = prefix

    def create_weights(self, layer: nn.Module, num_experts: int, hidden_size: int, intermediate_size: int,
                       params_dtype: torch.dtype, weight_loader: Callable[..., None]) -> None:
        weights = self.scheme.weights
        dtype = params_dtype if weights == "online" else FP8
        shapes = {"w13": (2 * intermediate_size, hidden_size), "w2": (hidden_size, intermediate_size)}
        if weights == "block":
            self._check_blocks(layer, intermediate_size)
        for stem, (rows, inputs) in shapes.items():
            setattr(layer, f"{stem}_weight", weight_param(torch.zeros(num_experts, rows, inputs, dtype=dtype),
                                                          weight_loader, output_dim=0, input_dim=1))
            parts = 2 if stem == "w13" else 1
            if weights != "online":  # online weights get their scales when quantized after loading
                name = f"{stem}_{self.scheme.weight_scale_name}"
                setattr(layer, name, self._weight_scale(num_experts, rows, inputs, parts, weight_loader))
            if self.scheme.activations == "static":
                setattr(layer, f"{stem}_input_scale", weight_param(torch.ones(num_experts, parts), _load_part_scale))

    def _weight_scale(self, num_experts: int, rows: int, inputs: int, parts: int,
                      weight_loader: Callable[..., None]) -> nn.Parameter:
        """A stacked weight's scales: per output row, per part (per-tensor) or per block."""
        if self.scheme.weights == "channel":
            return weight_param(torch.ones(num_experts, rows, 1), weight_loader, output_dim=0)
        if self.scheme.weights == "tensor":
            return weight_param(torch.ones(num_experts, parts), _load_part_scale)
        block_rows, block_cols = self.scheme.block
        return weight_param(torch.ones(num_experts, -(-rows // block_rows), -(-inputs // block_cols)),
                            weight_loader, output_dim=0, input_dim=1, packed_dim=0, packed_factor=block_rows)

    def _check_blocks(self, layer: nn.Module, intermediate_size: int) -> None:
        """Gate and up follow each other in w13, so gate must end on a block boundary; a rank's
        slice of down's input columns must hold whole blocks (``intermediate_size`` is this rank's)."""
        rows, cols = self.scheme.block
        if intermediate_size % rows:
            raise ValueError(f"quantization_config weight_block_size {list(self.scheme.block)}: {self.prefix} has "
                             f"{intermediate_size} gate rows (per rank), not a multiple of the block's {rows} rows")
        if intermediate_size % cols and layer.tp.size > 1:
            raise ValueError(f"quantization_config weight_block_size {list(self.scheme.block)}: {self.prefix} has "
                             f"{intermediate_size} down input features per rank, not a multiple of the block's "
                             f"{cols} columns")

    def own_dummy_params(self, layer: nn.Module) -> set[str]:
        return fp8_dummy_params(("w13_", "w2_"), self.scheme)

    def init_dummy_weights(self, layer: nn.Module, generator: torch.Generator) -> None:
        init_dummy_fp8(layer, ("w13_", "w2_"), self.scheme, generator)

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        """Leaves e4m3 weights with one float32 scale per expert and output row (``[E, rows]``) and
        static input scales one per expert; block-wise weights keep their block scales."""
        weights = self.scheme.weights
        for stem in ("w13", "w2"):
            if weights == "block":
                continue
            weight = getattr(layer, f"{stem}_weight")
            if weights == "online":
                scale = weight.data.float().abs().amax(dim=2).clamp(min=MIN_SCALE) / FP8_MAX
                setattr(layer, f"{stem}_weight", _frozen(quantize(weight.data, scale[..., None])))
            elif weights == "tensor":
                per_part = getattr(layer, f"{stem}_weight_scale").data.float()
                scale = per_part.repeat_interleave(weight.shape[1] // per_part.shape[1], dim=1)
            else:
                scale = getattr(layer, f"{stem}_weight_scale").data.float().squeeze(-1)
            setattr(layer, f"{stem}_weight_scale", _frozen(scale))
            if self.scheme.activations == "static":
                input_scale = getattr(layer, f"{stem}_input_scale").data.float()
                setattr(layer, f"{stem}_input_scale", _frozen(input_scale.amax(dim=1)))

    def _dequantized(self, layer: nn.Module, stem: str, expert: int, dtype: torch.dtype) -> torch.Tensor:
        weight = getattr(layer, f"{stem}_weight")[expert]
        if self.scheme.weights == "block":
            return dequantize_weight(weight, getattr(layer, f"{stem}_{self.scheme.weight_scale_name}")[expert],
                                     self.scheme.block).to(dtype)
        return (weight.float() * getattr(layer, f"{stem}_weight_scale")[expert][:, None]).to(dtype)

    def _rounded_input(self, layer: nn.Module, stem: str, expert: int, x: torch.Tensor) -> torch.Tensor:
        activations = self.scheme.activations
        if self.scheme.weights == "block":
            return quantize_dequantize_groups(x, self.scheme.block[1])
        if activations == "static":
            return round_trip(x, getattr(layer, f"{stem}_input_scale")[expert])
        return round_trip(x, token_scale(x)) if activations == "dynamic" else x

    def fused_weight(self, layer: nn.Module, stem: str) -> QuantizedExperts:
        """The stacked e4m3 ``stem`` weight and its scales as the fused MoE kernel reads them."""
        weight = getattr(layer, f"{stem}_weight")
        if self.scheme.weights == "block":
            rows, cols = self.scheme.block
            return QuantizedExperts(weight, getattr(layer, f"{stem}_{self.scheme.weight_scale_name}"), "fp8",
                                    scale_rows=rows, scale_cols=cols)
        return QuantizedExperts(weight, getattr(layer, f"{stem}_weight_scale").unsqueeze(-1), "fp8")

    def expert_product(self, layer: nn.Module, stem: str, expert: int, x: torch.Tensor) -> torch.Tensor:
        return self._rounded_input(layer, stem, expert, x) @ self._dequantized(layer, stem, expert, x.dtype).t()


"""compressed-tensors ``int-quantized`` linear layers (llm-compressor's W8A8 and int8 weight-only
schemes): int8 ``weight`` [out, in], symmetric, with ``weight_scale`` [out, 1] (strategy
channel) or [1] (tensor); ``W = q * s``.

Activations (``input_activations``) are int8 too, or absent (weight only):
- dynamic, per token: symmetric ``s = max|x| / 127``; asymmetric over the token's range [lo, hi]
  (widened to hold 0): ``s = (hi - lo) / 255``, ``z = round(-128 - lo / s)``;
- static, per tensor: the checkpoint's ``input_scale`` [1] (and ``input_zero_point`` [1] when
  asymmetric). The parts of a fused layer share one input: symmetric scales give way to the
  largest; asymmetric ones, unless equal, to the scale and zero point covering the union of the
  parts' ranges.
``q_x = clamp(round(x / s + z), -128, 127)`` (z = 0 when symmetric), as compressed-tensors
quantizes.

The matmul is integer-exact: ``acc = (q_x - z) q_w^T``, computed as ``q_x q_w^T - z sum_k q_w``
in int32 by ``torch._int_mm``, then ``y = acc * s_x * s_w``. Per-tensor weight scales of a fused
layer's parts become one scale per output row, as in the fp8 plugin. An MoE layer's experts
(``Int8ExpertsMethod``) compute the same product expert by expert.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from sglang_core.kernels import linear
from sglang_core.kernels.moe_weight import QuantizedExperts
from sglang_core.layers.moe import KernelExpertsMethod
from sglang_core.layers.quant import QuantMethod, weight_param
from sglang_plugins.quant.compressed_tensors.config import int_args
from sglang_plugins.quant.dummy import INPUT_RANGE, fill_positive_scales, uniform_code_std
from sglang_plugins.quant.fused import load_part_scalar

QMIN, QMAX = -128, 127
# The smallest activation scale used: an all-zero token quantizes to zeros instead of NaNs.
MIN_SCALE = torch.finfo(torch.float32).eps
# int8 values to an int32 word, as the fused MoE kernel reads 8-bit weights.
WORD_BYTES = 4
# The std of random int8 codes, as the core's dummy init leaves them.
DUMMY_CODE_STD = uniform_code_std(8, random_zero_point=False)
# CUDA's int8 matmul wants more than 16 rows and both other sides multiples of 8.
CUDA_MIN_ROWS, CUDA_MULTIPLE = 17, 8


def _frozen(data: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(data, requires_grad=False)


class Int8Method(QuantMethod):
    def __init__(self, weights: dict[str, Any], input_activations: dict[str, Any] | None, prefix: str):
        weights = int_args("weights", weights, (8,))
        if weights["strategy"] not in ("channel", "tensor") or weights.get("dynamic"):
            raise ValueError(f"quantization_config weights strategy {weights['strategy']!r}: int-quantized weights "
                             "need static 'channel' or 'tensor'")
        if not weights["symmetric"]:
            raise ValueError("quantization_config weights symmetric: asymmetric int8 weights are not supported")
        self.weight_strategy = weights["strategy"]
        self.activations, self.symmetric_input = "none", True
        if input_activations is not None:
            args = int_args("input_activations", input_activations, (8,))
            kind = {("token", True): "dynamic", ("tensor", False): "static"}.get(
                (args["strategy"], bool(args.get("dynamic"))))
            if kind is None:
                raise ValueError(f"quantization_config input_activations strategy {args['strategy']!r} with dynamic="
                                 f"{args.get('dynamic')!r}: expected dynamic 'token' or static 'tensor'")
            self.activations, self.symmetric_input = kind, args["symmetric"]
        self.prefix = prefix

    def create_weights(self, layer: nn.Module, input_size: int, output_sizes: list[int], params_dtype: torch.dtype,
                       weight_loader: Callable[..., None]) -> None:
        rows, parts = sum(output_sizes), len(output_sizes)
        layer.weight = weight_param(torch.zeros(rows, input_size, dtype=torch.int8), weight_loader,
                                    output_dim=0, input_dim=1)
        if self.weight_strategy == "channel":
            layer.weight_scale = weight_param(torch.ones(rows, 1), weight_loader, output_dim=0)
        else:
            layer.weight_scale = weight_param(torch.ones(parts), load_part_scalar)
        if self.activations == "static":
            layer.input_scale = weight_param(torch.ones(parts), load_part_scalar)
            if not self.symmetric_input:
                layer.input_zero_point = weight_param(torch.zeros(parts), load_part_scalar)

    def own_dummy_params(self, layer: nn.Module) -> set[str]:
        return {name for name in ("weight_scale", "input_scale", "input_zero_point") if hasattr(layer, name)}

    def init_dummy_weights(self, layer: nn.Module, generator: torch.Generator) -> None:
        """Random int8 codes (the core's) with positive weight scales; static input scales that let
        normalized activations through, zero points 0."""
        fill_positive_scales(layer.weight_scale, DUMMY_CODE_STD, generator)
        if self.activations == "static":
            layer.input_scale.data.fill_(INPUT_RANGE / QMAX)
            if not self.symmetric_input:
                layer.input_zero_point.data.zero_()

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        """``weight_scale`` becomes one float32 per output row; a static input scale (and zero
        point) one scalar; asymmetric inputs need the weight's row sums."""
        if self.weight_strategy == "tensor":
            sizes = torch.tensor(layer.output_sizes, device=layer.weight_scale.device)
            layer.weight_scale = _frozen(layer.weight_scale.data.float().repeat_interleave(sizes))
        else:
            layer.weight_scale = _frozen(layer.weight_scale.data.float().reshape(-1))
        if self.activations == "static":
            zero_points = None if self.symmetric_input else layer.input_zero_point.data
            scale, zero_point = shared_input_range(layer.input_scale.data.float(), zero_points)
            layer.input_scale = _frozen(scale)
            if zero_point is not None:
                layer.input_zero_point = _frozen(zero_point)
        if not self.symmetric_input:
            layer.weight_row_sums = _frozen(layer.weight.data.to(torch.int32).sum(dim=1))

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self.activations == "none":
            return linear(x, (layer.weight.float() * layer.weight_scale[:, None]).to(x.dtype), bias)
        tokens = x.reshape(-1, x.shape[-1]).float()
        if self.activations == "static":
            scale = layer.input_scale
            zero_point = None if self.symmetric_input else layer.input_zero_point
        else:
            scale, zero_point = token_qparams(tokens, self.symmetric_input)
        y = int8_product(tokens, scale, zero_point, layer.weight, layer.weight_scale,
                         getattr(layer, "weight_row_sums", None))
        y = y.to(x.dtype).reshape(*x.shape[:-1], -1)
        return y + bias if bias is not None else y


def token_qparams(x: torch.Tensor, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Each token's dynamic int8 scale and zero point (None when symmetric)."""
    if symmetric:
        return (x.abs().amax(dim=-1, keepdim=True) / QMAX).clamp(min=MIN_SCALE), None
    lo = x.amin(dim=-1, keepdim=True).clamp(max=0)
    hi = x.amax(dim=-1, keepdim=True).clamp(min=0)
    scale = ((hi - lo) / (QMAX - QMIN)).clamp(min=MIN_SCALE)
    return scale, torch.round(QMIN - lo / scale)


def int8_product(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None, weight: torch.Tensor,
                 weight_scale: torch.Tensor, weight_row_sums: torch.Tensor | None) -> torch.Tensor:
    """``x [m, k]`` (float32) quantized to int8 by ``scale`` and ``zero_point`` times the int8
    ``weight [n, k]`` scaled per row: ``(q_x - z) q_w^T * s_x * s_w``, the integer part exact
    (``q_x q_w^T - z * weight_row_sums``); float32 ``[m, n]``."""
    shifted = x / scale if zero_point is None else x / scale + zero_point
    acc = int8_matmul(torch.round(shifted).clamp(QMIN, QMAX).to(torch.int8), weight)
    if zero_point is not None:
        acc = acc - zero_point.to(torch.int32) * weight_row_sums
    return acc.float() * scale * weight_scale


def shared_input_range(scales: torch.Tensor, zero_points: torch.Tensor | None
                       ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One static input scale (and zero point) for the parts of a fused layer, which quantize one
    shared input: the parts' own when they agree; else symmetric: the largest scale, asymmetric:
    the smallest range holding every part's ``[s (-128 - z), s (127 - z)]``."""
    if zero_points is None:
        return scales.max(), None
    zero_points = zero_points.float()
    if bool((scales == scales[0]).all() and (zero_points == zero_points[0]).all()):
        return scales[0], zero_points[0]
    lo = (scales * (QMIN - zero_points)).min()
    hi = (scales * (QMAX - zero_points)).max()
    scale = (hi - lo) / (QMAX - QMIN)
    return scale, torch.round(QMIN - lo / scale)


def int8_matmul(a: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``a [m, k] @ weight [n, k]^T`` of int8 matrices, exact in int32."""
    if not a.is_cuda:
        return torch._int_mm(a, weight.t())
    rows, (n, k) = a.shape[0], weight.shape
    if n % CUDA_MULTIPLE or k % CUDA_MULTIPLE:
        # float64 holds every such sum exactly.
        return (a.double() @ weight.double().t()).to(torch.int32)
    padded = F.pad(a, (0, 0, 0, max(0, CUDA_MIN_ROWS - rows)))
    return torch._int_mm(padded, weight.t())[:rows]


class Int8ExpertsMethod(KernelExpertsMethod):
    """An MoE layer's experts of an int-quantized group, as llm-compressor writes them: each
    expert's gate, up and down an int8 ``weight`` with ``weight_scale`` per output channel
    (``experts.<e>.w1.weight``, ``.weight_scale`` [out, 1]), stacked into ``w13_weight``
    ``[E, 2I, H]``, ``w2_weight_scale`` ``[E, H, 1]``, ... Activations as the group says: dynamic
    per token (W8A8, symmetric or not) or none (W8A16); a static input scale per expert is not
    supported. CPU (and wherever the fused MoE kernel does not apply): each expert that got tokens
    multiplies in integers as the linear layers do. Where ``fused_moe_activation`` names the gate's
    activation (CUDA): the fused MoE kernel, weight-only as for FP8 experts (the activations stay
    16-bit); it reads 8-bit values offset by 128, four to an int32, so after loading each int8
    weight is kept so, the integer path viewing the same bytes back as int8."""

    def __init__(self, method: Int8Method):
        if method.weight_strategy != "channel":
            raise ValueError(f"quantization_config weights strategy {method.weight_strategy!r}: int-quantized "
                             f"experts need 'channel' ({method.prefix})")
        if method.activations == "static":
            raise ValueError(f"quantization_config input_activations: int-quantized experts need dynamic per-token "
                             f"activations or none, not static ({method.prefix})")
        self.method = method

    def create_weights(self, layer: nn.Module, num_experts: int, hidden_size: int, intermediate_size: int,
                       params_dtype: torch.dtype, weight_loader: Callable[..., None]) -> None:
        for stem, (rows, inputs) in {"w13": (2 * intermediate_size, hidden_size),
                                     "w2": (hidden_size, intermediate_size)}.items():
            if inputs % WORD_BYTES:
                raise ValueError(f"int-quantized experts pack {WORD_BYTES} int8 values to a word; "
                                 f"{self.method.prefix}'s {stem} has {inputs} input features (per rank)")
            setattr(layer, f"{stem}_weight", weight_param(torch.zeros(num_experts, rows, inputs, dtype=torch.int8),
                                                          weight_loader, output_dim=0, input_dim=1))
            setattr(layer, f"{stem}_weight_scale", weight_param(torch.ones(num_experts, rows, 1), weight_loader,
                                                                output_dim=0))

    def own_dummy_params(self, layer: nn.Module) -> set[str]:
        return {"w13_weight_scale", "w2_weight_scale"}

    def init_dummy_weights(self, layer: nn.Module, generator: torch.Generator) -> None:
        for stem in ("w13", "w2"):
            fill_positive_scales(getattr(layer, f"{stem}_weight_scale"), DUMMY_CODE_STD, generator)

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        """Scales become ``[E, rows]`` float32; asymmetric inputs need each weight row's sum; each
        int8 weight ``[E, rows, K]`` becomes ``[E, rows, K / 4]`` int32 words of its values + 128
        (byte j of a word: bits 8j..8j+7)."""
        for stem in ("w13", "w2"):
            setattr(layer, f"{stem}_weight_scale", _frozen(getattr(layer, f"{stem}_weight_scale").data.float()[..., 0]))
            weight = getattr(layer, f"{stem}_weight").data
            if not self.method.symmetric_input:
                setattr(layer, f"{stem}_weight_row_sums", _frozen(weight.to(torch.int32).sum(dim=2)))
            offset = (weight.to(torch.int16) - QMIN).to(torch.uint8)
            setattr(layer, f"{stem}_weight", _frozen(offset.view(torch.int32)))

    def fused_weight(self, layer: nn.Module, stem: str) -> QuantizedExperts:
        """The stacked words and per-row scales as the fused MoE kernel reads them."""
        return QuantizedExperts(getattr(layer, f"{stem}_weight"), getattr(layer, f"{stem}_weight_scale").unsqueeze(-1),
                                "int", bits=8, packed_dim=2, zero_offset=-QMIN)

    def expert_product(self, layer: nn.Module, stem: str, expert: int, x: torch.Tensor) -> torch.Tensor:
        words, scale = getattr(layer, f"{stem}_weight")[expert], getattr(layer, f"{stem}_weight_scale")[expert]
        weight = (words.view(torch.uint8).to(torch.int16) + QMIN).to(torch.int8)
        if self.method.activations == "none":
            return x @ (weight.float() * scale[:, None]).to(x.dtype).t()
        row_sums = None if self.method.symmetric_input else getattr(layer, f"{stem}_weight_row_sums")[expert]
        tokens = x.float()
        x_scale, zero_point = token_qparams(tokens, self.method.symmetric_input)
        return int8_product(tokens, x_scale, zero_point, weight, scale, row_sums).to(x.dtype)

"""FP8 linear layers: e4m3 weights with a scale per output channel, activations quantized per
token (dynamic) or by one calibrated scale (static), or left in the compute dtype (weight only);
block-wise scaled weights are computed by ``block``.

Fused layers (q/k/v, gate/up) whose checkpoint tensors each carry their own per-tensor scale keep
every part's scale, expanded to one scale per output row after loading: dequantization stays
exact (requantizing every part to the largest scale, as some consumers do, would round the
weights a second time), and the GPU's row-wise scaled matmul costs the same as a per-tensor one.
Static input scales of a fused layer's parts scale one shared input: the largest is used, so no
part's calibrated range is clipped.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from sglang_core.kernels import linear, use_fused
from sglang_core.layers.quant import QuantMethod, weight_param
from sglang_plugins.quant.fp8.block import create_block_scale, dequantize_weight, quantize_dequantize_groups
from sglang_plugins.quant.fp8.dummy import fp8_dummy_params, init_dummy_fp8
from sglang_plugins.quant.fp8.e4m3 import FP8, FP8_MAX, MIN_SCALE, quantize, round_trip, token_scale
from sglang_plugins.quant.fp8.experts import Fp8ExpertsMethod
from sglang_plugins.quant.fp8.scheme import Fp8Scheme, parse_scheme
from sglang_plugins.quant.fused import load_part_scalar
from sglang_plugins.quant.kv_scales import is_kv_cache_scale


def _frozen(data: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(data, requires_grad=False)


class Fp8LinearMethod(QuantMethod):
    def __init__(self, quant_config: dict[str, Any] | Fp8Scheme, prefix: str):
        """``quant_config``: a checkpoint's ``quantization_config``, or the scheme the
        compressed-tensors plugin read from one of its config groups."""
        self.scheme = quant_config if isinstance(quant_config, Fp8Scheme) else parse_scheme(quant_config)
        self.prefix = prefix

    @classmethod
    def for_layer(cls, quant_config: dict[str, Any], prefix: str) -> Fp8LinearMethod | None:
        method = cls(quant_config, prefix)
        return None if method.scheme.ignores(prefix) else method

    @classmethod
    def for_embedding(cls, quant_config: dict[str, Any], prefix: str) -> Fp8LinearMethod | None:
        """An untied LM head is a linear layer to AutoFP8 and transformers: an ignore list that leaves it
        out quantizes it; without any list it stays float (transformers' default skips). Input
        embedding tables stay float (``modules_to_convert`` is refused)."""
        method = cls(quant_config, prefix)
        listed = any(quant_config.get(field) is not None for field in ("ignored_layers", "modules_to_not_convert"))
        if prefix != "lm_head" or method.scheme.weights == "online" or not listed or method.scheme.ignores(prefix):
            return None
        return method

    @classmethod
    def unused_checkpoint_tensor(cls, quant_config: dict[str, Any], name: str) -> bool:
        """A KV-cache scale of a checkpoint whose ``kv_cache_scheme`` says it stores them."""
        return parse_scheme(quant_config).kv_cache_scales and is_kv_cache_scale(name)

    @classmethod
    def for_experts(cls, quant_config: dict[str, Any], prefix: str) -> Fp8ExpertsMethod | None:
        scheme = parse_scheme(quant_config)
        return None if scheme.ignores(prefix) else Fp8ExpertsMethod(scheme, prefix)

    def create_weights(self, layer: nn.Module, input_size: int, output_sizes: list[int], params_dtype: torch.dtype,
                       weight_loader: Callable[..., None]) -> None:
        rows, weights = sum(output_sizes), self.scheme.weights
        weight_dtype = params_dtype if weights == "online" else FP8
        layer.weight = weight_param(torch.zeros(rows, input_size, dtype=weight_dtype), weight_loader,
                                    output_dim=0, input_dim=1)
        if weights == "channel":
            layer.weight_scale = weight_param(torch.ones(rows, 1), weight_loader, output_dim=0)
        elif weights == "tensor":
            layer.weight_scale = weight_param(torch.ones(len(output_sizes)), load_part_scalar)
        elif weights == "block":
            create_block_scale(layer, self.prefix, self.scheme.block, input_size, output_sizes, weight_loader,
                               self.scheme.weight_scale_name)
        if self.scheme.activations == "static":
            layer.input_scale = weight_param(torch.ones(len(output_sizes)), load_part_scalar)

    def own_dummy_params(self, layer: nn.Module) -> set[str]:
        return fp8_dummy_params(("",), self.scheme)

    def init_dummy_weights(self, layer: nn.Module, generator: torch.Generator) -> None:
        init_dummy_fp8(layer, ("",), self.scheme, generator)

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        """Leaves ``weight`` in e4m3 with ``weight_scale`` one float32 per output row, and a static
        ``input_scale`` one scalar; block-wise weights keep their block scales."""
        if self.scheme.weights == "block":
            return
        if self.scheme.weights == "online":
            weight = layer.weight.data.float()
            scale = weight.abs().amax(dim=1).clamp(min=MIN_SCALE) / FP8_MAX
            layer.weight = _frozen(quantize(weight, scale[:, None]))
        elif self.scheme.weights == "tensor":
            sizes = torch.tensor(layer.output_sizes, device=layer.weight_scale.device)
            scale = layer.weight_scale.data.float().repeat_interleave(sizes)
        else:
            scale = layer.weight_scale.data.float().reshape(-1)
        layer.weight_scale = _frozen(scale)
        if self.scheme.activations == "static":
            layer.input_scale = _frozen(layer.input_scale.data.float().max())

    def _input_scale(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """The activation scale: the static scalar, or each token's largest magnitude over e4m3's."""
        if self.scheme.activations == "static":
            return layer.input_scale
        return token_scale(x)

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self.scheme.weights == "block":
            scale = getattr(layer, self.scheme.weight_scale_name)
            if _block_kernels_fit(x, self.scheme.block):
                from sglang_plugins.quant.fp8.block_gemm import block_fp8_linear

                return block_fp8_linear(x, layer.weight, scale, self.scheme.block, bias)
            weight = dequantize_weight(layer.weight, scale, self.scheme.block).to(x.dtype)
            return linear(quantize_dequantize_groups(x, self.scheme.block[1]), weight, bias)
        if _gemv_fits(layer, x):
            from sglang_plugins.quant.fp8.gemv import fp8_gemv

            return fp8_gemv(x, layer.weight, layer.weight_scale, self.scheme.activations,
                            getattr(layer, "input_scale", None), bias)
        if _scaled_mm_fits(layer, x) and self.scheme.activations != "none":
            return self._scaled_mm(layer, x, bias)
        # Without an FP8 matmul: the same numbers, dequantized, through a float matmul.
        weight = (layer.weight.float() * layer.weight_scale[:, None]).to(x.dtype)
        if self.scheme.activations != "none":
            x = round_trip(x, self._input_scale(layer, x))
        return linear(x, weight, bias)

    def _scaled_mm(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """Row-wise scaled e4m3 matmul (Hopper / Ada): one scale per token times one per output row."""
        tokens = x.reshape(-1, x.shape[-1])
        scale = self._input_scale(layer, tokens).expand(tokens.shape[0], 1).contiguous()
        y = torch._scaled_mm(quantize(tokens, scale), layer.weight.t(), scale_a=scale,
                             scale_b=layer.weight_scale.view(1, -1), out_dtype=torch.bfloat16).to(x.dtype)
        y = y.reshape(*x.shape[:-1], y.shape[-1])
        return y + bias if bias is not None else y


def _gemv_fits(layer: nn.Module, x: torch.Tensor) -> bool:
    """Whether the one-row FP8 GEMV (``gemv``) serves ``x``: batch-1 decode on CUDA with Triton
    installed (imported only then)."""
    if not use_fused(x):
        return False
    from sglang_plugins.quant.fp8 import gemv

    return gemv.fits(x, layer.weight)


def _scaled_mm_fits(layer: nn.Module, x: torch.Tensor) -> bool:
    """torch's row-wise ``_scaled_mm`` needs a CUDA device of compute capability 8.9+ and both
    matrix sides multiples of 16."""
    if not x.is_cuda or not hasattr(torch, "_scaled_mm") or torch.cuda.get_device_capability(x.device) < (8, 9):
        return False
    rows, cols = layer.weight.shape
    return rows % 16 == 0 and cols % 16 == 0


def _block_kernels_fit(x: torch.Tensor, block: tuple[int, int]) -> bool:
    """Whether the Triton block-wise FP8 kernels (``block_gemm``) serve ``x``: a CUDA tensor with
    Triton installed (imported only then) on a GPU they fit."""
    if not use_fused(x):
        return False
    from sglang_plugins.quant.fp8 import block_gemm

    return block_gemm.fits(x, block)

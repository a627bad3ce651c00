"""The quantization-method interface linear layers compute through.

A quantization plugin registers a ``QuantMethod`` subclass (hook ``register_quant_methods``); the
model context hands one to each linear layer. The core ships only the unquantized method.
"""

from __future__ import annotations

import abc
from typing import Callable

import torch
from torch import nn

from sglang_core.kernels import linear


class QuantMethod(abc.ABC):
    """Creates a linear layer's parameters and computes ``x W^T (+ b)`` from them."""

    @abc.abstractmethod
    def create_weights(
        self,
        layer: nn.Module,
        input_size: int,
        output_sizes: list[int],
        params_dtype: torch.dtype,
        weight_loader: Callable[..., None],
    ) -> None:
        """Register this rank's parameters on ``layer``, each with a ``weight_loader`` attribute."""

    @abc.abstractmethod
    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """The layer's forward."""

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        """Repack loaded weights for the kernel (transpose, pre-shuffle, ...); default: nothing."""


class UnquantizedMethod(QuantMethod):
    def create_weights(self, layer, input_size, output_sizes, params_dtype, weight_loader) -> None:
        weight = nn.Parameter(torch.zeros(sum(output_sizes), input_size, dtype=params_dtype), requires_grad=False)
        weight.weight_loader = weight_loader  # type: ignore[attr-defined]
        layer.weight = weight

    def apply(self, layer, x, bias):
        return linear(x, layer.weight, bias)

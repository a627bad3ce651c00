"""The quantization-method interface linear layers compute through, and the metadata that tells
the tensor-parallel loaders how to cut a parameter.

A quantization plugin registers a ``QuantMethod`` subclass (hook ``register_quant_methods``); the
model context hands one to each linear layer, and the one its ``for_experts`` gives (an
``ExpertsQuantMethod``) to each MoE layer's experts. The core ships only the unquantized method
(unquantized experts need none: ``ExpertWeights`` holds them as floats).
"""

from __future__ import annotations

import abc
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from sglang_core.kernels import linear


def weight_param(data: torch.Tensor, weight_loader: Callable[..., None], *, output_dim: int | None = None,
                 input_dim: int | None = None, packed_dim: int | None = None, packed_factor: int = 1) -> nn.Parameter:
    """A frozen parameter that carries what the tensor-parallel weight loaders shard it by.

    - ``output_dim`` / ``input_dim``: the dim along which the layer's output / input features run
      (``[out, in]`` weight: 0 / 1; AWQ/GPTQ ``[in, out]`` tensors: 1 / 0). ``None``: the tensor
      does not run along that side and is copied whole on every rank (a bias has no input dim; a
      per-channel scale no input dim either).
    - ``packed_dim`` / ``packed_factor``: along ``packed_dim`` one element stands for
      ``packed_factor`` features: 8 int4 values in one int32, or a scale shared by a block of
      output features. Shard offsets and sizes along the output dim are divided by it.

    Along the input dim a loader takes this rank's piece by the parameter's own extent, so a
    tensor grouped or packed along its input dim (GPTQ's ``qweight``, per-group scales) needs
    nothing more than ``input_dim``.
    """
    param = nn.Parameter(data, requires_grad=False)
    param.weight_loader = weight_loader  # type: ignore[attr-defined]
    param.output_dim = output_dim  # type: ignore[attr-defined]
    param.input_dim = input_dim  # type: ignore[attr-defined]
    param.packed_dim = packed_dim  # type: ignore[attr-defined]
    param.packed_factor = packed_factor  # type: ignore[attr-defined]
    return param


class QuantMethod(abc.ABC):
    """Creates a linear layer's parameters and computes ``x W^T (+ b)`` from them.

    The engine builds one per linear layer through ``for_layer(quant_config, prefix)``, where
    ``quant_config`` is the checkpoint's ``quantization_config`` dict or, when ``--quantization``
    asks for a method on a checkpoint that has none, ``{"quant_method": name}`` alone (the
    checkpoint is unquantized; the method quantizes at load, if it can).
    """

    @classmethod
    def for_layer(cls, quant_config: dict, prefix: str) -> QuantMethod | None:
        """The method for the linear layer at module path ``prefix``, or None to leave it
        unquantized (a checkpoint's ignore list); default: ``cls(quant_config, prefix)``."""
        return cls(quant_config, prefix)  # type: ignore[call-arg]

    @classmethod
    def for_embedding(cls, quant_config: dict, prefix: str) -> QuantMethod | None:
        """The method for the vocabulary table at ``prefix`` (``model.embed_tokens``, ``lm_head``),
        or None to keep it float; default: None (the scheme quantizes linear layers only). The
        method gets ``create_weights(layer, hidden_size, [rows], ...)``, ``apply`` as the LM head's
        projection and ``embed`` as the lookup."""
        return None

    @classmethod
    def unused_checkpoint_tensor(cls, quant_config: dict, name: str) -> bool:
        """Whether the checkpoint tensor ``name`` is one the scheme stores but the engine does not
        read, so the loader drops it (an FP8 KV cache's calibrated scales, where the cache keeps its
        own dtype); default: False."""
        return False

    @abc.abstractmethod
    def create_weights(
        self,
        layer: nn.Module,
        input_size: int,
        output_sizes: list[int],
        params_dtype: torch.dtype,
        weight_loader: Callable[..., None],
    ) -> None:
        """Register this rank's parameters on ``layer`` (``input_size`` and ``output_sizes`` are
        this rank's), each made with ``weight_param(..., weight_loader, output_dim=...,
        input_dim=..., packed_dim=..., packed_factor=...)`` so the layer's loader can shard it."""

    @abc.abstractmethod
    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """The layer's forward."""

    def embed(self, layer: nn.Module, ids: torch.Tensor) -> torch.Tensor:
        """The weight's rows at ``ids``, ``[*ids.shape, input_size]``: a table's lookup (needed only by
        the methods ``for_embedding`` returns)."""
        raise NotImplementedError(f"{type(self).__name__} holds no embedding tables")

    def init_dummy_weights(self, layer: nn.Module, generator: torch.Generator) -> None:
        """``--load-format dummy``: make ``layer``'s parameters valid random weights of this format,
        drawing from ``generator`` (on the device of the layer's parameters). Called after the core
        filled every parameter but those ``own_dummy_params`` names (floats: normal noise of std
        0.02; integers: random bits) and before ``process_weights_after_loading``; a method whose
        bytes hold floats that random bits can make inf or NaN (GGUF's f16 scales), or whose
        parameters only fill through its loaders, overrides it. Default: nothing (the core's noise
        suits the format)."""

    def own_dummy_params(self, layer: nn.Module) -> set[str]:
        """The names of ``layer``'s parameters that ``init_dummy_weights`` draws whole: the core
        leaves them as ``create_weights`` made them, so none is drawn twice (an 8B model's float8
        weights are gigabytes of noise). Default: none."""
        return set()

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        """Repack loaded weights for the kernel (transpose, pre-shuffle, ...); default: nothing."""

    @classmethod
    def for_experts(cls, quant_config: dict, prefix: str) -> ExpertsQuantMethod | None:
        """The method for the routed experts at module path ``prefix`` (``model.layers.0.mlp.experts``),
        or None to keep them unquantized; default: None (the scheme quantizes linear layers only)."""
        return None


class ExpertsQuantMethod(abc.ABC):
    """Creates an MoE layer's stacked expert parameters (on ``layers.experts.ExpertWeights``) and
    computes the routed experts' weighted sum from them.

    Parameters are stacked ``[num_experts, ...]`` and named ``w13_<suffix>`` (each expert's gate,
    then up) and ``w2_<suffix>`` (down), so a checkpoint's ``experts.<e>.w1.<suffix>`` loads into
    them; made with ``weight_param(..., weight_loader, output_dim=, input_dim=, packed_dim=,
    packed_factor=)``, whose dims are those of one expert's slice, ``layer.weight_loader`` cuts each
    part's tensor-parallel piece as it does the float weights'.
    """

    @abc.abstractmethod
    def create_weights(self, layer: nn.Module, num_experts: int, hidden_size: int, intermediate_size: int,
                       params_dtype: torch.dtype, weight_loader: Callable[..., None]) -> None:
        """Register the stacked parameters on ``layer`` (``intermediate_size`` is this rank's)."""

    @abc.abstractmethod
    def apply(self, layer: nn.Module, hidden: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
              act: nn.Module) -> torch.Tensor:
        """``sum_j topk_weights[t, j] * down_e(act(gate_up_e(hidden[t])))`` over each token's experts
        ``e = topk_ids[t, j]`` (``act`` maps ``[.., 2I]`` to ``[.., I]``): ``[T, H]``, this rank's
        partial sum under tensor parallelism."""

    def init_dummy_weights(self, layer: nn.Module, generator: torch.Generator) -> None:
        """As ``QuantMethod.init_dummy_weights``; default: nothing."""

    def own_dummy_params(self, layer: nn.Module) -> set[str]:
        """As ``QuantMethod.own_dummy_params``; default: none."""
        return set()

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        """Repack loaded weights for the kernel; default: nothing."""


class UnquantizedMethod(QuantMethod):
    def create_weights(self, layer, input_size, output_sizes, params_dtype, weight_loader) -> None:
        layer.weight = weight_param(torch.zeros(sum(output_sizes), input_size, dtype=params_dtype), weight_loader,
                                    output_dim=0, input_dim=1)

    def apply(self, layer, x, bias):
        return linear(x, layer.weight, bias)

    def embed(self, layer, ids):
        return F.embedding(ids, layer.weight)

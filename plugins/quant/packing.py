"""What the AWQ, GPTQ and compressed-tensors packed methods share: reading a
``quantization_config``, unpacking integers stored several to an int32, and laying out groups of
input features across tensor-parallel ranks."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from sglang_core.layers.parallel import RowParallelLinear


def config_value(config: Any, field: str, default: Any = None) -> Any:
    """``config[field]`` of a ``quantization_config`` given as a dict or as an object; a field
    written as null (transformers' configs write unset fields so) counts as absent."""
    value = config.get(field) if isinstance(config, dict) else getattr(config, field, None)
    return default if value is None else value


def require_bool(config: Any, field: str, default: bool) -> bool:
    value = config_value(config, field, default)
    if not isinstance(value, bool):
        raise ValueError(f"quantization_config.{field} must be true or false, not {value!r}")
    return value


def unpack_ints(words: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """The ``32 // bits`` unsigned ``bits``-wide integers of each int32 of ``words``, lowest bits
    first, laid out one after another along ``dim`` (which grows by ``32 // bits``)."""
    per_word = 32 // bits
    w = words.movedim(dim, -1).to(torch.int64)  # int64: shifting a negative int32 keeps its bits
    shifts = torch.arange(0, 32, bits, device=words.device)
    values = (w.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    return values.reshape(*w.shape[:-1], w.shape[-1] * per_word).movedim(-1, dim)


def rank_groups(layer: nn.Module, input_size: int, group_size: int | None, act_order: bool,
                field: str) -> tuple[int, bool]:
    """How many groups of input features this rank's scales (and zero points) hold, and whether
    those split across ranks with the input features (else every rank holds them all).

    ``group_size`` None: one group of all input features, the same on every rank. A row-parallel
    rank whose groups are in activation order holds every rank's groups, since its slice of the
    features may belong to any of them. ``field`` names the group size in errors."""
    if group_size is None:
        return 1, False
    grouped_inputs, split = input_size, True
    if act_order and isinstance(layer, RowParallelLinear) and layer.tp.size > 1:
        grouped_inputs, split = input_size * layer.tp.size, False
    if grouped_inputs % group_size:
        raise ValueError(f"{field} {group_size} does not divide the layer's {grouped_inputs} input features")
    return grouped_inputs // group_size, split

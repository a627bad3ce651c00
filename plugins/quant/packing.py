"""What the AWQ, GPTQ and compressed-tensors packed methods share: reading a
``quantization_config``, unpacking integers stored several to an int32, describing a packed
weight's layout to the integer matmul kernel and choosing between it and dequantising, laying
out groups of input features across tensor-parallel ranks, computing routed experts (the fused
MoE kernel on the packed tensors on CUDA, else from dequantized weights) and loading the vectors
they keep per expert and part."""

from __future__ import annotations

import abc
from typing import Any

import torch

from sglang_core.kernels import linear, use_fused
from sglang_core.layers.experts import EXPERT_PARTS, PART_SLOTS
from sglang_core.layers.moe import KernelExpertsMethod
from sglang_core.layers.parallel import SINGLE, TPGroup, load_input_shard


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


def pack_ints(values: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """``unpack_ints``' inverse: unsigned ``bits``-wide integers, ``32 // bits`` consecutive ones
    along ``dim`` (which shrinks by that) to each int32, lowest bits first."""
    per_word = 32 // bits
    v = values.movedim(dim, -1).to(torch.int64)
    v = v.reshape(*v.shape[:-1], v.shape[-1] // per_word, per_word)
    words = (v << torch.arange(0, 32, bits, device=values.device)).sum(-1)  # disjoint bits: the sum is the or
    words = torch.where(words >= 1 << 31, words - (1 << 32), words)  # the top bit set: a negative int32
    return words.to(torch.int32).movedim(-1, dim)


def dequantize_packed_along_k(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, bits: int,
                              zero_offset: int, groups: torch.Tensor) -> torch.Tensor:
    """A weight packed along the inputs (GPTQ's layout: ``qweight`` ``[in/p, out]``, ``qzeros``
    ``[G, out/p]`` in output order, ``scales`` ``[G, out]``) as ``[out, in]`` floats of the scales'
    dtype: ``W[k, n] = (q[k, n] - z) * s[groups[k], n]``, the zero point ``z`` being group
    ``groups[k]``'s stored value plus ``zero_offset`` (``groups``: each input feature's group)."""
    zeros = unpack_ints(qzeros, bits, dim=1).float() + zero_offset
    values = unpack_ints(qweight, bits, dim=0).float()
    w = (values - zeros[groups]) * scales.float()[groups]
    return w.t().to(scales.dtype)


def packed_linear(method: Any, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """A packed method's forward: on CUDA (with Triton) a kernel on the packed tensors that
    ``method.int_weight(layer)`` describes, ``int_gemv``'s for one row where it serves the layout,
    else ``int_matmul``'s; without CUDA a float matmul with ``method.dequantized_weight(layer)``."""
    if use_fused(x):
        from sglang_plugins.quant import int_gemv, int_matmul  # import Triton: only where they run

        weight = method.int_weight(layer)
        if int_gemv.fits(x, weight):
            return int_gemv.int_gemv(x, weight, bias)
        return int_matmul.int_matmul(x, weight, bias)
    return linear(x, method.dequantized_weight(layer).to(x.dtype), bias)


class DequantizingExpertsMethod(KernelExpertsMethod):
    """Routed experts of packed integer weights: the fused MoE kernel unpacks them in registers
    where it applies; else (CPU, or a layout the kernel does not read) each expert that got tokens
    is dequantized (``w13`` and ``w2``) and computed in float."""

    @abc.abstractmethod
    def dequantized(self, layer: torch.nn.Module, stem: str, expert: int) -> torch.Tensor:
        """Expert ``expert``'s ``stem`` (``"w13"`` or ``"w2"``) weight as ``[out, in]`` floats."""

    def expert_product(self, layer: torch.nn.Module, stem: str, expert: int, x: torch.Tensor) -> torch.Tensor:
        return x @ self.dequantized(layer, stem, expert).to(x.dtype).t()


def rank_groups(input_size: int, input_ranks: int, group_size: int | None, act_order: bool,
                field: str) -> tuple[int, bool]:
    """How many groups of input features this rank's scales (and zero points) hold, and whether
    those split across ranks with the input features (else every rank holds them all).

    ``group_size`` None: one group of all input features, the same on every rank. A row-parallel
    rank whose groups are in activation order holds every rank's groups, since its slice of the
    features may belong to any of them. ``field`` names the group size in errors."""
    if group_size is None:
        return 1, False
    grouped_inputs, split = input_size, True
    if act_order and input_ranks > 1:
        grouped_inputs, split = input_size * input_ranks, False
    if grouped_inputs % group_size:
        raise ValueError(f"{field} {group_size} does not divide the layer's {grouped_inputs} input features")
    return grouped_inputs // group_size, split


def load_expert_part_vector(tp: TPGroup, param: torch.Tensor, loaded: torch.Tensor,
                            shard_id: tuple[int | None, str]) -> None:
    """Weight loader of a ``[experts, parts, n]`` parameter holding one vector per expert and
    part (an expert's ``g_idx``, a ``weight_shape``): the vector goes into the part's slot(s);
    down's is cut to this rank's input features where the parameter runs along them
    (``input_dim`` 0). ``expert_id`` None: ``loaded`` holds every expert's, stacked."""
    expert, part = shard_id
    if expert is None:
        for index, piece in enumerate(loaded):
            load_expert_part_vector(tp, param, piece, (index, part))
        return
    role = EXPERT_PARTS[part]
    for slot in PART_SLOTS[role]:
        load_input_shard(param, param.data[int(expert), slot], loaded, tp if role == "down" else SINGLE)

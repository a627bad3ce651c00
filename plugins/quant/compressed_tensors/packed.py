"""compressed-tensors ``pack-quantized`` linear layers (llm-compressor's W4A16 and W8A16): integer
weights packed ``p = 32 / bits`` to an int32, activations left in the compute dtype.

Tensors of a layer with ``out`` x ``in`` weights and ``G`` groups (``in / group_size``; 1 for
strategy channel), as ``pack_to_int32`` writes them:
- ``weight_packed`` int32 [out, in / p]: value ``j`` of a row in bits ``bits * (j % p)`` of word
  ``j // p``, stored as ``q + 2^(bits-1)`` (the signed value offset into the unsigned range);
- ``weight_scale`` [out, G]; ``weight_shape`` int [2], the unpacked [out, in];
- asymmetric only: ``weight_zero_point`` int32 [out / p, G], packed the same way along the output
  rows (offset alike);
- activation order by group (``actorder: group``): ``weight_g_idx`` int [in], each input
  feature's group (contiguous groups otherwise, also for ``actorder: weight``).
``W[n, k] = (q[n, k] - z[n, g(k)]) * s[n, g(k)]``, z = 0 when symmetric.

Under tensor parallelism a row-parallel rank holds a slice of the input features; with groups in
activation order its features may belong to any group, so every rank then holds all groups'
scales and zero points and looks them up by ``weight_g_idx``.

On CUDA a forward is ``int_matmul``'s kernel, which dequantises in registers; CPU path: each
forward dequantises the layer's weight and runs a float matmul.

An MoE layer's experts (``PackedIntExpertsMethod``) are stored as llm-compressor writes them: each
expert's gate, up and down projection packed like a linear layer
(``experts.<e>.gate_proj.weight_packed``, ``.weight_scale``, ``.weight_shape``, ...), stacked here
into ``w13_weight_packed`` ``[E, 2I, H / p]``, ``w2_weight_scale`` ``[E, H, G]``, ... With
``actorder: group`` gate and up each keep their own ``weight_g_idx``.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import torch
from torch import nn

from sglang_core.kernels.moe_weight import QuantizedExperts
from sglang_core.layers.parallel import RowParallelLinear
from sglang_core.layers.quant import QuantMethod, weight_param
from sglang_plugins.quant.compressed_tensors.config import int_args
from sglang_plugins.quant.dummy import fill_group_index, fill_positive_scales, uniform_code_std
from sglang_plugins.quant.int_weight import IntWeight
from sglang_plugins.quant.packing import (DequantizingExpertsMethod, load_expert_part_vector, packed_linear,
                                          rank_groups, unpack_ints)

BITS = (4, 8)
# actorder values (compressed-tensors' aliases and the legacy booleans) that store weight_g_idx.
GROUP_ORDER = ("group", "dynamic", True)
CONTIGUOUS_ORDER = (None, False, "weight", "static")


class PackedIntMethod(QuantMethod):
    def __init__(self, weights: dict[str, Any], input_activations: dict[str, Any] | None, prefix: str):
        if input_activations is not None:
            raise ValueError("quantization_config input_activations: pack-quantized weights need none (W4A16, W8A16)")
        weights = int_args("weights", weights, BITS)
        if weights["strategy"] not in ("group", "channel") or weights.get("dynamic"):
            raise ValueError(f"quantization_config weights strategy {weights['strategy']!r}: pack-quantized weights "
                             "need static 'group' or 'channel'")
        actorder = weights.get("actorder")
        if actorder not in GROUP_ORDER + CONTIGUOUS_ORDER:
            raise ValueError(f"quantization_config weights actorder {actorder!r}: expected 'group', 'weight' or none")
        self.bits, self.pack = weights["num_bits"], 32 // weights["num_bits"]
        self.group_size = weights["group_size"] if weights["strategy"] == "group" else None
        self.symmetric = weights["symmetric"]
        self.act_order = actorder in GROUP_ORDER and self.group_size is not None
        self.prefix = prefix

    @property
    def zero_offset(self) -> int:
        """What a zero point adds to its stored value: stored values are offset by 2^(bits-1), so a
        symmetric scheme's zero point (which is not stored) is that, an asymmetric one's the stored."""
        return 2 ** (self.bits - 1) if self.symmetric else 0

    def create_weights(self, layer: nn.Module, input_size: int, output_sizes: list[int], params_dtype: torch.dtype,
                       weight_loader: Callable[..., None]) -> None:
        input_ranks = layer.tp.size if isinstance(layer, RowParallelLinear) else 1
        for name, param in self.packed_params(input_size, output_sizes, input_ranks, weight_loader).items():
            setattr(layer, name, param)
        layer.weight_shape = weight_param(torch.zeros(2, dtype=torch.int32), _load_shape)
        if self.act_order:
            layer.weight_g_idx = weight_param(torch.zeros(input_size, dtype=torch.int32),
                                              _one_order_for_all_parts(weight_loader, self.prefix), input_dim=0)

    def packed_params(self, input_size: int, output_sizes: list[int], input_ranks: int,
                      weight_loader: Callable[..., None], experts: int | None = None) -> dict[str, nn.Parameter]:
        """``weight_packed``, ``weight_scale`` and (asymmetric) ``weight_zero_point`` of a weight of
        ``input_size`` input features (this rank's, of ``input_ranks`` ranks splitting them) and parts
        of ``output_sizes`` rows; with ``experts``, stacked ``[experts, ...]`` (the metadata is one
        expert's)."""
        rows = sum(output_sizes)
        if input_size % self.pack:
            raise ValueError(f"quantization_config weights num_bits {self.bits} packs {self.pack} values to an int32; "
                             f"{self.prefix} has {input_size} input features (per rank)")
        groups, groups_split = rank_groups(input_size, input_ranks, self.group_size, self.act_order,
                                           "quantization_config weights group_size")
        group_dim = 1 if groups_split else None
        lead = () if experts is None else (experts,)
        params = {"weight_packed": weight_param(torch.zeros(*lead, rows, input_size // self.pack, dtype=torch.int32),
                                                weight_loader, output_dim=0, input_dim=1),
                  "weight_scale": weight_param(torch.zeros(*lead, rows, groups), weight_loader, output_dim=0,
                                               input_dim=group_dim)}
        if not self.symmetric:
            if any(size % self.pack for size in output_sizes):
                raise ValueError(f"quantization_config weights symmetric false: zero points pack {self.pack} output "
                                 f"rows to an int32; {self.prefix} has parts of {output_sizes} rows (per rank)")
            params["weight_zero_point"] = weight_param(
                torch.zeros(*lead, rows // self.pack, groups, dtype=torch.int32), weight_loader, output_dim=0,
                input_dim=group_dim, packed_dim=0, packed_factor=self.pack)
        return params

    def own_dummy_params(self, layer: nn.Module) -> set[str]:
        return {name for name in ("weight_scale", "weight_g_idx") if hasattr(layer, name)}

    def init_dummy_weights(self, layer: nn.Module, generator: torch.Generator) -> None:
        self.init_dummy_tensors(layer.weight_scale, getattr(layer, "weight_g_idx", None), generator)

    def init_dummy_tensors(self, scale: torch.Tensor, g_idx: torch.Tensor | None, generator: torch.Generator) -> None:
        """Positive ``scale`` ``[..., out, G]`` for the core's random codes (and zero points), and in
        activation order a valid shuffled ``g_idx`` ``[..., in]``."""
        fill_positive_scales(scale, uniform_code_std(self.bits, random_zero_point=not self.symmetric), generator)
        if g_idx is not None:
            fill_group_index(g_idx, scale.shape[-1], self.group_size, self.act_order, generator)

    def input_groups(self, inputs: int, g_idx: torch.Tensor | None, device: torch.device) -> torch.Tensor:
        """The group (column of ``weight_scale``) of each of a weight's ``inputs`` input features (this
        rank's): by ``g_idx`` in activation order, else by position."""
        if self.act_order:
            return g_idx.long()
        features = torch.arange(inputs, device=device)
        return features // self.group_size if self.group_size is not None else torch.zeros_like(features)

    def dequantize(self, packed: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None,
                   g_idx: torch.Tensor | None) -> torch.Tensor:
        """One weight's tensors (``[out, in / p]`` words, ``[out, G]`` scales, ``[out / p, G]`` zero
        points or None when symmetric) as ``[out, in]`` float32."""
        groups = self.input_groups(packed.shape[1] * self.pack, g_idx, packed.device)
        values = unpack_ints(packed, self.bits, dim=1).float()
        if zero_point is None:
            values = values - self.zero_offset
        else:
            values = values - unpack_ints(zero_point, self.bits, dim=0).float()[:, groups]
        return values * scale.float()[:, groups]

    def dequantized_weight(self, layer: nn.Module) -> torch.Tensor:
        """The layer's weight as ``[out, in]`` float32."""
        return self.dequantize(layer.weight_packed, layer.weight_scale, getattr(layer, "weight_zero_point", None),
                               getattr(layer, "weight_g_idx", None))

    def int_weight(self, layer: nn.Module) -> IntWeight:
        """The layer's packed tensors as the integer matmul kernel reads them: ``[out, in]`` tensors as
        transposed views."""
        zeros = None if self.symmetric else layer.weight_zero_point.t()
        return IntWeight(layer.weight_packed.t(), layer.weight_scale.t(), self.bits, zeros=zeros,
                         zero_offset=self.zero_offset, group_size=self.group_size,
                         g_idx=layer.weight_g_idx if self.act_order else None)

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return packed_linear(self, layer, x, bias)



class PackedIntExpertsMethod(DequantizingExpertsMethod):
    """An MoE layer's experts of a pack-quantized group. Where the fused MoE kernel applies it reads
    the stacked tensors as they load (words packed along the inputs, zero points along the outputs);
    groups in activation order (looked up by ``g_idx``, which the kernel does not read) take the
    dequantizing path."""

    def __init__(self, method: PackedIntMethod):
        self.method = method

    def create_weights(self, layer: nn.Module, num_experts: int, hidden_size: int, intermediate_size: int,
                       params_dtype: torch.dtype, weight_loader: Callable[..., None]) -> None:
        # stem: (inputs, parts' rows, ranks splitting the inputs); down's inputs split as a row-parallel layer's.
        shapes = {"w13": (hidden_size, [intermediate_size] * 2, 1),
                  "w2": (intermediate_size, [hidden_size], layer.tp.size)}
        vector_loader = functools.partial(load_expert_part_vector, layer.tp)
        for stem, (inputs, output_sizes, input_ranks) in shapes.items():
            params = self.method.packed_params(inputs, output_sizes, input_ranks, weight_loader, num_experts)
            parts = len(output_sizes)
            params["weight_shape"] = weight_param(torch.zeros(num_experts, parts, 2, dtype=torch.int32), vector_loader)
            if self.method.act_order:
                params["weight_g_idx"] = weight_param(torch.zeros(num_experts, parts, inputs, dtype=torch.int32),
                                                      vector_loader, input_dim=0)
            for name, param in params.items():
                setattr(layer, f"{stem}_{name}", param)

    def own_dummy_params(self, layer: nn.Module) -> set[str]:
        return {f"{stem}_{name}" for stem in ("w13", "w2") for name in ("weight_scale", "weight_g_idx")
                if hasattr(layer, f"{stem}_{name}")}

    def init_dummy_weights(self, layer: nn.Module, generator: torch.Generator) -> None:
        for stem in ("w13", "w2"):
            self.method.init_dummy_tensors(getattr(layer, f"{stem}_weight_scale"),
                                           getattr(layer, f"{stem}_weight_g_idx", None), generator)

    def fused_weight(self, layer: nn.Module, stem: str) -> QuantizedExperts | None:
        method = self.method
        if method.act_order:
            return None
        zeros = None if method.symmetric else getattr(layer, f"{stem}_weight_zero_point")
        return QuantizedExperts(getattr(layer, f"{stem}_weight_packed"), getattr(layer, f"{stem}_weight_scale"), "int",
                                scale_cols=method.group_size, bits=method.bits, packed_dim=2, zeros=zeros,
                                zero_offset=method.zero_offset)

    def dequantized(self, layer: nn.Module, stem: str, expert: int) -> torch.Tensor:
        method = self.method
        packed, scale = getattr(layer, f"{stem}_weight_packed")[expert], getattr(layer, f"{stem}_weight_scale")[expert]
        zero_point = None if method.symmetric else getattr(layer, f"{stem}_weight_zero_point")[expert]
        if not method.act_order:
            return method.dequantize(packed, scale, zero_point, None)
        # Each part (gate, up) with its own activation order.
        g_idx = getattr(layer, f"{stem}_weight_g_idx")[expert]
        rows = packed.shape[0] // g_idx.shape[0]
        return torch.cat([method.dequantize(packed.narrow(0, start, rows), scale.narrow(0, start, rows),
                                            None if zero_point is None else
                                            zero_point.narrow(0, start // method.pack, rows // method.pack), part_g_idx)
                          for start, part_g_idx in zip(range(0, packed.shape[0], rows), g_idx)])


def _one_order_for_all_parts(weight_loader: Callable[..., None], prefix: str) -> Callable[..., None]:
    """The loader of ``weight_g_idx``, which the parts of a fused layer share (they read the same
    input, so activation order groups their features alike): a part disagreeing is an error, as
    its weight would dequantize wrongly."""
    def load(param: torch.Tensor, loaded: torch.Tensor, shard_id: Any = None) -> None:
        before = param.data.clone()
        weight_loader(param, loaded, shard_id)
        if getattr(param, "loaded", False) and not torch.equal(before, param.data):
            raise ValueError(f"the parts fused into {prefix} have different weight_g_idx")
        param.loaded = True
    return load


def _load_shape(param: torch.Tensor, loaded: torch.Tensor, shard_id: Any = None) -> None:
    """``weight_shape``: the unpacked [out, in] of a checkpoint tensor (of one part of a fused
    layer); the packed tensors' own shapes are checked as they load, so it is kept as read."""
    if loaded.shape != (2,):
        raise ValueError(f"weight_shape has two elements [out, in], got shape {tuple(loaded.shape)}")
    param.data.copy_(loaded)

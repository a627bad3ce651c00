"""Stacked expert weights of a mixture-of-experts block, and how checkpoint tensors load into them.

A fused MoE kernel wants every expert's weights in one tensor: ``w13_weight``
``[num_experts, 2 * intermediate / tp, hidden]`` (each expert's gate rows, then its up rows) and
``w2_weight`` ``[num_experts, hidden, intermediate / tp]``. Checkpoints store experts one by one
(``experts.3.w1.weight``) or all at once (DBRX's ``experts.mlp.w1``, ``[E * intermediate, hidden]``);
``ExpertWeights.weight_loader`` takes either, with ``shard_id=(expert_id, part)``, and cuts this
rank's tensor-parallel piece: gate and up along the intermediate (output) dim, down along its
input dim. The MoE layer that computes with these weights builds on this module.

Expert parallelism (``tp.expert_parallel``, ``--enable-ep-moe``): rank ``r`` holds experts
``[r * E / tp, (r + 1) * E / tp)`` whole instead. Each stacked parameter's loader (this module's
or a quantization method's) is handed only those experts' tensors, by their index on this rank,
and ``local_ids`` maps the router's ids the same way, ``NOT_LOCAL`` for another rank's expert (a
pair every expert computation skips: its output comes from its own rank through the all-reduce).
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import torch
from torch import nn

from sglang_core.layers.parallel import SINGLE, TPGroup, load_input_shard, load_output_shard, split_fused
from sglang_core.layers.quant import ExpertsQuantMethod, weight_param

# Checkpoint spellings of an expert's projections -> the role the loader gives them.
EXPERT_PARTS = {
    "w1": "gate", "gate": "gate", "gate_proj": "gate",
    "w3": "up", "up": "up", "up_proj": "up",
    "w2": "down", "down": "down", "down_proj": "down",
    "w13": "gate_up", "gate_up": "gate_up", "gate_up_proj": "gate_up",
}
# The stacked parameter (name stem) each role loads into.
PART_STEMS = {"gate": "w13", "up": "w13", "gate_up": "w13", "down": "w2"}
# Each role's place(s) among its stacked parameter's parts (w13: gate, up; w2: down), where a
# quantization method keeps a quantity per expert and part (a per-tensor scale, GPTQ's g_idx).
PART_SLOTS = {"gate": [0], "up": [1], "gate_up": [0, 1], "down": [0]}
# A (token, choice) pair whose expert another rank holds (expert parallelism).
NOT_LOCAL = -1


class ExpertWeights(nn.Module):
    """``num_experts`` gated MLPs' weights, stacked; this rank holds ``intermediate_size / tp`` of each,
    or with ``tp.expert_parallel`` ``num_experts / tp`` whole experts from ``first_expert`` on
    (``num_experts`` is then this rank's count, ``total_experts`` the layer's, and ``tp`` the
    one-rank group: no expert is split).

    The ``output_dim`` / ``input_dim`` metadata of a stacked parameter (``quant.weight_param``) name
    the dims of one expert's slice, so a quantization method (``quant_method``, an
    ``ExpertsQuantMethod``) creates packed stacked tensors (``w13_qweight``, ...) in their place
    with ``self.weight_loader`` and they load the same way.

    ``shared_experts``: that many more experts stacked after the routed ones (``layers.moe``'s
    stacked shared experts, not with expert parallelism), loaded one by one; a checkpoint tensor of
    every expert holds the routed ones.
    """

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, tp: TPGroup = SINGLE,
                 params_dtype: torch.dtype = torch.float32, quant_method: ExpertsQuantMethod | None = None,
                 shared_experts: int = 0):
        super().__init__()
        self.total_experts, self.first_expert = num_experts, 0
        self.shared_experts = shared_experts
        if tp.expert_parallel:
            if num_experts % tp.size:
                raise ValueError(f"enable_ep_moe: {num_experts} experts do not split evenly over ep_size={tp.size} ranks")
            num_experts //= tp.size
            self.first_expert = tp.rank * num_experts
            tp = SINGLE
        self.tp = tp
        self.num_experts = num_experts + shared_experts
        num_experts = self.num_experts
        self.intermediate_size = tp.split(intermediate_size, "moe_intermediate_size")  # this rank's
        size = self.intermediate_size
        self.quant_method = quant_method
        if quant_method is not None:
            quant_method.create_weights(self, num_experts, hidden_size, size, params_dtype, self.weight_loader)
        else:
            self.w13_weight = weight_param(torch.zeros(num_experts, 2 * size, hidden_size, dtype=params_dtype),
                                           self.weight_loader, output_dim=0, input_dim=1)
            self.w2_weight = weight_param(torch.zeros(num_experts, hidden_size, size, dtype=params_dtype),
                                          self.weight_loader, output_dim=0, input_dim=1)
        for param in self.parameters(recurse=False):
            param.total_experts = self.total_experts  # what a checkpoint tensor of every expert stacks
            loader = getattr(param, "weight_loader", None)
            if loader is not None and self.num_experts < self.total_experts:
                param.weight_loader = functools.partial(self._load_own_experts, loader)

    def local_ids(self, topk_ids: torch.Tensor) -> torch.Tensor:
        """The router's expert ids as indices into this rank's stacked experts, ``NOT_LOCAL`` where
        another rank holds the expert; the ids themselves when this rank holds every expert."""
        if self.num_experts - self.shared_experts == self.total_experts:
            return topk_ids
        local = topk_ids - self.first_expert
        return torch.where((local >= 0) & (local < self.num_experts), local, NOT_LOCAL)

    def _load_own_experts(self, loader: Callable[..., None], param: torch.Tensor, loaded: torch.Tensor,
                          shard_id: tuple[int | None, str]) -> None:
        """Expert parallelism: ``loader`` gets this rank's experts' tensors, each by its index here;
        the other experts' tensors are dropped."""
        expert, _ = _parse_shard_id(shard_id)
        if expert is None:
            if loaded.shape[0] != self.total_experts:
                raise ValueError(f"experts tensor of shape {tuple(loaded.shape)} does not stack {self.total_experts} experts")
            for index in range(self.num_experts):
                loader(param, loaded[self.first_expert + index], (index, shard_id[1]))
        elif not 0 <= expert < self.total_experts:
            raise ValueError(f"expert id {expert} is out of range (num_experts={self.total_experts})")
        elif 0 <= expert - self.first_expert < self.num_experts:
            loader(param, loaded, (expert - self.first_expert, shard_id[1]))

    def weight_loader(self, param: torch.Tensor, loaded: torch.Tensor, shard_id: tuple[int | None, str]) -> None:
        """Load one expert's ``part`` (``"w1"``/``"gate"``, ``"w3"``/``"up"``, ``"w2"``/``"down"``, or
        fused ``"w13"``/``"gate_up"`` holding gate then up) into ``param``; ``expert_id=None``:
        ``loaded`` holds every expert, stacked ``[num_experts, ...]``."""
        expert, part = _parse_shard_id(shard_id)
        if expert is None:
            routed = self.num_experts - self.shared_experts
            if loaded.shape[0] != routed:
                raise ValueError(f"experts tensor of shape {tuple(loaded.shape)} does not stack {routed} experts")
            for index, piece in enumerate(loaded):
                self.weight_loader(param, piece, (index, part))
            return
        if not 0 <= expert < self.num_experts:
            raise ValueError(f"expert id {expert} is out of range (num_experts={self.num_experts})")
        dst = param.data[expert]
        size = self.intermediate_size
        if part == "down":
            load_input_shard(param, dst, loaded, self.tp)
        elif part == "gate_up":
            for half, piece in zip(("gate", "up"), split_fused(param, loaded, [size * self.tp.size] * 2)):
                self.weight_loader(param, piece, (expert, half))
        else:
            load_output_shard(param, dst, loaded, 0 if part == "gate" else size, size, self.tp.rank)


def _parse_shard_id(shard_id: Any) -> tuple[int | None, str]:
    if not (isinstance(shard_id, tuple) and len(shard_id) == 2 and shard_id[1] in EXPERT_PARTS):
        raise ValueError(f"expert shard_id must be (expert_id, part) with part one of {sorted(EXPERT_PARTS)}; "
                         f"got {shard_id!r}")
    expert, part = shard_id
    return (None if expert is None else int(expert)), EXPERT_PARTS[part]

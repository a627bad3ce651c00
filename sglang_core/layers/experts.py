"""Stacked expert weights of a mixture-of-experts block, and how checkpoint tensors load into them.

A fused MoE kernel wants every expert's weights in one tensor: ``w13_weight``
``[num_experts, 2 * intermediate / tp, hidden]`` (each expert's gate rows, then its up rows) and
``w2_weight`` ``[num_experts, hidden, intermediate / tp]``. Checkpoints store experts one by one
(``experts.3.w1.weight``) or all at once (DBRX's ``experts.mlp.w1``, ``[E * intermediate, hidden]``);
``ExpertWeights.weight_loader`` takes either, with ``shard_id=(expert_id, part)``, and cuts this
rank's tensor-parallel piece: gate and up along the intermediate (output) dim, down along its
input dim. The MoE layer that computes with these weights builds on this module.
"""

from __future__ import annotations

from typing import Any

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


class ExpertWeights(nn.Module):
    """``num_experts`` gated MLPs' weights, stacked; this rank holds ``intermediate_size / tp`` of each.

    The ``output_dim`` / ``input_dim`` metadata of a stacked parameter (``quant.weight_param``) name
    the dims of one expert's slice, so a quantization method (``quant_method``, an
    ``ExpertsQuantMethod``) creates packed stacked tensors (``w13_qweight``, ...) in their place
    with ``self.weight_loader`` and they load the same way.
    """

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, tp: TPGroup = SINGLE,
                 params_dtype: torch.dtype = torch.float32, quant_method: ExpertsQuantMethod | None = None):
        super().__init__()
        self.tp = tp
        self.num_experts = num_experts
        self.intermediate_size = tp.split(intermediate_size, "moe_intermediate_size")  # this rank's
        size = self.intermediate_size
        self.quant_method = quant_method
        if quant_method is not None:
            quant_method.create_weights(self, num_experts, hidden_size, size, params_dtype, self.weight_loader)
            return
        self.w13_weight = weight_param(torch.zeros(num_experts, 2 * size, hidden_size, dtype=params_dtype),
                                       self.weight_loader, output_dim=0, input_dim=1)
        self.w2_weight = weight_param(torch.zeros(num_experts, hidden_size, size, dtype=params_dtype),
                                      self.weight_loader, output_dim=0, input_dim=1)

    def weight_loader(self, param: torch.Tensor, loaded: torch.Tensor, shard_id: tuple[int | None, str]) -> None:
        """Load one expert's ``part`` (``"w1"``/``"gate"``, ``"w3"``/``"up"``, ``"w2"``/``"down"``, or
        fused ``"w13"``/``"gate_up"`` holding gate then up) into ``param``; ``expert_id=None``:
        ``loaded`` holds every expert, stacked ``[num_experts, ...]``."""
        expert, part = _parse_shard_id(shard_id)
        if expert is None:
            if loaded.shape[0] != self.num_experts:
                raise ValueError(f"experts tensor of shape {tuple(loaded.shape)} does not stack {self.num_experts} experts")
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

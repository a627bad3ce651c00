"""Mixture-of-experts routing: which ``top_k`` experts each token goes to, and with what weights.

The scoring families the released MoE models use:

- softmax over the router logits, top-k of the probabilities, renormalised to sum to 1 or not
  (Mixtral renormalises; Qwen2/3-MoE as ``norm_topk_prob`` says; DeepSeek-V2 does not), or to a
  unit p-norm (DBRX's ``moe_normalize_expert_weights``);
- DeepSeek-V2's ``group_limited_greedy``: the experts split into ``num_groups`` groups, each
  group scored by its best probability, the top-k taken only inside the best ``topk_groups``;
- DeepSeek-V3's ``noaux_tc``: sigmoid scores; the choice (not the weights) reads the scores plus
  a learned ``e_score_correction_bias``, groups scored by the sum of their two best biased
  scores; the weights are the unbiased scores of the chosen experts.

Every family then multiplies the weights by ``routed_scaling_factor``. Routing runs in float32;
on CUDA the softmax families without groups or bias run as one kernel (``kernels.moe_topk``).

A block that stacks its shared experts after its ``E`` routed ones (``layers.moe.MoE``'s
``stacked_shared_experts``) has its router append their ids ``E ..`` with weight 1 to every
token's choice, so the experts' one computation covers them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from sglang_core.kernels import use_fused

SCORINGS = ("softmax", "sigmoid")
GROUP_SCORES = ("max", "top2_sum")


@dataclass(frozen=True)
class Routing:
    """How a router turns logits into ``(weights, expert ids)``; see the module docstring.

    ``num_groups`` / ``topk_groups``: grouped top-k (1 / 1: no grouping). ``group_score``:
    ``"max"`` (DeepSeek-V2) or ``"top2_sum"`` (DeepSeek-V3). ``correction_bias``: the router owns
    an ``e_score_correction_bias`` added to the scores for the choice only. ``renormalize_p``: with
    ``renormalize``, the weights are divided by their p-norm (1: their sum).
    """

    top_k: int
    scoring: str = "softmax"
    renormalize: bool = False
    num_groups: int = 1
    topk_groups: int = 1
    group_score: str = "max"
    correction_bias: bool = False
    scaling_factor: float = 1.0
    renormalize_p: float = 1.0

    def check(self, num_experts: int) -> None:
        """ValueErrors naming the config field a bad value came from."""
        if not isinstance(self.top_k, int) or not 0 < self.top_k <= num_experts:  # None: a config without it
            raise ValueError(f"num_experts_per_tok: {self.top_k} is not in 1..{num_experts} (the number of experts)")
        if not self.renormalize_p > 0:
            raise ValueError(f"moe_normalize_expert_weights: {self.renormalize_p} is not a positive p of a p-norm")
        if self.scoring not in SCORINGS:
            raise ValueError(f"scoring_func: {self.scoring!r} is not one of {', '.join(SCORINGS)}")
        if self.group_score not in GROUP_SCORES:
            raise ValueError(f"topk_method: group score {self.group_score!r} is not one of {', '.join(GROUP_SCORES)}")
        if not isinstance(self.num_groups, int) or self.num_groups < 1 or num_experts % self.num_groups:
            raise ValueError(f"n_group: {self.num_groups} does not divide the {num_experts} experts")
        if not isinstance(self.topk_groups, int) or not 0 < self.topk_groups <= self.num_groups:
            raise ValueError(f"topk_group: {self.topk_groups} is not in 1..{self.num_groups} (n_group)")
        per_group = num_experts // self.num_groups
        if self.top_k > self.topk_groups * per_group:
            raise ValueError(f"num_experts_per_tok: {self.top_k} experts do not fit in topk_group={self.topk_groups} "
                             f"groups of {per_group}")
        if self.group_score == "top2_sum" and self.num_groups > 1 and per_group < 2:
            raise ValueError(f"n_group: groups of {per_group} expert cannot be scored by their two best")


def select_experts(logits: torch.Tensor, routing: Routing,
                   correction_bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(weights [T, top_k] float32, expert ids [T, top_k] int64)`` for router ``logits`` [T, E]."""
    logits = logits.float()
    scores = logits.softmax(dim=-1) if routing.scoring == "softmax" else logits.sigmoid()
    choice = scores if correction_bias is None else scores + correction_bias.float()
    if routing.num_groups > 1:
        choice = _keep_best_groups(choice, routing)
    ids = choice.topk(routing.top_k, dim=-1).indices
    weights = scores.gather(1, ids)
    if routing.renormalize:
        norm = (weights.sum(dim=-1, keepdim=True) if routing.renormalize_p == 1
                else weights.norm(p=routing.renormalize_p, dim=-1, keepdim=True))
        weights = weights / norm
    if routing.scaling_factor != 1.0:
        weights = weights * routing.scaling_factor
    return weights, ids


def _keep_best_groups(choice: torch.Tensor, routing: Routing) -> torch.Tensor:
    """``choice`` with every expert outside each token's ``topk_groups`` best groups set to -inf."""
    grouped = choice.unflatten(-1, (routing.num_groups, -1))
    if routing.group_score == "max":
        group_scores = grouped.max(dim=-1).values
    else:
        group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)
    best = group_scores.topk(routing.topk_groups, dim=-1).indices
    keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, best, True)
    return grouped.masked_fill(~keep[..., None], float("-inf")).flatten(-2)


class Router(nn.Module):
    """The router ("gate") of an MoE block: ``weight`` [E, hidden] (replicated on every
    tensor-parallel rank), and ``e_score_correction_bias`` [E] when the routing has one.
    ``shared_experts``: that many ids appended with weight 1 (``append_shared_experts``).

    The logits are computed in ``params_dtype`` (Mixtral's and Qwen's routers run in the model
    dtype; DeepSeek's keep a float32 weight) and routed in float32."""

    def __init__(self, hidden_size: int, num_experts: int, routing: Routing,
                 params_dtype: torch.dtype = torch.float32, shared_experts: int = 0):
        super().__init__()
        routing.check(num_experts)
        self.routing = routing
        self.shared_experts = shared_experts
        self.weight = nn.Parameter(torch.zeros(num_experts, hidden_size, dtype=params_dtype), requires_grad=False)
        self.e_score_correction_bias = (nn.Parameter(torch.zeros(num_experts), requires_grad=False)
                                        if routing.correction_bias else None)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self._logits(x)
        routing = self.routing
        if use_fused(logits) and one_kernel_routing(routing):
            from sglang_core.kernels.moe_topk import softmax_topk

            return softmax_topk(logits, routing.top_k, routing.renormalize, routing.scaling_factor,
                                self.shared_experts)
        weights, ids = select_experts(logits, routing, self.e_score_correction_bias)
        return append_shared_experts(weights, ids, self.weight.shape[0], self.shared_experts)

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` times the weight in the weight's dtype; one row on CUDA in the GEMV kernel, which
        reads a 16-bit ``x`` against a float32 weight as it is (no launch to cast it)."""
        if use_fused(x):
            from sglang_core.kernels import gemv

            if gemv.fits(x, self.weight):
                return gemv.gemv(x, self.weight)
        return F.linear(x.to(self.weight.dtype), self.weight)


def append_shared_experts(weights: torch.Tensor, ids: torch.Tensor, num_experts: int,
                          shared: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each token's ``(weights, ids)`` followed by ids ``num_experts .. num_experts + shared - 1``
    with weight 1: shared experts stacked after the routed ones."""
    if not shared:
        return weights, ids
    tokens = ids.shape[0]
    shared_ids = torch.arange(num_experts, num_experts + shared, device=ids.device).expand(tokens, shared)
    return (torch.cat([weights, weights.new_ones(tokens, shared)], dim=1),
            torch.cat([ids, shared_ids.to(ids.dtype)], dim=1))


def one_kernel_routing(routing: Routing) -> bool:
    """Whether ``kernels.moe_topk.softmax_topk`` computes ``routing`` (one launch instead of up to
    six): softmax scores, no groups, no correction bias, renormalised by the sum if at all."""
    return (routing.scoring == "softmax" and routing.num_groups == 1 and not routing.correction_bias
            and routing.renormalize_p == 1)

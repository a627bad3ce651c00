"""A mixture-of-experts block: router, stacked routed experts, optional (gated) shared expert.

``run_experts`` is the one seam the experts are computed through: on CUDA with a gate activation
the kernel supports (its ``ACTIVATIONS``: SiLU, erf and tanh GELU) it is the fused Triton kernel
(``kernels.fused_moe.fused_moe``), elsewhere ``experts_reference``; both take ``(hidden [T, H],
w13 [E, 2I, H], w2 [E, H, I], topk_weights [T, k], topk_ids [T, k])`` and return ``[T, H]``,
summing the weighted expert outputs in float32. Another activation on CUDA runs the reference,
which while a CUDA graph is being captured runs every expert on every token (``every_expert``:
grouping tokens by expert reads each expert's count on the host). A quantized MoE layer
computes through its ``ExpertsQuantMethod`` instead: where ``fused_moe_activation`` names one, the
fused kernel on its quantized tensors (``kernels.moe_weight.QuantizedExperts``), else
``experts_by_expert``, the same per-expert loop over any expert computation (dequantize, then
multiply).

Tensor parallelism as the dense MLP: each rank holds ``I / tp`` of every expert
(``ExpertWeights``), so its sum is partial and one all-reduce follows; the shared expert is a
``GatedMLP``, which reduces itself. Expert parallelism (``tp.expert_parallel``): each rank holds
``E / tp`` whole experts; every rank routes every token alike (the same router weights and
input), computes only the pairs of its experts (the others' ids are ``NOT_LOCAL``, which every
expert computation here and the fused kernel skip) and the same one all-reduce sums the ranks'
parts. The shared expert stays tensor-parallel: every token goes through it, so split by its
intermediate size each rank does ``1 / tp`` of its work (replicated, every rank would do all of
it), and its reduction is the dense MLP's. On one rank (nothing reduced in between) with float
experts, the shared expert runs first and ``run_experts`` adds its output in the fused kernel's
last launch (``addend``), one launch fewer per layer than adding it after.

Stacked shared experts (``stacked_shared_experts``: ungated, unbiased shared experts of the
routed experts' width, DeepSeek's): they are held as experts ``E ..`` after the ``E`` routed ones
in the same stacked weights (loaded from the shared MLP's tensors cut by ``shared_expert_pieces``;
stored once), the router appends their ids with weight 1, and one experts computation sums them
with the routed pairs in float32: at batch 1 on CUDA, the fused kernel's launches do the shared
MLP's three. Tensor parallelism splits them as the routed experts; under expert parallelism
(ranks hold whole routed experts) or with quantized experts a block keeps a ``shared_expert``
module instead (``can_stack_shared_experts``).
"""

from __future__ import annotations

import abc
from typing import Callable

import torch
from torch import nn

from sglang_core.kernels import use_fused
from sglang_core.kernels.moe_weight import QuantizedExperts
from sglang_core.layers.activation import SiluAndMul, gated_act_fn
from sglang_core.layers.experts import EXPERT_PARTS, NOT_LOCAL, ExpertWeights
from sglang_core.layers.moe_router import Router, Routing
from sglang_core.layers.parallel import SINGLE, TPGroup
from sglang_core.layers.quant import ExpertsQuantMethod


def experts_by_expert(hidden: torch.Tensor, num_experts: int, expert_mlp: Callable[[int, torch.Tensor], torch.Tensor],
                      topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
    """``sum_j topk_weights[t, j] * expert_mlp(e, hidden[t])`` over each token's experts
    ``e = topk_ids[t, j]`` (``NOT_LOCAL`` ids skipped), summed in float32; ``expert_mlp(e, x)``
    maps expert ``e``'s tokens ``[n, H]`` to ``[n, H]``.

    Tokens are grouped by expert so each expert runs once over its tokens; an expert no token
    chose costs nothing (a quantized one is not even dequantized). While a CUDA graph is being
    captured (the grouping reads each expert's token count on the host) ``every_expert`` runs."""
    if hidden.is_cuda and torch.cuda.is_current_stream_capturing():
        return every_expert(hidden, num_experts, expert_mlp, topk_weights, topk_ids)
    top_k = topk_ids.shape[1]
    flat_ids = topk_ids.flatten()
    order = flat_ids.argsort(stable=True)
    # NOT_LOCAL (-1) pairs sort first, into a group of their own that is skipped.
    counts = torch.bincount(flat_ids - NOT_LOCAL, minlength=num_experts + 1).tolist()
    out = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device)
    flat_weights = topk_weights.flatten().float()
    for expert, picks in enumerate(order.split(counts)[1:]):
        if picks.numel() == 0:
            continue
        tokens = picks // top_k
        out.index_add_(0, tokens, expert_mlp(expert, hidden[tokens]).float() * flat_weights[picks, None])
    return out.to(hidden.dtype)


def every_expert(hidden: torch.Tensor, num_experts: int, expert_mlp: Callable[[int, torch.Tensor], torch.Tensor],
                 topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
    """``experts_by_expert``'s sum computed by running every expert on every token, weighted by
    the token's routing weight for it (0 where not chosen). It never reads routing results on the
    host, so a CUDA graph can capture it (decode batches: ``E / k`` times the work of a few rows)."""
    # Column 0 collects the NOT_LOCAL (-1) pairs' weights, and is not used.
    combine = torch.zeros(hidden.shape[0], num_experts + 1, dtype=torch.float32, device=hidden.device)
    combine.scatter_add_(1, topk_ids - NOT_LOCAL, topk_weights.float())
    combine = combine[:, 1:]
    out = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device)
    for expert in range(num_experts):
        out += expert_mlp(expert, hidden).float() * combine[:, expert, None]
    return out.to(hidden.dtype)


def _gated_mlp(w13: torch.Tensor, w2: torch.Tensor, act: nn.Module | None) -> Callable[[int, torch.Tensor], torch.Tensor]:
    act = act or SiluAndMul()
    return lambda expert, x: act(x @ w13[expert].t()) @ w2[expert].t()


def experts_reference(hidden: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
                      topk_ids: torch.Tensor, act: nn.Module | None = None) -> torch.Tensor:
    """``sum_j topk_weights[t, j] * down_e(act(gate_up_e(hidden[t])))`` over each token's experts
    ``e = topk_ids[t, j]``; ``act`` (default SiLU-and-mul) maps ``[.., 2I]`` to ``[.., I]``."""
    return experts_by_expert(hidden, w13.shape[0], _gated_mlp(w13, w2, act), topk_weights, topk_ids)


def experts_dense(hidden: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
                  topk_ids: torch.Tensor, act: nn.Module | None = None) -> torch.Tensor:
    """``experts_reference``'s sum by ``every_expert`` (what a CUDA graph captures)."""
    return every_expert(hidden, w13.shape[0], _gated_mlp(w13, w2, act), topk_weights, topk_ids)


def fused_moe_activation(hidden: torch.Tensor, act: nn.Module) -> str | None:
    """The fused MoE kernel's name for ``act`` where the kernel computes experts on ``hidden`` with
    it (CUDA with Triton, and ``act``'s ``kernel_name`` among the kernel's ``ACTIVATIONS``), else
    None. Quantized experts' methods ask too, before handing the kernel their packed tensors."""
    name = getattr(act, "kernel_name", None)
    if name is None or not use_fused(hidden):
        return None
    from sglang_core.kernels.fused_moe import ACTIVATIONS  # imports Triton: only where it runs

    return name if name in ACTIVATIONS else None


def run_experts(hidden: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
                topk_ids: torch.Tensor, act: nn.Module, addend: torch.Tensor | None = None) -> torch.Tensor:
    """The routed experts' weighted sum (plus ``addend``, in the kernel's last launch): the fused
    kernel where it applies, else the reference."""
    activation = fused_moe_activation(hidden, act)
    if activation is not None:
        from sglang_core.kernels.fused_moe import fused_moe

        return fused_moe(hidden, w13, w2, topk_weights, topk_ids, activation, addend=addend)
    out = experts_reference(hidden, w13, w2, topk_weights, topk_ids, act)
    return out if addend is None else out + addend


class KernelExpertsMethod(ExpertsQuantMethod):
    """Quantized routed experts computed by the fused MoE kernel where it applies (CUDA) and the
    method describes its weights as the kernel reads them (``fused_weight``), else expert by
    expert (each expert that got tokens) with the method's own product (``expert_product``)."""

    @abc.abstractmethod
    def fused_weight(self, layer: nn.Module, stem: str) -> QuantizedExperts | None:
        """The stacked ``stem`` (``"w13"`` or ``"w2"``) weight as the fused MoE kernel reads it, or
        None where only the expert-by-expert path computes it."""

    @abc.abstractmethod
    def expert_product(self, layer: nn.Module, stem: str, expert: int, x: torch.Tensor) -> torch.Tensor:
        """``x`` times expert ``expert``'s ``stem`` weight transposed, as the format computes it
        (activations quantized where the scheme says so), in ``x``'s dtype."""

    def apply(self, layer: nn.Module, hidden: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
              act: nn.Module) -> torch.Tensor:
        activation = fused_moe_activation(hidden, act)
        if activation is not None:
            w13, w2 = self.fused_weight(layer, "w13"), self.fused_weight(layer, "w2")
            if w13 is not None and w2 is not None:
                from sglang_core.kernels.fused_moe import fused_moe

                return fused_moe(hidden, w13, w2, topk_weights, topk_ids, activation)

        def expert_mlp(expert: int, x: torch.Tensor) -> torch.Tensor:
            return self.expert_product(layer, "w2", expert, act(self.expert_product(layer, "w13", expert, x)))

        return experts_by_expert(hidden, layer.num_experts, expert_mlp, topk_weights, topk_ids)


def can_stack_shared_experts(tp: TPGroup, quant_method: ExpertsQuantMethod | None) -> bool:
    """Whether a block's shared experts may be stacked after its routed ones (where they are also
    ungated and unbiased, which the plugin knows): float experts, no expert parallelism."""
    return quant_method is None and not tp.expert_parallel


def shared_expert_pieces(tensor: torch.Tensor, part: str, count: int) -> tuple[torch.Tensor, ...]:
    """A checkpoint tensor of a shared MLP that is ``count`` experts wide, cut into each expert's:
    gate and up rows, down columns (a gated MLP's sum over its intermediate width splits)."""
    role = EXPERT_PARTS.get(part)
    if role not in ("gate", "up", "down"):
        raise ValueError(f"shared expert part {part!r}: only gate, up and down projections stack")
    return tensor.chunk(count, dim=1 if role == "down" else 0)


class MoE(nn.Module):
    """``routed(x) + shared(x)``: the router (``gate``) picks ``routing.top_k`` of ``num_experts``
    gated MLPs (``experts``, each ``down(act(gate) * up)`` of width ``intermediate_size``) per token.

    ``quant_method``: the experts' quantization method (``ctx.experts_method_for(prefix)``); None:
    float experts through ``run_experts``.

    ``shared_expert``: a module every token also goes through (a ``GatedMLP``), weighted, when
    ``shared_expert_gate``, by ``sigmoid(shared_expert_gate(x))`` (Qwen2-MoE's scalar gate per token).
    ``stacked_shared_experts``: instead, that many shared experts of ``intermediate_size`` held after
    the routed ones (see the module docstring; ``can_stack_shared_experts`` says where).
    """

    def __init__(self, hidden_size: int, num_experts: int, intermediate_size: int, routing: Routing,
                 hidden_act: str = "silu", tp: TPGroup = SINGLE, params_dtype: torch.dtype = torch.float32, *,
                 shared_expert: nn.Module | None = None, shared_expert_gate: bool = False,
                 router_dtype: torch.dtype | None = None, quant_method: ExpertsQuantMethod | None = None,
                 stacked_shared_experts: int = 0):
        super().__init__()
        if shared_expert_gate and shared_expert is None:
            raise ValueError("shared_expert_gate: there is no shared expert to gate")
        if stacked_shared_experts and (shared_expert is not None or not can_stack_shared_experts(tp, quant_method)):
            raise ValueError("stacked_shared_experts: only without a shared_expert module, quantized experts or "
                             "expert parallelism")
        self.tp = tp
        self.stacked_shared_experts = stacked_shared_experts
        self.gate = Router(hidden_size, num_experts, routing, router_dtype or params_dtype, stacked_shared_experts)
        self.experts = ExpertWeights(num_experts, hidden_size, intermediate_size, tp, params_dtype, quant_method,
                                     stacked_shared_experts)
        self.act = gated_act_fn(hidden_act)
        self.shared_expert = shared_expert
        self.shared_expert_gate = (nn.Linear(hidden_size, 1, bias=False, dtype=params_dtype).requires_grad_(False)
                                   if shared_expert_gate else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        topk_weights, topk_ids = self.gate(x)
        topk_ids = self.experts.local_ids(topk_ids)
        shared = None
        if self.shared_expert is not None:
            shared = self.shared_expert(x)
            if self.shared_expert_gate is not None:
                shared = torch.sigmoid(self.shared_expert_gate(x)) * shared
        method = self.experts.quant_method
        # On one rank (no all-reduce between) float experts add the shared output in their last launch.
        add_inside = shared is not None and method is None and self.tp.size == 1
        if method is not None:
            out = method.apply(self.experts, x, topk_weights, topk_ids, self.act)
        else:
            out = run_experts(x, self.experts.w13_weight, self.experts.w2_weight, topk_weights, topk_ids, self.act,
                              shared if add_inside else None)
        out = self.tp.all_reduce(out)
        return out + shared if shared is not None and not add_inside else out

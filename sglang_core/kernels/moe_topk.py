"""Softmax top-k routing of an MoE router's logits in one kernel launch.

``select_experts`` in PyTorch is a softmax, a top-k, a gather, and with renormalisation or a
scaling factor a sum and one or two products: up to six launches per MoE layer and decode step.
Here one program per token loads its row of logits, takes the softmax in float32, picks the
``top_k`` largest probabilities one at a time (the largest first, as ``torch.topk`` orders
them; among equal ones the lowest expert id) and writes their weights (divided by their sum when
renormalised, then scaled) and ids. It covers softmax scoring without expert groups, correction
bias or a p-norm other than 1 (Mixtral, Qwen2/3-MoE, DeepSeek-V2's ``greedy``, GraniteMoE);
the router (``layers.moe_router.Router``) keeps the PyTorch path for the rest and off CUDA.

``shared``: a block whose shared experts are stacked after its routed ones (``layers.moe``) gets
their ids ``E .. E + shared - 1`` with weight 1 written after the top-k in the same launch, so
the fused MoE kernel computes them as pairs of every token.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sglang_core.kernels.opaque import opaque_to_compiler
from sglang_core.kernels.pdl import launch_options, pdl_enter


@triton.jit
def _first_largest(values, experts, BLOCK_E: tl.constexpr):
    """The lowest expert id among the largest ``values``."""
    return tl.min(tl.where(values == tl.max(values, 0), experts, BLOCK_E), 0)


@triton.jit
def _softmax_topk_kernel(Logits, Weights, Ids, stride_l, num_experts, scaling, TOP_K: tl.constexpr,
                         SHARED: tl.constexpr, RENORMALIZE: tl.constexpr, BLOCK_E: tl.constexpr,
                         USE_PDL: tl.constexpr):
    pdl_enter(USE_PDL)
    row = tl.program_id(0)
    experts = tl.arange(0, BLOCK_E)
    valid = experts < num_experts
    logits = tl.load(Logits + row * stride_l + experts, mask=valid, other=float("-inf")).to(tl.float32)
    exps = tl.exp(logits - tl.max(logits, 0))
    probs = exps / tl.sum(exps, 0)
    # Probabilities are >= 0: -1 marks padding and experts already taken, never a maximum.
    left = tl.where(valid, probs, -1.0)
    taken = tl.zeros([BLOCK_E], dtype=tl.int1)
    for j in tl.static_range(TOP_K):
        best = _first_largest(left, experts, BLOCK_E)
        taken = taken | (experts == best)
        left = tl.where(experts == best, -1.0, left)
    # The chosen weights in the order taken; renormalised by their sum, then scaled, as select_experts.
    total = tl.sum(tl.where(taken, probs, 0.0), 0)
    left = tl.where(taken, probs, -1.0)
    for j in tl.static_range(TOP_K):
        best = _first_largest(left, experts, BLOCK_E)
        weight = tl.max(left, 0)
        if RENORMALIZE:
            weight = weight / total
        tl.store(Weights + row * (TOP_K + SHARED) + j, weight * scaling)
        tl.store(Ids + row * (TOP_K + SHARED) + j, best.to(tl.int64))
        left = tl.where(experts == best, -1.0, left)
    for j in tl.static_range(SHARED):
        tl.store(Weights + row * (TOP_K + SHARED) + TOP_K + j, 1.0)
        tl.store(Ids + row * (TOP_K + SHARED) + TOP_K + j, (num_experts + j).to(tl.int64))


@opaque_to_compiler
def softmax_topk(logits: torch.Tensor, top_k: int, renormalize: bool = False, scaling: float = 1.0,
                 shared: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(weights [T, top_k + shared] float32, ids [T, top_k + shared] int64)``: each row of
    ``logits`` [T, E] softmaxed in float32, its ``top_k`` largest probabilities (largest first),
    divided by their sum when ``renormalize``, times ``scaling``; then ids ``E .. E + shared - 1``
    with weight 1 (shared experts stacked after the routed ones)."""
    tokens, num_experts = logits.shape
    if not 0 < top_k <= num_experts:
        raise ValueError(f"top_k: {top_k} is not in 1..{num_experts} (the number of experts)")
    if shared < 0:
        raise ValueError(f"shared: {shared} shared experts is negative")
    weights = torch.empty(tokens, top_k + shared, dtype=torch.float32, device=logits.device)
    ids = torch.empty(tokens, top_k + shared, dtype=torch.int64, device=logits.device)
    if tokens == 0:
        return weights, ids
    logits = logits if logits.stride(1) == 1 else logits.contiguous()
    _softmax_topk_kernel[(tokens,)](logits, weights, ids, logits.stride(0), num_experts, float(scaling),
                                    TOP_K=top_k, SHARED=shared, RENORMALIZE=renormalize,
                                    BLOCK_E=triton.next_power_of_2(num_experts), num_warps=1,
                                    **launch_options(logits))
    return weights, ids

"""Softmax top-k routing in one kernel (``sglang_core/kernels/moe_topk.py``) against float64
routing, and the router using it (made to on CPU: the Triton interpreter runs it, see
conftest.py) against transformers' routers."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
import transformers

pytest.importorskip("triton")  # in the test extra; absent only outside CI
from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2TopkRouter  # noqa: E402
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter  # noqa: E402
from transformers.models.mixtral.modeling_mixtral import MixtralTopKRouter  # noqa: E402
from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeTopKRouter  # noqa: E402

from sglang_core.kernels import moe_topk  # noqa: E402
from sglang_core.layers import moe_router  # noqa: E402
from sglang_core.layers.moe_router import Router, Routing  # noqa: E402
from test_moe_layer import EXPERTS, HIDDEN, TOKENS, assert_same_routing, by_expert  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@dataclass(frozen=True)
class Case:
    experts: int
    top_k: int
    tokens: int
    renormalize: bool = False
    scaling: float = 1.0
    dtype: torch.dtype = torch.float32
    shared: int = 0  # shared experts stacked after the routed ones: ids appended with weight 1


CASES = [
    Case(experts=64, top_k=6, tokens=1, shared=2),  # DeepSeek-V2-Lite decode, its 2 shared experts stacked
    Case(experts=6, top_k=2, tokens=3, scaling=2.0, shared=1),
    Case(experts=5, top_k=5, tokens=3, scaling=0.7, shared=3),  # every routed expert, then 3 shared ones
    Case(experts=8, top_k=2, tokens=5, renormalize=True, dtype=torch.bfloat16),  # Mixtral
    Case(experts=60, top_k=4, tokens=3),  # Qwen1.5-MoE: not a power of two
    Case(experts=6, top_k=6, tokens=2, renormalize=True, scaling=2.5),
    Case(experts=5, top_k=1, tokens=4, scaling=16.0, dtype=torch.float16),
]


def float64_routing(logits: torch.Tensor, case: Case) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax in float64, the top-k largest first (the lowest id first among equals), then the
    shared experts' ids E, E + 1, ... with weight 1."""
    probs = logits.double().softmax(dim=-1)
    ids = probs.neg().argsort(dim=-1, stable=True)[:, :case.top_k]
    weights = probs.gather(1, ids)
    if case.renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    shared_ids = torch.arange(case.experts, case.experts + case.shared).expand(len(ids), -1)
    return (torch.cat([weights * case.scaling, torch.ones(len(ids), case.shared, dtype=torch.float64)], dim=1),
            torch.cat([ids, shared_ids], dim=1))


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"E{c.experts}k{c.top_k}T{c.tokens}-{c.dtype}"
                         + "-renorm" * c.renormalize + f"-x{c.scaling}" + f"-shared{c.shared}" * bool(c.shared))
def test_softmax_topk_matches_float64_routing(case: Case) -> None:
    gen = torch.Generator().manual_seed(case.experts + case.tokens)
    logits = (torch.randn(case.tokens, case.experts, generator=gen) * 3).to(case.dtype)
    weights, ids = moe_topk.softmax_topk(logits.to(DEVICE), case.top_k, case.renormalize, case.scaling, case.shared)
    expected_weights, expected_ids = float64_routing(logits, case)
    assert ids.dtype == torch.int64 and weights.dtype == torch.float32
    assert torch.equal(ids.cpu(), expected_ids)
    torch.testing.assert_close(weights.cpu().double(), expected_weights, atol=1e-6, rtol=1e-6)


def test_equal_logits_take_the_lowest_expert_first() -> None:
    """Ties as a stable sort breaks them, whichever column the largest sits in; columns given as a
    strided view."""
    logits = torch.tensor([[1.0, 3.0, 0.0, 3.0, 3.0], [2.0, 2.0, 2.0, 2.0, -1.0]])
    wide = torch.stack([logits, logits + 10], dim=2).flatten(1)[:, ::2]
    weights, ids = moe_topk.softmax_topk(wide.to(DEVICE), 3, renormalize=True)
    expected_weights, expected_ids = float64_routing(logits, Case(5, 3, 2, renormalize=True))
    assert ids.cpu().tolist() == expected_ids.tolist() == [[1, 3, 4], [0, 1, 2]]
    torch.testing.assert_close(weights.cpu().double(), expected_weights, atol=1e-6, rtol=1e-6)


def test_softmax_topk_refuses_more_choices_than_experts() -> None:
    with pytest.raises(ValueError, match="top_k"):
        moe_topk.softmax_topk(torch.zeros(2, 4, device=DEVICE), 5)


ONE_KERNEL_ROUTERS = {
    "mixtral": (Routing(2, renormalize=True),
                lambda: MixtralTopKRouter(transformers.MixtralConfig(hidden_size=HIDDEN, num_local_experts=EXPERTS,
                                                                     num_experts_per_tok=2))),
    "qwen2-moe": (Routing(4),
                  lambda: Qwen2MoeTopKRouter(transformers.Qwen2MoeConfig(hidden_size=HIDDEN, num_experts=EXPERTS,
                                                                         num_experts_per_tok=4,
                                                                         norm_topk_prob=False))),
    "deepseek-v2-greedy": (Routing(3, scaling_factor=2.5),
                           lambda: DeepseekV2TopkRouter(transformers.DeepseekV2Config(
                               hidden_size=HIDDEN, n_routed_experts=EXPERTS, num_experts_per_tok=3,
                               topk_method="greedy", routed_scaling_factor=2.5))),
}


@pytest.mark.parametrize("family", ONE_KERNEL_ROUTERS)
def test_router_routes_in_one_kernel_as_transformers(family: str, monkeypatch) -> None:
    """Where fused kernels run (made so here), softmax routers without groups route through the
    one kernel, choosing and weighting as transformers' routers do."""
    monkeypatch.setattr(moe_router, "use_fused", lambda x: True)
    calls = []
    kernel = moe_topk.softmax_topk
    monkeypatch.setattr(moe_topk, "softmax_topk", lambda *args: calls.append(args) or kernel(*args))
    routing, theirs = ONE_KERNEL_ROUTERS[family]
    torch.manual_seed(len(family))
    # On a GPU the kernel is compiled: everything on the device it launches on.
    assert_same_routing(Router(HIDDEN, EXPERTS, routing).to(DEVICE), theirs().to(DEVICE),
                        torch.randn(TOKENS, HIDDEN).to(DEVICE))
    assert len(calls) == 1


def test_grouped_routing_keeps_the_pytorch_path(monkeypatch) -> None:
    monkeypatch.setattr(moe_router, "use_fused", lambda x: True)
    monkeypatch.setattr(moe_topk, "softmax_topk", lambda *args: pytest.fail("grouped routing reached the kernel"))
    routing = Routing(3, num_groups=4, topk_groups=2, group_score="max")
    Router(HIDDEN, EXPERTS, routing)(torch.randn(TOKENS, HIDDEN))


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("family", ["deepseek-v2-greedy", "deepseek-v3-grouped"])
def test_router_appends_stacked_shared_experts(family: str, fused: bool, monkeypatch) -> None:
    """A router of a block with 2 shared experts stacked after its 8 routed ones: transformers'
    choice and weights (in the kernel where it applies, else in PyTorch), then ids 8 and 9 with
    weight 1 for every token."""
    monkeypatch.setattr(moe_router, "use_fused", lambda x: fused)
    if family == "deepseek-v2-greedy":
        routing, theirs = ONE_KERNEL_ROUTERS[family]
        theirs = theirs()
    else:
        routing = Routing(2, scoring="sigmoid", renormalize=True, num_groups=4, topk_groups=2, group_score="top2_sum",
                          correction_bias=True, scaling_factor=1.5)
        theirs = DeepseekV3TopkRouter(transformers.DeepseekV3Config(
            hidden_size=HIDDEN, n_routed_experts=EXPERTS, num_experts_per_tok=2, n_group=4, topk_group=2,
            routed_scaling_factor=1.5))
    ours = Router(HIDDEN, EXPERTS, routing, shared_experts=2).to(DEVICE)
    x = torch.randn(TOKENS, HIDDEN, generator=torch.Generator().manual_seed(9)).to(DEVICE)
    with torch.no_grad():
        ours.weight.copy_(torch.randn(EXPERTS, HIDDEN, generator=torch.Generator().manual_seed(10)))
        theirs.to(DEVICE).weight.copy_(ours.weight)
        weights, ids = ours(x)
        _, their_weights, their_ids = theirs(x)
    top_k = routing.top_k
    assert torch.equal(ids[:, top_k:].cpu(), torch.tensor([[8, 9]] * TOKENS))
    assert torch.equal(weights[:, top_k:].cpu(), torch.ones(TOKENS, 2))
    got_ids, got_weights = by_expert(weights[:, :top_k].cpu(), ids[:, :top_k].cpu())
    expected_ids, expected_weights = by_expert(their_weights.cpu(), their_ids.cpu())
    assert torch.equal(got_ids, expected_ids)
    torch.testing.assert_close(got_weights, expected_weights.float(), atol=1e-6, rtol=1e-6)


def test_float32_router_reads_a_16_bit_row_in_one_gemv(monkeypatch) -> None:
    """Where kernels run (made so here), a float32 router's logits of one bfloat16 row come from
    the GEMV kernel reading the row as it is, routing as transformers' float32 DeepSeek-V2 router."""
    from sglang_core.kernels import gemv

    monkeypatch.setattr(moe_router, "use_fused", lambda x: True)
    calls = []
    kernel = gemv.gemv
    monkeypatch.setattr(gemv, "gemv", lambda *args: calls.append(args) or kernel(*args))
    routing, theirs = ONE_KERNEL_ROUTERS["deepseek-v2-greedy"]
    x = torch.randn(1, HIDDEN).bfloat16()
    ours, theirs = Router(HIDDEN, EXPERTS, routing).to(DEVICE), theirs().to(DEVICE)
    with torch.no_grad():
        theirs.weight.copy_(torch.randn_like(theirs.weight))
        ours.weight.copy_(theirs.weight)
        weights, ids = ours(x.to(DEVICE))
        _, their_weights, their_ids = theirs(x.float().to(DEVICE))
    assert len(calls) == 1 and calls[0][0].dtype == torch.bfloat16 and calls[0][1].dtype == torch.float32
    got_ids, got_weights = by_expert(weights.cpu(), ids.cpu())
    expected_ids, expected_weights = by_expert(their_weights.cpu(), their_ids.cpu())
    assert torch.equal(got_ids, expected_ids)
    torch.testing.assert_close(got_weights, expected_weights.float(), atol=1e-6, rtol=1e-6)

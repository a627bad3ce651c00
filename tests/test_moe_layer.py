"""The MoE layer (sglang_core/layers/moe.py, moe_router.py) against independent references:
transformers' own routers (Mixtral, Qwen2-MoE, DeepSeek-V2 greedy and group-limited, DeepSeek-V3
noaux_tc) and its Qwen2-MoE sparse block in float32, and a per-token float64 loop for the experts."""

from __future__ import annotations

import pytest
import torch
import transformers
from transformers.models.dbrx.modeling_dbrx import DbrxFFN
from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2Moe, DeepseekV2TopkRouter
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter
from transformers.models.mixtral.modeling_mixtral import MixtralTopKRouter
from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock, Qwen2MoeTopKRouter

from sglang_core.layers.activation import gated_act_fn
from sglang_core.layers.experts import NOT_LOCAL
from sglang_core.layers.moe import MoE, experts_dense, experts_reference, shared_expert_pieces
from sglang_core.layers.moe_router import Router, Routing
from sglang_core.layers.parallel import TPGroup
from sglang_core.layers.transformer import QKV_GATE_UP, GatedMLP
from sglang_core.model_executor.model_api import STACKED_EXPERTS, ModelContext, expert_mappings, load_by_name

HIDDEN, EXPERTS, TOKENS = 32, 8, 40


def by_expert(weights: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each token's (ids, weights) in ascending id order: routers may return them in any order."""
    ids, order = ids.sort(dim=-1)
    return ids, weights.gather(1, order)


def assert_same_routing(ours: Router, theirs: torch.nn.Module, x: torch.Tensor) -> None:
    with torch.no_grad():
        theirs.weight.copy_(torch.randn_like(theirs.weight))
        ours.weight.copy_(theirs.weight)
        if ours.e_score_correction_bias is not None:
            theirs.e_score_correction_bias.copy_(torch.randn(EXPERTS) * 0.5)
            ours.e_score_correction_bias.copy_(theirs.e_score_correction_bias)
        _, their_weights, their_ids = theirs(x)
        our_weights, our_ids = ours(x)
    expected_ids, expected_weights = by_expert(their_weights, their_ids)
    got_ids, got_weights = by_expert(our_weights, our_ids)
    assert torch.equal(got_ids, expected_ids)
    torch.testing.assert_close(got_weights, expected_weights.float(), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_softmax_renormalised_routing_matches_mixtral(top_k: int) -> None:
    torch.manual_seed(top_k)
    config = transformers.MixtralConfig(hidden_size=HIDDEN, num_local_experts=EXPERTS, num_experts_per_tok=top_k)
    assert_same_routing(Router(HIDDEN, EXPERTS, Routing(top_k, renormalize=True)), MixtralTopKRouter(config),
                        torch.randn(TOKENS, HIDDEN))


@pytest.mark.parametrize("norm_topk_prob", [False, True])
def test_softmax_routing_matches_qwen2_moe(norm_topk_prob: bool) -> None:
    torch.manual_seed(4)
    config = transformers.Qwen2MoeConfig(hidden_size=HIDDEN, num_experts=EXPERTS, num_experts_per_tok=4,
                                         norm_topk_prob=norm_topk_prob)
    assert_same_routing(Router(HIDDEN, EXPERTS, Routing(4, renormalize=norm_topk_prob)), Qwen2MoeTopKRouter(config),
                        torch.randn(TOKENS, HIDDEN))


@pytest.mark.parametrize("topk_method, n_group, topk_group", [("greedy", 1, 1), ("group_limited_greedy", 4, 2),
                                                               ("group_limited_greedy", 2, 1)])
def test_softmax_group_limited_routing_matches_deepseek_v2(topk_method: str, n_group: int, topk_group: int) -> None:
    torch.manual_seed(n_group)
    config = transformers.DeepseekV2Config(hidden_size=HIDDEN, n_routed_experts=EXPERTS, num_experts_per_tok=3,
                                           topk_method=topk_method, n_group=n_group, topk_group=topk_group,
                                           routed_scaling_factor=2.5)
    # transformers ignores the groups under "greedy": so do we, by leaving them at one.
    groups = (n_group, topk_group) if topk_method == "group_limited_greedy" else (1, 1)
    routing = Routing(3, num_groups=groups[0], topk_groups=groups[1], group_score="max", scaling_factor=2.5)
    assert_same_routing(Router(HIDDEN, EXPERTS, routing), DeepseekV2TopkRouter(config), torch.randn(TOKENS, HIDDEN))


@pytest.mark.parametrize("norm_topk_prob", [False, True])
@pytest.mark.parametrize("n_group, topk_group", [(4, 2), (2, 1), (1, 1)])
def test_sigmoid_grouped_biased_routing_matches_deepseek_v3(n_group: int, topk_group: int,
                                                            norm_topk_prob: bool) -> None:
    torch.manual_seed(10 * n_group + topk_group)
    config = transformers.DeepseekV3Config(hidden_size=HIDDEN, n_routed_experts=EXPERTS, num_experts_per_tok=2,
                                           n_group=n_group, topk_group=topk_group, norm_topk_prob=norm_topk_prob,
                                           routed_scaling_factor=2.5)
    routing = Routing(2, scoring="sigmoid", renormalize=norm_topk_prob, num_groups=n_group, topk_groups=topk_group,
                      group_score="top2_sum", correction_bias=True, scaling_factor=2.5)
    assert_same_routing(Router(HIDDEN, EXPERTS, routing), DeepseekV3TopkRouter(config), torch.randn(TOKENS, HIDDEN))


@pytest.mark.parametrize("p", [None, 1.0, 2.0, 0.5])
def test_p_norm_renormalised_routing_matches_dbrx(p: float | None) -> None:
    """DBRX divides the chosen softmax weights by their ``moe_normalize_expert_weights``-norm."""
    torch.manual_seed(7)
    config = transformers.DbrxConfig(d_model=HIDDEN, ffn_config={"moe_num_experts": EXPERTS, "moe_top_k": 3,
                                                                 "moe_normalize_expert_weights": p})
    theirs = DbrxFFN(config)
    ours = Router(HIDDEN, EXPERTS, Routing(3, renormalize=p is not None, renormalize_p=p or 1.0))
    x = torch.randn(TOKENS, HIDDEN)
    with torch.no_grad():
        theirs.router.layer.weight.normal_()
        ours.weight.copy_(theirs.router.layer.weight)
        expected_ids, expected_weights = by_expert(*theirs.route_tokens_to_experts(theirs.router(x)))
        got_ids, got_weights = by_expert(*ours(x))
    assert torch.equal(got_ids, expected_ids)
    torch.testing.assert_close(got_weights, expected_weights, atol=1e-6, rtol=1e-6)


def test_correction_bias_changes_the_choice_not_the_weights() -> None:
    """A large bias on expert 5 makes every token choose it, with its unbiased sigmoid score as weight."""
    router = Router(HIDDEN, EXPERTS, Routing(2, scoring="sigmoid", correction_bias=True))
    torch.manual_seed(0)
    x = torch.randn(TOKENS, HIDDEN)
    with torch.no_grad():
        router.weight.normal_()
        router.e_score_correction_bias[5] = 100.0
        weights, ids = router(x)
    chosen = ids == 5
    assert bool(chosen.any(dim=-1).all())
    torch.testing.assert_close(weights[chosen], (x @ router.weight.t())[:, 5].sigmoid())


@pytest.mark.parametrize("routing, field", [
    (Routing(9), "num_experts_per_tok"), (Routing(None), "num_experts_per_tok"),
    (Routing(2, scoring="tanh"), "scoring_func"),
    (Routing(2, num_groups=3), "n_group"), (Routing(2, num_groups=4, topk_groups=5), "topk_group"),
    (Routing(2, num_groups=None), "n_group"), (Routing(2, num_groups=4, topk_groups=None), "topk_group"),
    (Routing(5, num_groups=4, topk_groups=2), "num_experts_per_tok"),
    (Routing(2, group_score="mean"), "topk_method"), (Routing(2, renormalize=True, renormalize_p=0.0),
                                                      "moe_normalize_expert_weights"),
    (Routing(1, num_groups=8, topk_groups=2, group_score="top2_sum"), "n_group")])
def test_bad_routing_names_the_field(routing: Routing, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        Router(HIDDEN, EXPERTS, routing)


def experts_float64(hidden, w13, w2, weights, ids, hidden_act: str) -> torch.Tensor:
    """One token and one chosen expert at a time, in float64."""
    act = gated_act_fn(hidden_act)
    out = torch.zeros(hidden.shape, dtype=torch.float64)
    for t in range(hidden.shape[0]):
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            inner = act(w13[e].double() @ hidden[t].double())
            out[t] += weights[t, j].double() * (w2[e].double() @ inner)
    return out


def routed_problem(device: str = "cpu"):
    """Ids chosen so that expert 6 gets no token and expert 0 most; one token picks one expert
    twice (weights add), as a fused kernel must accept too."""
    torch.manual_seed(7)
    inter = 24
    hidden = torch.randn(6, HIDDEN)
    w13, w2 = torch.randn(EXPERTS, 2 * inter, HIDDEN) * 0.2, torch.randn(EXPERTS, HIDDEN, inter) * 0.2
    ids = torch.tensor([[0, 3], [0, 7], [5, 0], [1, 2], [4, 4], [0, 2]])
    weights = torch.rand(6, 2)
    return [t.to(device) for t in (hidden, w13, w2, weights, ids)]


@pytest.mark.parametrize("experts", [experts_reference, experts_dense])
@pytest.mark.parametrize("hidden_act", ["silu", "gelu_pytorch_tanh"])
def test_experts_match_a_per_token_loop(experts, hidden_act: str) -> None:
    hidden, w13, w2, weights, ids = routed_problem()
    got = experts(hidden, w13, w2, weights, ids, gated_act_fn(hidden_act))
    assert got.dtype == hidden.dtype
    torch.testing.assert_close(got.double(), experts_float64(hidden, w13, w2, weights, ids, hidden_act),
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("experts", [experts_reference, experts_dense])
def test_experts_skip_pairs_of_another_ranks_experts(experts) -> None:
    """Expert parallelism: this rank holds experts 0-4, the pairs of experts 5-7 come as NOT_LOCAL
    and add nothing (-1 must not index the last local expert)."""
    hidden, w13, w2, weights, ids = routed_problem()
    elsewhere = ids >= 5
    got = experts(hidden, w13[:5], w2[:5], weights, ids.masked_fill(elsewhere, NOT_LOCAL), gated_act_fn("silu"))
    expected = experts_float64(hidden, w13, w2, weights.masked_fill(elsewhere, 0), ids, "silu")
    torch.testing.assert_close(got.double(), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_reference_experts_capture_in_a_cuda_graph() -> None:
    """The reference experts (what runs where the fused kernel cannot: act-order quantized experts,
    a gate activation outside the kernel's) inside a CUDA graph, as decode runs them."""
    hidden, w13, w2, weights, ids = routed_problem("cuda")
    act = gated_act_fn("gelu_pytorch_tanh")
    experts_reference(hidden, w13, w2, weights, ids, act)  # warm-up outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = experts_reference(hidden, w13, w2, weights, ids, act)
    graph.replay()
    expected = experts_float64(*(t.cpu() for t in (hidden, w13, w2, weights, ids)), "gelu_pytorch_tanh")
    torch.testing.assert_close(out.cpu().double(), expected, atol=1e-4, rtol=1e-4)


def qwen2_moe_block(seed: int) -> tuple[Qwen2MoeSparseMoeBlock, transformers.Qwen2MoeConfig]:
    config = transformers.Qwen2MoeConfig(hidden_size=HIDDEN, num_experts=EXPERTS, num_experts_per_tok=2,
                                         moe_intermediate_size=16, shared_expert_intermediate_size=24,
                                         norm_topk_prob=False)
    torch.manual_seed(seed)
    block = Qwen2MoeSparseMoeBlock(config)
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0, 0.3)
    return block, config


def our_block(config, tp: TPGroup) -> MoE:
    shared = GatedMLP(ModelContext(tp=tp), "mlp.shared_expert", HIDDEN, config.shared_expert_intermediate_size)
    return MoE(HIDDEN, EXPERTS, config.moe_intermediate_size, Routing(2), "silu", tp, shared_expert=shared,
               shared_expert_gate=True)


def load_block(ours: MoE, theirs: torch.nn.Module) -> None:
    params = {f"mlp.{name}": p for name, p in ours.named_parameters()}
    weights = ((f"mlp.{name}", t) for name, t in theirs.state_dict().items())
    assert load_by_name(params, weights, QKV_GATE_UP, experts=STACKED_EXPERTS) == set(params)


def check_block_matches_qwen2_moe(seed: int, device: str = "cpu") -> None:
    """Our one-rank block, loaded from transformers' Qwen2-MoE sparse block, computes what it does
    (ours on ``device``, the reference on the CPU)."""
    block, config = qwen2_moe_block(seed=seed)
    ours = our_block(config, TPGroup())
    load_block(ours, block)
    x = torch.randn(TOKENS, HIDDEN)
    with torch.no_grad():
        torch.testing.assert_close(ours.to(device)(x.to(device)).cpu(), block(x[None])[0], atol=1e-5, rtol=1e-5)


def test_moe_block_with_gated_shared_expert_matches_qwen2_moe() -> None:
    check_block_matches_qwen2_moe(seed=1)


class SumOutside(TPGroup):
    """A simulated rank whose all-reduce is left to the test (it sums the ranks' outputs)."""

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        return x


@pytest.mark.parametrize("expert_parallel", [False, True])
@pytest.mark.parametrize("tp", [2, 4])
def test_ranks_sum_to_the_whole_block(tp: int, expert_parallel: bool) -> None:
    """Each rank holds 1/tp of every expert's and of the shared expert's intermediate width, or
    with expert parallelism 1/tp of the experts whole (the shared expert still split); the
    all-reduce of the ranks' outputs is the whole block's output."""
    block, config = qwen2_moe_block(seed=2)
    x = torch.randn(TOKENS, HIDDEN)
    total = torch.zeros(TOKENS, HIDDEN)
    for rank in range(tp):
        ours = our_block(config, SumOutside(rank=rank, size=tp, expert_parallel=expert_parallel))
        load_block(ours, block)
        inter = config.moe_intermediate_size
        assert ours.experts.w13_weight.shape[:2] == ((EXPERTS // tp, 2 * inter) if expert_parallel
                                                     else (EXPERTS, 2 * inter // tp))
        assert ours.shared_expert.down_proj.weight.shape[1] == config.shared_expert_intermediate_size // tp
        with torch.no_grad():
            total += ours(x)
    with torch.no_grad():
        torch.testing.assert_close(total, block(x[None])[0], atol=1e-5, rtol=1e-5)


def deepseek_v2_block(seed: int) -> DeepseekV2Moe:
    """transformers' DeepSeek-V2 MoE block (no biases): greedy top-2 of 8 scaled, 2 shared experts."""
    config = transformers.DeepseekV2Config(hidden_size=HIDDEN, n_routed_experts=EXPERTS, num_experts_per_tok=2,
                                           moe_intermediate_size=16, n_shared_experts=2, routed_scaling_factor=2.0,
                                           topk_method="greedy", mlp_bias=False)
    torch.manual_seed(seed)
    block = DeepseekV2Moe(config)
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0, 0.3)
    return block


def stacked_block(block: DeepseekV2Moe, tp: TPGroup) -> MoE:
    """Ours with the shared MLP stacked as experts 8 and 9, loaded from ``block``'s tensors (the
    shared ones cut by ``shared_expert_pieces``, named as those experts')."""
    ours = MoE(HIDDEN, EXPERTS, 16, Routing(2, scaling_factor=2.0), "silu", tp, stacked_shared_experts=2)
    weights = []
    for name, tensor in block.state_dict().items():
        if name.startswith("shared_experts."):
            proj = name.split(".")[1]
            weights += [(f"mlp.experts.{EXPERTS + j}.{proj}.weight", piece)
                        for j, piece in enumerate(shared_expert_pieces(tensor, proj, 2))]
        else:
            weights.append((f"mlp.{name}", tensor))
    params = {f"mlp.{name}": p for name, p in ours.named_parameters()}
    parts = {"gate_proj": "gate", "up_proj": "up", "down_proj": "down"}
    assert load_by_name(params, weights, QKV_GATE_UP, experts=[*expert_mappings(parts), *STACKED_EXPERTS]) == set(params)
    return ours


@pytest.mark.parametrize("tokens", [1, TOKENS])
def test_stacked_shared_experts_match_deepseek_v2_block(tokens: int) -> None:
    """Shared experts stacked after the routed ones compute transformers' block (routed experts plus
    the shared MLP), and hold its weights once: no more parameters than transformers'."""
    block = deepseek_v2_block(seed=4)
    ours = stacked_block(block, TPGroup())
    assert ours.shared_expert is None and ours.experts.w13_weight.shape[0] == EXPERTS + 2
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in block.parameters())
    x = torch.randn(tokens, HIDDEN)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), block(x[None])[0], atol=1e-5, rtol=1e-5)


def test_ranks_sum_to_the_whole_block_with_stacked_shared_experts() -> None:
    """Tensor parallelism splits the stacked shared experts' width as the routed experts'."""
    block = deepseek_v2_block(seed=5)
    x = torch.randn(TOKENS, HIDDEN)
    total = torch.zeros(TOKENS, HIDDEN)
    for rank in range(2):
        ours = stacked_block(block, SumOutside(rank=rank, size=2))
        assert ours.experts.w2_weight.shape == (EXPERTS + 2, HIDDEN, 8)
        with torch.no_grad():
            total += ours(x)
    with torch.no_grad():
        torch.testing.assert_close(total, block(x[None])[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("options", [{"shared_expert_gate": True}, {"tp": TPGroup(rank=0, size=2, expert_parallel=True)}])
def test_stacked_shared_experts_refuse_a_shared_module_or_expert_parallelism(options: dict) -> None:
    shared = GatedMLP(ModelContext(), "mlp.shared_expert", HIDDEN, 32) if "shared_expert_gate" in options else None
    with pytest.raises(ValueError, match="stacked_shared_experts"):
        MoE(HIDDEN, EXPERTS, 16, Routing(2), stacked_shared_experts=2, shared_expert=shared, **options)


def test_shared_expert_gate_without_a_shared_expert_is_an_error() -> None:
    with pytest.raises(ValueError, match="shared_expert_gate"):
        MoE(HIDDEN, EXPERTS, 16, Routing(2), shared_expert_gate=True)


def test_float32_router_of_a_bfloat16_block_routes_as_deepseek_v3() -> None:
    """DeepSeek keeps its router weight and logits in float32 in a bfloat16 model (``router_dtype``)."""
    torch.manual_seed(5)
    config = transformers.DeepseekV3Config(hidden_size=HIDDEN, n_routed_experts=EXPERTS, num_experts_per_tok=2,
                                           n_group=1, topk_group=1, routed_scaling_factor=1.5)
    routing = Routing(2, scoring="sigmoid", renormalize=True, group_score="top2_sum", correction_bias=True,
                      scaling_factor=1.5)
    block = MoE(HIDDEN, EXPERTS, 16, routing, params_dtype=torch.bfloat16, router_dtype=torch.float32)
    assert block.experts.w13_weight.dtype == torch.bfloat16
    assert_same_routing(block.gate, DeepseekV3TopkRouter(config), torch.randn(TOKENS, HIDDEN).bfloat16())

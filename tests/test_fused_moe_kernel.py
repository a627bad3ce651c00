"""The fused MoE kernel (``sglang_core/kernels/fused_moe.py``) against experts written out in float64.

On CPU the kernels run in Triton's interpreter (``TRITON_INTERPRET=1``, set by conftest.py), so
shapes are tiny and tiles 16 wide: hidden and intermediate sizes that are not multiples of a
tile, several K tiles, blocks of several experts, experts that no token picks, top-k weights and
ids given as strided views, pairs of another rank's experts (expert parallelism). With a GPU the
same tests run the compiled kernels on CUDA tensors, and one more at a real model's shapes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
import torch

pytest.importorskip("triton")  # in the test extra; absent only outside CI
from sglang_core.kernels import fused_moe as moe  # noqa: E402
from sglang_core.layers import moe as moe_layer  # noqa: E402
from sglang_core.layers.moe_router import Routing  # noqa: E402
from sglang_core.layers import moe_router  # noqa: E402
from sglang_core.layers.parallel import TPGroup  # noqa: E402
from test_moe_layer import check_block_matches_qwen2_moe, deepseek_v2_block, stacked_block  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SMALL_TILES = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, GROUP_M=2, num_warps=4, num_stages=2)
# float32 against float64; 16-bit: the projections, the activation and the result each rounded once.
TOLERANCE = {torch.float32: dict(atol=1e-4, rtol=1e-4), torch.bfloat16: dict(atol=4e-2, rtol=4e-2),
             torch.float16: dict(atol=1e-2, rtol=1e-2)}


def reference(hidden: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
              topk_ids: torch.Tensor, activation: str) -> torch.Tensor:
    """Each (token, choice) through its expert's gated MLP in float64, weighted and summed."""
    inter = w2.shape[2]
    out = torch.zeros(hidden.shape, dtype=torch.float64, device=hidden.device)
    for token in range(hidden.shape[0]):
        x = hidden[token].double()
        for weight, expert in zip(topk_weights[token].tolist(), topk_ids[token].tolist()):
            projected = w13[expert].double() @ x
            gate, up = projected[:inter], projected[inter:]
            if activation == "silu":
                act = gate * torch.sigmoid(gate)
            else:
                act = torch.nn.functional.gelu(gate, approximate="tanh" if activation == "gelu_tanh" else "none")
            out[token] += weight * (w2[expert].double() @ (act * up))
    return out


@dataclass(frozen=True)
class Case:
    experts: int
    top_k: int
    tokens: int
    dtype: torch.dtype
    activation: str = "silu"
    unused_experts: tuple[int, ...] = ()  # no token picks these
    hidden: int = 40  # two full K tiles of 16 and a partial one
    inter: int = 24  # one full N tile of 16 and a partial one
    strided_routing: bool = False  # top-k weights and ids as every other column of wider tensors


def routed(case: Case, seed: int) -> tuple[torch.Tensor, ...]:
    """Random inputs and weights, and each token's top-k: distinct experts from the used ones,
    softmax-like positive weights that do not sum to one."""
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(case.tokens, case.hidden, generator=gen)
    w13 = torch.randn(case.experts, 2 * case.inter, case.hidden, generator=gen) / case.hidden ** 0.5
    w2 = torch.randn(case.experts, case.hidden, case.inter, generator=gen) / case.inter ** 0.5
    used = torch.tensor([e for e in range(case.experts) if e not in case.unused_experts])
    topk_ids = torch.stack([used[torch.randperm(len(used), generator=gen)[:case.top_k]]
                            for _ in range(case.tokens)])
    topk_weights = torch.rand(case.tokens, case.top_k, generator=gen) + 0.1
    topk_weights, topk_ids = topk_weights.to(DEVICE), topk_ids.to(torch.int32).to(DEVICE)
    if case.strided_routing:  # flattening them gives strided views; the gaps hold other values
        topk_weights = torch.stack([topk_weights, topk_weights + 1], dim=2).flatten(1)[:, ::2]
        topk_ids = torch.stack([topk_ids, (topk_ids + 1) % case.experts], dim=2).flatten(1)[:, ::2]
    cast = dict(dtype=case.dtype, device=DEVICE)
    return hidden.to(**cast), w13.to(**cast), w2.to(**cast), topk_weights, topk_ids


CASES = [
    Case(experts=1, top_k=1, tokens=5, dtype=torch.float32),
    Case(experts=3, top_k=2, tokens=17, dtype=torch.float32, activation="gelu"),
    Case(experts=8, top_k=3, tokens=17, dtype=torch.float32, activation="gelu_tanh", unused_experts=(0, 5, 6)),
    Case(experts=8, top_k=2, tokens=1, dtype=torch.bfloat16),
    Case(experts=3, top_k=3, tokens=5, dtype=torch.float16, activation="gelu"),
    Case(experts=8, top_k=2, tokens=17, dtype=torch.bfloat16, unused_experts=(3,)),
    Case(experts=5, top_k=2, tokens=1, dtype=torch.float32, hidden=20, inter=7, strided_routing=True),
    Case(experts=5, top_k=3, tokens=3, dtype=torch.float32, hidden=33, inter=13, strided_routing=True),
    # Grok-1's erf GELU at decode (one token: the unsorted path) and a tanh-GELU config's batch.
    Case(experts=8, top_k=2, tokens=1, dtype=torch.bfloat16, activation="gelu"),
    Case(experts=4, top_k=2, tokens=9, dtype=torch.bfloat16, activation="gelu_tanh", unused_experts=(2,)),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"E{c.experts}k{c.top_k}T{c.tokens}-{c.dtype}-{c.activation}"
                         + ("-strided" * c.strided_routing))
def test_fused_moe_matches_float64_experts(case: Case) -> None:
    hidden, w13, w2, topk_weights, topk_ids = routed(case, seed=case.experts * 100 + case.tokens)
    got = moe.fused_moe(hidden, w13, w2, topk_weights, topk_ids, activation=case.activation, config=SMALL_TILES)
    assert got.dtype == case.dtype and got.shape == hidden.shape
    expected = reference(hidden, w13, w2, topk_weights, topk_ids, case.activation)
    torch.testing.assert_close(got.double(), expected, **TOLERANCE[case.dtype])


def test_fused_moe_default_tiles() -> None:
    """The launch that ``launch_config`` chooses without a tuned file (64-wide tiles: one K tile
    and one N tile here), with top-k ids in int64 as torch.topk gives them."""
    case = Case(experts=4, top_k=2, tokens=9, dtype=torch.float32)
    hidden, w13, w2, topk_weights, topk_ids = routed(case, seed=7)
    got = moe.fused_moe(hidden, w13, w2, topk_weights, topk_ids.long())
    torch.testing.assert_close(got.double(), reference(hidden, w13, w2, topk_weights, topk_ids, "silu"),
                               **TOLERANCE[torch.float32])


def test_fused_moe_one_token_with_an_expert_chosen_twice() -> None:
    """One token skips the sort (each pair its own block, experts read from the ids): still right
    when its ids repeat an expert, which a caller other than a top-k router may pass."""
    case = Case(experts=5, top_k=3, tokens=1, dtype=torch.float32)
    hidden, w13, w2, topk_weights, _ = routed(case, seed=11)
    topk_ids = torch.tensor([[4, 1, 4]], device=DEVICE)
    got = moe.fused_moe(hidden, w13, w2, topk_weights, topk_ids, config=SMALL_TILES)
    torch.testing.assert_close(got.double(), reference(hidden, w13, w2, topk_weights, topk_ids, "silu"),
                               **TOLERANCE[torch.float32])


@pytest.mark.parametrize("tokens, dtype", [(9, torch.float32), (1, torch.bfloat16)])
def test_fused_moe_skips_other_ranks_experts(tokens: int, dtype: torch.dtype) -> None:
    """Expert parallelism: each of two ranks holds 4 of 8 experts and passes the other rank's pairs
    as id -1; its result is its own pairs' float64 sum (the -1 pairs' rows are 0, not left
    unwritten), and the ranks' results add up to every expert's. One token: the unsorted path."""
    case = Case(experts=8, top_k=3, tokens=tokens, dtype=dtype)
    hidden, w13, w2, topk_weights, topk_ids = routed(case, seed=tokens + 5)
    total = torch.zeros(hidden.shape, dtype=torch.float64, device=DEVICE)
    for first in (0, 4):
        own = (topk_ids >= first) & (topk_ids < first + 4)
        assert own.any() and not own.all()  # both kinds of pair on each rank
        local_ids = torch.where(own, topk_ids - first, -1)
        got = moe.fused_moe(hidden, w13[first:first + 4], w2[first:first + 4], topk_weights, local_ids,
                            config=SMALL_TILES).double()
        torch.testing.assert_close(got, reference(hidden, w13, w2, topk_weights * own, topk_ids, "silu"),
                                   **TOLERANCE[dtype])
        total += got
    torch.testing.assert_close(total, reference(hidden, w13, w2, topk_weights, topk_ids, "silu"), **TOLERANCE[dtype])


@pytest.mark.parametrize("block_m", [1, 4, 16])
def test_align_by_expert_blocks_hold_one_expert_each(block_m: int) -> None:
    topk_ids = torch.tensor([[2, 0], [2, 4], [0, 2], [4, 2], [2, 0]])  # expert 1 and 3 unused
    sorted_pairs, block_expert = moe.align_by_expert(topk_ids, 5, block_m)
    pairs = topk_ids.numel()
    flat = topk_ids.reshape(-1)
    assert sorted_pairs.numel() == block_expert.numel() * block_m
    real = sorted_pairs[sorted_pairs < pairs]
    assert sorted(real.tolist()) == list(range(pairs))  # every pair once
    assert torch.all(sorted_pairs[sorted_pairs >= pairs] == pairs)  # padding is the no-pair index
    blocks = sorted_pairs.view(-1, block_m)
    counts = torch.bincount(flat, minlength=5)
    used_blocks = int(((counts + block_m - 1) // block_m).sum())
    assert torch.all(block_expert[used_blocks:] == -1) and torch.all(blocks[used_blocks:] == pairs)
    for block, expert in zip(blocks[:used_blocks], block_expert[:used_blocks].tolist()):
        members = block[block < pairs]
        assert len(members) > 0 and torch.all(flat[members.long()] == expert)
        assert torch.equal(members, members.sort().values)  # a token's order kept within its expert


def write_configs(folder, table: dict) -> str:
    name = moe.config_file_name(8, 96, torch.bfloat16, "NVIDIA_H100_80GB_HBM3")
    (folder / name).write_text(json.dumps(table))
    return name


def test_launch_config_takes_the_nearest_tuned_batch(tmp_path) -> None:
    small = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=64, GROUP_M=1, num_warps=4, num_stages=4)
    large = dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=16, num_warps=8, num_stages=3)
    write_configs(tmp_path, {"1": small, "256": large})

    def chosen(tokens: int, dtype=torch.bfloat16, experts: int = 8) -> dict:
        return moe.launch_config(tokens, 2, experts, 96, dtype, "NVIDIA_H100_80GB_HBM3", tmp_path)

    assert chosen(1) == small and chosen(100) == small and chosen(200) == large and chosen(4096) == large
    assert chosen(1, torch.float16) == moe.default_config(1, 2, 8)  # no file for this dtype
    assert chosen(1, experts=16) == moe.default_config(1, 2, 16)  # nor for 16 experts


@pytest.mark.parametrize("field,value", [("BLOCK_K", 0), ("BLOCK_N", 48), ("BLOCK_M", 8), ("num_warps", "4")])
def test_a_bad_tuned_config_names_its_field(tmp_path, field: str, value) -> None:
    config = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=64, GROUP_M=1, num_warps=4, num_stages=4)
    name = write_configs(tmp_path, {"1": {**config, field: value}})
    with pytest.raises(ValueError, match=f"{name}: batch 1: {field}"):
        moe.launch_config(1, 2, 8, 96, torch.bfloat16, "NVIDIA_H100_80GB_HBM3", tmp_path)


def test_fused_moe_refuses_bad_arguments() -> None:
    hidden, w13, w2, topk_weights, topk_ids = routed(Case(experts=2, top_k=1, tokens=3, dtype=torch.float32), 0)
    with pytest.raises(ValueError, match="activation"):
        moe.fused_moe(hidden, w13, w2, topk_weights, topk_ids, activation="relu")
    with pytest.raises(ValueError, match="w2"):
        moe.fused_moe(hidden, w13, w2[:, :, :-1], topk_weights, topk_ids)
    with pytest.raises(ValueError, match="w13"):
        moe.fused_moe(hidden, w13.half(), w2, topk_weights, topk_ids)
    with pytest.raises(ValueError, match="topk_weights"):
        moe.fused_moe(hidden, w13, w2, topk_weights[:2], topk_ids)


@pytest.mark.parametrize("hidden_act, activation, tokens", [
    ("gelu", "gelu", 1), ("gelu_pytorch_tanh", "gelu_tanh", 6), ("gelu_new", "gelu_tanh", 1), ("silu", "silu", 6)])
def test_moe_layer_runs_every_kernel_activation_fused(hidden_act: str, activation: str, tokens: int,
                                                      monkeypatch) -> None:
    """Where the kernel is available (made so on CPU: the interpreter runs it), an MoE layer hands
    it its experts for every gate activation the kernel computes, the GELU variant the config's
    ``hidden_act`` means (erf or tanh); the sum is the float64 experts' of that variant."""
    monkeypatch.setattr(moe_layer, "use_fused", lambda x: True)
    activations = []
    fused = moe.fused_moe
    monkeypatch.setattr(moe, "fused_moe", lambda *args, **kwargs: activations.append(args[5]) or fused(*args, **kwargs))
    hidden_size, experts, inter = 40, 6, 24
    block = moe_layer.MoE(hidden_size, experts, inter, Routing(2), hidden_act)
    gen = torch.Generator().manual_seed(tokens)
    with torch.no_grad():
        block.gate.weight.copy_(torch.randn(experts, hidden_size, generator=gen))
        # Gate values of a few units, where erf and tanh GELU differ most.
        block.experts.w13_weight.copy_(torch.randn(experts, 2 * inter, hidden_size, generator=gen) * 0.4)
        block.experts.w2_weight.copy_(torch.randn(experts, hidden_size, inter, generator=gen) / inter ** 0.5)
        block.to(DEVICE)
        x = torch.randn(tokens, hidden_size, generator=gen).to(DEVICE)
        topk_weights, topk_ids = block.gate(x)
        got = block(x)
    assert activations == [activation]
    expected = reference(x, block.experts.w13_weight, block.experts.w2_weight, topk_weights, topk_ids, activation)
    torch.testing.assert_close(got.double(), expected, atol=1e-5, rtol=1e-5)


# float16, not bfloat16: Triton's interpreter truncates float32 to bfloat16 where a GPU rounds to nearest.
@pytest.mark.parametrize("tokens, dtype", [(1, torch.float16), (6, torch.float32)])
def test_an_addend_in_the_last_launch_equals_adding_after(tokens: int, dtype: torch.dtype) -> None:
    """A shared expert's output added in the sum's launch rounds as a separate add of the result."""
    hidden, w13, w2, topk_weights, topk_ids = routed(Case(experts=4, top_k=2, tokens=tokens, dtype=dtype), seed=2)
    addend = torch.randn(hidden.shape, generator=torch.Generator().manual_seed(3)).to(dtype=dtype, device=DEVICE)
    got = moe.fused_moe(hidden, w13, w2, topk_weights, topk_ids, config=SMALL_TILES, addend=addend)
    assert torch.equal(got, moe.fused_moe(hidden, w13, w2, topk_weights, topk_ids, config=SMALL_TILES) + addend)
    with pytest.raises(ValueError, match="addend"):
        moe.fused_moe(hidden, w13, w2, topk_weights, topk_ids, addend=addend[:, :-1])


def test_moe_layer_adds_its_shared_expert_in_the_kernel(monkeypatch) -> None:
    """On one rank, a block with a (gated) shared expert hands its output to the kernel's last
    launch; the block still computes Qwen2-MoE's sparse block."""
    monkeypatch.setattr(moe_layer, "use_fused", lambda x: True)
    addends = []
    fused = moe.fused_moe
    monkeypatch.setattr(moe, "fused_moe", lambda *args, **kwargs: addends.append(kwargs["addend"])
                        or fused(*args, **kwargs))
    check_block_matches_qwen2_moe(seed=3, device=DEVICE)
    assert len(addends) == 1 and addends[0] is not None


@pytest.mark.parametrize("tokens", [1, 5])
def test_stacked_shared_experts_run_in_the_routed_experts_launches(tokens: int, monkeypatch) -> None:
    """DeepSeek's shared MLP stacked as experts 8 and 9: the router's kernel appends them to every
    token's choice and one fused MoE call computes them with the routed pairs (the one-pair-per-block
    path at one token, sorted blocks at five), giving transformers' block output."""
    monkeypatch.setattr(moe_layer, "use_fused", lambda x: True)
    monkeypatch.setattr(moe_router, "use_fused", lambda x: True)
    calls = []
    fused = moe.fused_moe
    monkeypatch.setattr(moe, "fused_moe", lambda *args, **kwargs: calls.append(args[4]) or fused(*args, **kwargs))
    block = deepseek_v2_block(seed=6)
    ours = stacked_block(block, TPGroup()).to(DEVICE)
    x = torch.randn(tokens, 32, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        got = ours(x.to(DEVICE))
        expected = block(x[None])[0]
    assert len(calls) == 1 and calls[0].shape == (tokens, 4)
    assert torch.equal(calls[0][:, 2:].cpu(), torch.tensor([[8, 9]] * tokens))
    torch.testing.assert_close(got.cpu(), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("tokens", [1, 33, 512])
def test_fused_moe_at_mixtral_shapes_on_gpu(tokens: int) -> None:
    """Mixtral-8x7B's experts at tp 8 (hidden 4096, intermediate 1792, top-2 of 8) in bfloat16,
    with whatever tuned config this GPU has, against the float64 experts."""
    case = Case(experts=8, top_k=2, tokens=tokens, dtype=torch.bfloat16, hidden=4096, inter=1792)
    hidden, w13, w2, topk_weights, topk_ids = routed(case, seed=tokens)
    got = moe.fused_moe(hidden, w13, w2, topk_weights, topk_ids)
    expected = torch.zeros(hidden.shape, dtype=torch.float64, device=DEVICE)
    for expert in range(case.experts):  # vectorised over tokens: the loop of `reference` is too slow here
        token, choice = torch.nonzero(topk_ids == expert, as_tuple=True)
        projected = hidden[token].double() @ w13[expert].double().T
        gate, up = projected[:, :case.inter], projected[:, case.inter:]
        down = (gate * torch.sigmoid(gate) * up) @ w2[expert].double().T
        expected.index_add_(0, token, topk_weights[token, choice].double()[:, None] * down)
    torch.testing.assert_close(got.double(), expected, **TOLERANCE[torch.bfloat16])

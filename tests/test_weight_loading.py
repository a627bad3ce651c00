"""Weight loaders of the tensor-parallel layers against slices computed here from the full tensors.

Every rank of a simulated tensor-parallel group (``TPGroup(group=None, rank=r, size=n)``: no
collective runs while loading) loads the same checkpoint tensors; each rank's parameters must
equal the piece this test cuts out of the full tensors by itself, from what the rank is meant to
hold (its output features, its input features, the kv heads its q heads attend with). Covered:
per-part and already-fused q/k/v and gate/up tensors, InternLM2's grouped ``wqkv``, stacked MoE
experts from per-expert, DBRX-flattened and Llama-4-style stacked tensors (split by their
intermediate size, or whole experts per rank under expert parallelism), and int4 tensors packed
8 to an int32 with group-wise scales.
"""

from __future__ import annotations

import pytest
import torch

from sglang_core.layers.experts import ExpertWeights
from sglang_core.layers.parallel import (
    ColumnParallelLinear,
    MergedColumnParallelLinear,
    ParallelLMHead,
    QKVParallelLinear,
    RowParallelLinear,
    TPGroup,
    ungroup_qkv,
)
from sglang_core.layers.quant import QuantMethod, weight_param
from sglang_core.model_executor.model_api import ExpertMapping, expert_mappings, load_by_name

HIDDEN, HEAD_DIM = 64, 16


def group(rank: int, size: int) -> TPGroup:
    return TPGroup(group=None, rank=rank, size=size)


def rows(t: torch.Tensor, rank: int, size: int, dim: int = 0) -> torch.Tensor:
    """Piece ``rank`` of ``size`` equal pieces of ``t`` along ``dim``."""
    return t.chunk(size, dim)[rank]


def kv_heads_of_rank(rank: int, tp: int, heads: int, kv_heads: int) -> list[int]:
    """The kv heads a rank needs: those its q heads attend with (GQA: q head h uses kv head h // (heads / kv))."""
    per_rank = heads // tp
    return sorted({h // (heads // kv_heads) for h in range(rank * per_rank, (rank + 1) * per_rank)})


def head_rows(t: torch.Tensor, heads: list[int]) -> torch.Tensor:
    return torch.cat([t[h * HEAD_DIM:(h + 1) * HEAD_DIM] for h in heads])


# ---- q/k/v and gate/up: per-part and fused checkpoint tensors ----

QKV_CASES = [(4, 2, 1), (4, 2, 2), (8, 4, 2), (8, 2, 4), (4, 1, 4), (8, 2, 8)]


@pytest.mark.parametrize("heads,kv_heads,tp", QKV_CASES)
def test_qkv_per_part_and_fused_load_each_ranks_heads(heads, kv_heads, tp):
    torch.manual_seed(0)
    q, k, v = (torch.randn(n * HEAD_DIM, HIDDEN) for n in (heads, kv_heads, kv_heads))
    qb, kb, vb = (torch.randn(n * HEAD_DIM) for n in (heads, kv_heads, kv_heads))
    for rank in range(tp):
        per_part = QKVParallelLinear(HIDDEN, HEAD_DIM, heads, kv_heads, bias=True, tp=group(rank, tp))
        fused = QKVParallelLinear(HIDDEN, HEAD_DIM, heads, kv_heads, bias=True, tp=group(rank, tp))
        for weight, bias, shard in ((q, qb, "q"), (k, kb, "k"), (v, vb, "v")):
            per_part.weight.weight_loader(per_part.weight, weight, shard)
            per_part.bias.weight_loader(per_part.bias, bias, shard)
        fused.weight.weight_loader(fused.weight, torch.cat([q, k, v]))  # Phi-3 qkv_proj, GLM query_key_value
        fused.bias.weight_loader(fused.bias, torch.cat([qb, kb, vb]))

        own_q = list(range(rank * heads // tp, (rank + 1) * heads // tp))
        own_kv = kv_heads_of_rank(rank, tp, heads, kv_heads)
        expected_w = torch.cat([head_rows(q, own_q), head_rows(k, own_kv), head_rows(v, own_kv)])
        expected_b = torch.cat([head_rows(qb, own_q), head_rows(kb, own_kv), head_rows(vb, own_kv)])
        for layer in (per_part, fused):
            assert torch.equal(layer.weight, expected_w), (rank, tp)
            assert torch.equal(layer.bias, expected_b), (rank, tp)


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_gate_up_per_part_and_fused_load_each_ranks_rows(tp):
    torch.manual_seed(1)
    gate, up = torch.randn(96, HIDDEN), torch.randn(96, HIDDEN)
    gate_b, up_b = torch.randn(96), torch.randn(96)
    for rank in range(tp):
        per_part = MergedColumnParallelLinear(HIDDEN, [96, 96], bias=True, tp=group(rank, tp))
        fused = MergedColumnParallelLinear(HIDDEN, [96, 96], bias=True, tp=group(rank, tp))
        for index, (weight, bias) in enumerate(((gate, gate_b), (up, up_b))):
            per_part.weight.weight_loader(per_part.weight, weight, index)
            per_part.bias.weight_loader(per_part.bias, bias, index)
        fused.weight.weight_loader(fused.weight, torch.cat([gate, up]))  # Phi-3 gate_up_proj
        fused.bias.weight_loader(fused.bias, torch.cat([gate_b, up_b]))
        for layer in (per_part, fused):
            assert torch.equal(layer.weight, torch.cat([rows(gate, rank, tp), rows(up, rank, tp)]))
            assert torch.equal(layer.bias, torch.cat([rows(gate_b, rank, tp), rows(up_b, rank, tp)]))


@pytest.mark.parametrize("tp", [1, 2, 3])
def test_lm_head_bias_loads_each_ranks_vocab_rows(tp):
    """An LM head's bias (Phi-2's) is split by vocabulary rows as its weight is; 10 rows over 3
    ranks leave the last rank 2 padding rows, which stay zero (their logits are cut off)."""
    torch.manual_seed(6)
    vocab = 10
    weight, bias = torch.randn(vocab, HIDDEN), torch.randn(vocab)
    per_rank = -(-vocab // tp)
    for rank in range(tp):
        head = ParallelLMHead(vocab, HIDDEN, group(rank, tp), bias=True)
        head.weight.weight_loader(head.weight, weight)
        head.bias.weight_loader(head.bias, bias)
        own = slice(rank * per_rank, (rank + 1) * per_rank)
        real = len(bias[own])
        assert torch.equal(head.weight[:real], weight[own]) and torch.equal(head.bias[:real], bias[own]), (rank, tp)
        assert not head.bias[real:].any() and head.bias.shape == (per_rank,)


def test_lm_head_bias_is_added_to_the_logits():
    torch.manual_seed(7)
    weight, bias, hidden = torch.randn(10, HIDDEN), torch.randn(10), torch.randn(3, HIDDEN)
    head = ParallelLMHead(10, HIDDEN, bias=True)
    head.weight.weight_loader(head.weight, weight)
    head.bias.weight_loader(head.bias, bias)
    assert torch.allclose(head.project(hidden), hidden @ weight.T + bias, atol=1e-5)
    assert ParallelLMHead(10, HIDDEN).bias is None


def test_fused_names_load_through_load_by_name():
    """A checkpoint naming the fused tensor (Phi-3's ``qkv_proj``/``gate_up_proj``) loads with shard id
    None beside the per-part table a Llama-style model declares; both checkpoints give equal params."""
    torch.manual_seed(2)
    q, k, v = torch.randn(64, HIDDEN), torch.randn(32, HIDDEN), torch.randn(32, HIDDEN)
    gate, up = torch.randn(48, HIDDEN), torch.randn(48, HIDDEN)
    stacked = {"q_proj": ("qkv_proj", "q"), "k_proj": ("qkv_proj", "k"), "v_proj": ("qkv_proj", "v"),
               "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1)}

    def build(rank: int):
        qkv = QKVParallelLinear(HIDDEN, HEAD_DIM, 4, 2, tp=group(rank, 2))
        merged = MergedColumnParallelLinear(HIDDEN, [48, 48], tp=group(rank, 2))
        return {"l.attn.qkv_proj.weight": qkv.weight, "l.mlp.gate_up_proj.weight": merged.weight}

    for rank in range(2):
        split_params, fused_params = build(rank), build(rank)
        split = [("l.attn.q_proj.weight", q), ("l.attn.k_proj.weight", k), ("l.attn.v_proj.weight", v),
                 ("l.mlp.gate_proj.weight", gate), ("l.mlp.up_proj.weight", up)]
        fused = [("l.attn.qkv_proj.weight", torch.cat([q, k, v])), ("l.mlp.gate_up_proj.weight", torch.cat([gate, up]))]
        assert load_by_name(split_params, split, stacked) == set(split_params)
        assert load_by_name(fused_params, fused, stacked) == set(fused_params)
        for name in split_params:
            assert torch.equal(split_params[name], fused_params[name]), name
        assert torch.equal(fused_params["l.attn.qkv_proj.weight"],
                           torch.cat([rows(q, rank, 2), rows(k, rank, 2), rows(v, rank, 2)]))


def test_fused_tensor_of_the_wrong_size_is_an_error():
    layer = QKVParallelLinear(HIDDEN, HEAD_DIM, 4, 2)
    with pytest.raises(ValueError, match="fused checkpoint tensor"):
        layer.weight.weight_loader(layer.weight, torch.zeros(7 * HEAD_DIM, HIDDEN))
    with pytest.raises(ValueError, match="shape"):
        layer.weight.weight_loader(layer.weight, torch.zeros(4 * HEAD_DIM, HIDDEN + 1), "q")


def test_ungroup_qkv_on_a_hand_built_internlm2_wqkv():
    """4 q heads, 2 kv heads, head_dim 2, one input column: each row holds its own label."""
    q = lambda h: [100 + 10 * h, 101 + 10 * h]  # noqa: E731  (q head h's two rows)
    k = lambda h: [200 + 10 * h, 201 + 10 * h]  # noqa: E731
    v = lambda h: [300 + 10 * h, 301 + 10 * h]  # noqa: E731
    # InternLM2: per kv group g, its q heads (2g, 2g+1), then k head g, then v head g.
    grouped = q(0) + q(1) + k(0) + v(0) + q(2) + q(3) + k(1) + v(1)
    expected = q(0) + q(1) + q(2) + q(3) + k(0) + k(1) + v(0) + v(1)
    wqkv = torch.tensor(grouped, dtype=torch.float32)
    assert ungroup_qkv(wqkv, 4, 2, 2).tolist() == expected  # a bias
    matrix = torch.stack([wqkv, -wqkv], dim=1)  # [rows, hidden=2]
    assert ungroup_qkv(matrix, 4, 2, 2).tolist() == [[x, -x] for x in expected]
    with pytest.raises(ValueError, match="grouped qkv"):
        ungroup_qkv(matrix[:-1], 4, 2, 2)


# ---- stacked MoE experts ----

E, MOE_HIDDEN, MOE_INTER = 4, 16, 32


def expert_tensors(seed: int):
    torch.manual_seed(seed)
    gate = [torch.randn(MOE_INTER, MOE_HIDDEN) for _ in range(E)]
    up = [torch.randn(MOE_INTER, MOE_HIDDEN) for _ in range(E)]
    down = [torch.randn(MOE_HIDDEN, MOE_INTER) for _ in range(E)]
    return gate, up, down


def checkpoints(gate, up, down) -> dict[str, tuple[list, list[ExpertMapping]]]:
    """The same experts in four checkpoint layouts, each with the mappings a model would declare."""
    mixtral = [(f"model.layers.0.block_sparse_moe.experts.{e}.{name}.weight", t[e])
               for e in range(E) for name, t in (("w1", gate), ("w3", up), ("w2", down))]
    qwen = [(f"model.layers.0.mlp.experts.{e}.{name}.weight", t[e])
            for e in range(E) for name, t in (("gate_proj", gate), ("up_proj", up), ("down_proj", down))]
    # DBRX: every expert flattened into one [E * rows, cols] tensor; w2 stored per expert as [inter, hidden].
    dbrx = [("model.layers.0.ffn.experts.mlp.w1", torch.cat(gate)), ("model.layers.0.ffn.experts.mlp.v1", torch.cat(up)),
            ("model.layers.0.ffn.experts.mlp.w2", torch.cat([d.t() for d in down]))]
    dbrx_rules = [ExpertMapping(rf"(.+)\.ffn\.experts\.mlp\.{name}", rf"\1.ffn.experts.{stem}_weight", part,
                                transposed=part == "down")
                  for name, stem, part in (("w1", "w13", "gate"), ("v1", "w13", "up"), ("w2", "w2", "down"))]
    # Llama-4 style: stacked [E, in, out], gate and up fused.
    llama4 = [("model.layers.0.moe.experts.gate_up_proj", torch.stack([torch.cat([g, u]).t() for g, u in zip(gate, up)])),
              ("model.layers.0.moe.experts.down_proj", torch.stack([d.t() for d in down]))]
    llama4_rules = [ExpertMapping(r"(.+)\.experts\.gate_up_proj", r"\1.experts.w13_weight", "gate_up", transposed=True),
                    ExpertMapping(r"(.+)\.experts\.down_proj", r"\1.experts.w2_weight", "down", transposed=True)]
    return {
        "mixtral": (mixtral, expert_mappings({"w1": "gate", "w3": "up", "w2": "down"}), "block_sparse_moe.experts"),
        "qwen": (qwen, expert_mappings({"gate_proj": "gate", "up_proj": "up", "down_proj": "down"}), "mlp.experts"),
        "dbrx": (dbrx, dbrx_rules, "ffn.experts"),
        "llama4": (llama4, llama4_rules, "moe.experts"),
    }


@pytest.mark.parametrize("layout", ["mixtral", "qwen", "dbrx", "llama4"])
@pytest.mark.parametrize("tp", [1, 2, 4])
def test_experts_load_each_ranks_slice(layout, tp):
    gate, up, down = expert_tensors(3)
    weights, rules, module_path = checkpoints(gate, up, down)[layout]
    for rank in range(tp):
        experts = ExpertWeights(E, MOE_HIDDEN, MOE_INTER, tp=group(rank, tp))
        params = {f"model.layers.0.{module_path}.{n}": p for n, p in experts.named_parameters()}
        assert load_by_name(params, weights, {}, experts=rules) == set(params)
        for e in range(E):
            assert torch.equal(experts.w13_weight[e], torch.cat([rows(gate[e], rank, tp), rows(up[e], rank, tp)]))
            assert torch.equal(experts.w2_weight[e], rows(down[e], rank, tp, dim=1))


@pytest.mark.parametrize("layout", ["mixtral", "qwen", "dbrx", "llama4"])
@pytest.mark.parametrize("ep", [2, 4])
def test_expert_parallel_ranks_load_only_their_whole_experts(layout, ep):
    """Expert parallelism: rank r's stacked parameters hold experts r*E/ep .. (r+1)*E/ep - 1 whole,
    and nothing else (exactly their bytes), from any checkpoint layout."""
    gate, up, down = expert_tensors(4)
    weights, rules, module_path = checkpoints(gate, up, down)[layout]
    for rank in range(ep):
        experts = ExpertWeights(E, MOE_HIDDEN, MOE_INTER, tp=TPGroup(rank=rank, size=ep, expert_parallel=True))
        params = {f"model.layers.0.{module_path}.{n}": p for n, p in experts.named_parameters()}
        assert load_by_name(params, weights, {}, experts=rules) == set(params)
        own = range(rank * E // ep, (rank + 1) * E // ep)
        assert torch.equal(experts.w13_weight, torch.stack([torch.cat([gate[e], up[e]]) for e in own]))
        assert torch.equal(experts.w2_weight, torch.stack([down[e] for e in own]))


def test_experts_not_divisible_by_the_expert_parallel_ranks_are_refused():
    with pytest.raises(ValueError, match="enable_ep_moe: 4 experts .* ep_size=3"):
        ExpertWeights(E, MOE_HIDDEN, MOE_INTER, tp=TPGroup(rank=0, size=3, expert_parallel=True))


def test_expert_shard_id_errors():
    experts = ExpertWeights(E, MOE_HIDDEN, MOE_INTER)
    with pytest.raises(ValueError, match="out of range"):
        experts.weight_loader(experts.w13_weight, torch.zeros(MOE_INTER, MOE_HIDDEN), (E, "w1"))
    with pytest.raises(ValueError, match="expert_id, part"):
        experts.weight_loader(experts.w13_weight, torch.zeros(MOE_INTER, MOE_HIDDEN), (0, "w4"))
    with pytest.raises(ValueError, match="does not stack"):
        experts.weight_loader(experts.w13_weight, torch.zeros(E + 1, MOE_INTER, MOE_HIDDEN), (None, "gate"))


# ---- packed int4 tensors and group-wise scales (a GPTQ-like method, test-only) ----

PACK, GROUP = 8, 16


def pack(values: torch.Tensor, dim: int) -> torch.Tensor:
    """Pack int4 values 8 to an int32 along ``dim``; value j of a word sits in bits 4j..4j+3."""
    v = values.movedim(dim, -1).to(torch.int64)
    v = v.reshape(*v.shape[:-1], -1, PACK)
    words = sum(v[..., j] << (4 * j) for j in range(PACK))
    words = torch.where(words >= 2**31, words - 2**32, words)  # the int32 with those bits
    return words.to(torch.int32).movedim(-1, dim)


def unpack(words: torch.Tensor, dim: int) -> torch.Tensor:
    w = words.movedim(dim, -1).to(torch.int64)
    values = torch.stack([(w >> (4 * j)) & 0xF for j in range(PACK)], dim=-1)
    return values.reshape(*w.shape[:-1], -1).movedim(-1, dim)


class PackedInt4Method(QuantMethod):
    """GPTQ's layout: ``qweight`` [in/8, out] packed along the input, ``scales`` [in/group, out],
    ``qzeros`` [in/group, out/8] packed along the output."""

    def create_weights(self, layer, input_size, output_sizes, params_dtype, weight_loader) -> None:
        out = sum(output_sizes)
        layer.qweight = weight_param(torch.zeros(input_size // PACK, out, dtype=torch.int32), weight_loader,
                                     input_dim=0, output_dim=1, packed_dim=0, packed_factor=PACK)
        layer.scales = weight_param(torch.zeros(input_size // GROUP, out, dtype=params_dtype), weight_loader,
                                    input_dim=0, output_dim=1)
        layer.qzeros = weight_param(torch.zeros(input_size // GROUP, out // PACK, dtype=torch.int32), weight_loader,
                                    input_dim=0, output_dim=1, packed_dim=1, packed_factor=PACK)

    def apply(self, layer, x, bias):
        values = unpack(layer.qweight, 0).float()
        zeros = unpack(layer.qzeros, 1).float().repeat_interleave(GROUP, 0)
        w = (values - zeros) * layer.scales.repeat_interleave(GROUP, 0)  # [in, out]
        y = x @ w
        return y if bias is None else y + bias


class QuantProjection:
    """One projection's checkpoint tensors, full size, with the int4 values they pack."""

    def __init__(self, inputs: int, outputs: int, seed: int):
        gen = torch.Generator().manual_seed(seed)
        self.values = torch.randint(0, 16, (inputs, outputs), generator=gen)
        self.zeros = torch.randint(0, 16, (inputs // GROUP, outputs), generator=gen)
        # Eighths and small integers: every product and sum below is exact in float32.
        self.scales = torch.randint(1, 9, (inputs // GROUP, outputs), generator=gen) / 8
        self.tensors = {"qweight": pack(self.values, 0), "scales": self.scales, "qzeros": pack(self.zeros, 1)}

    def expected(self, in_rows: slice, out_cols: list[int]) -> dict[str, torch.Tensor]:
        """Unpacked values, zeros and scales a rank must hold: input rows ``in_rows``, output columns ``out_cols``."""
        groups = slice(in_rows.start // GROUP, in_rows.stop // GROUP)
        return {"values": self.values[in_rows][:, out_cols], "zeros": self.zeros[groups][:, out_cols],
                "scales": self.scales[groups][:, out_cols]}


def loaded_values(layer) -> dict[str, torch.Tensor]:
    return {"values": unpack(layer.qweight, 0), "zeros": unpack(layer.qzeros, 1), "scales": layer.scales.data}


def load_parts(layer, parts: list[tuple[object, QuantProjection]]) -> None:
    for name in ("qweight", "scales", "qzeros"):
        param = getattr(layer, name)
        for shard, proj in parts:
            param.weight_loader(param, proj.tensors[name], shard)


def load_fused(layer, projs: list[QuantProjection]) -> None:
    for name in ("qweight", "scales", "qzeros"):
        param = getattr(layer, name)
        param.weight_loader(param, torch.cat([p.tensors[name] for p in projs], dim=1))


def assert_holds(layer, expected: dict[str, torch.Tensor]) -> None:
    got = loaded_values(layer)
    for key in expected:
        assert torch.equal(got[key].to(expected[key].dtype), expected[key]), key


def cols(rank: int, tp: int, size: int) -> list[int]:
    return list(range(rank * size // tp, (rank + 1) * size // tp))


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_packed_column_and_row_parallel(tp):
    inputs, outputs = 256, 128
    proj = QuantProjection(inputs, outputs, seed=4)
    x = torch.randint(-3, 4, (3, inputs)).float()
    column_outputs, row_sum = [], 0
    for rank in range(tp):
        column = ColumnParallelLinear(inputs, outputs, tp=group(rank, tp), quant_method=PackedInt4Method())
        load_parts(column, [(None, proj)])
        assert_holds(column, proj.expected(slice(0, inputs), cols(rank, tp, outputs)))
        column_outputs.append(column(x))

        row = RowParallelLinear(inputs, outputs, tp=group(rank, tp), quant_method=PackedInt4Method())
        load_parts(row, [(None, proj)])
        in_rows = slice(rank * inputs // tp, (rank + 1) * inputs // tp)
        assert_holds(row, proj.expected(in_rows, list(range(outputs))))
        row_sum = row_sum + PackedInt4Method().apply(row, x[:, in_rows], None)  # what the all-reduce adds up

    # The ranks' pieces make up the whole layer: column outputs side by side, row partial sums added.
    full = (proj.values.float() - proj.zeros.float().repeat_interleave(GROUP, 0)) * proj.scales.repeat_interleave(GROUP, 0)
    assert torch.equal(torch.cat(column_outputs, dim=1), x @ full)
    assert torch.equal(row_sum, x @ full)


@pytest.mark.parametrize("fused", [False, True], ids=["per-part", "fused"])
@pytest.mark.parametrize("heads,kv_heads,tp", [(4, 2, 1), (4, 2, 2), (8, 2, 4)])
def test_packed_qkv(heads, kv_heads, tp, fused):
    inputs = 128
    projs = [QuantProjection(inputs, n * HEAD_DIM, seed=10 + i) for i, n in enumerate((heads, kv_heads, kv_heads))]
    for rank in range(tp):
        layer = QKVParallelLinear(inputs, HEAD_DIM, heads, kv_heads, tp=group(rank, tp), quant_method=PackedInt4Method())
        if fused:
            load_fused(layer, projs)
        else:
            load_parts(layer, list(zip("qkv", projs)))
        own_q = range(rank * heads // tp, (rank + 1) * heads // tp)
        own_kv = kv_heads_of_rank(rank, tp, heads, kv_heads)
        head_cols = lambda hs: [h * HEAD_DIM + d for h in hs for d in range(HEAD_DIM)]  # noqa: E731
        parts = [p.expected(slice(0, inputs), head_cols(hs)) for p, hs in zip(projs, (own_q, own_kv, own_kv))]
        assert_holds(layer, {key: torch.cat([part[key] for part in parts], dim=1) for key in parts[0]})


@pytest.mark.parametrize("fused", [False, True], ids=["per-part", "fused"])
@pytest.mark.parametrize("tp", [1, 2, 4])
def test_packed_merged(tp, fused):
    inputs, inter = 128, 64
    gate, up = QuantProjection(inputs, inter, seed=20), QuantProjection(inputs, inter, seed=21)
    for rank in range(tp):
        layer = MergedColumnParallelLinear(inputs, [inter, inter], tp=group(rank, tp), quant_method=PackedInt4Method())
        if fused:
            load_fused(layer, [gate, up])
        else:
            load_parts(layer, [(0, gate), (1, up)])
        parts = [p.expected(slice(0, inputs), cols(rank, tp, inter)) for p in (gate, up)]
        assert_holds(layer, {key: torch.cat([part[key] for part in parts], dim=1) for key in parts[0]})


def test_packed_shard_that_splits_a_word_is_an_error():
    """Output features per rank not a multiple of the packing: the loader refuses instead of mixing words."""
    layer = ColumnParallelLinear(128, 8, tp=group(0, 2), quant_method=PackedInt4Method())
    with pytest.raises(ValueError, match="packing 8"):
        layer.qzeros.weight_loader(layer.qzeros, torch.zeros(8, 1, dtype=torch.int32))


def test_dummy_weights_fill_packed_and_float8_parameters() -> None:
    """Speed work runs quantized layouts on dummy weights: packed integer codes get random bit
    patterns over their whole range, float8 tensors noise drawn in float32, norms one."""
    from sglang_core.weights.loader import init_dummy_weights

    model = torch.nn.Module()
    model.qweight = torch.nn.Parameter(torch.zeros(64, 64, dtype=torch.int32), requires_grad=False)
    model.codes = torch.nn.Parameter(torch.zeros(4096, dtype=torch.uint8), requires_grad=False)
    model.weight = torch.nn.Parameter(torch.zeros(64, 64, dtype=torch.float8_e4m3fn), requires_grad=False)
    model.input_layernorm = torch.nn.Module()
    model.input_layernorm.weight = torch.nn.Parameter(torch.zeros(8))
    init_dummy_weights(model, seed=0)
    assert bool((model.qweight < 0).any()) and bool((model.qweight > 2**24).any())  # high bits set
    assert int(model.codes.min()) < 16 and int(model.codes.max()) > 240
    fp = model.weight.float()
    assert 0.01 < float(fp.std()) < 0.04 and bool(torch.isfinite(fp).all())
    assert bool((model.input_layernorm.weight == 1).all())


class PositiveScalesMethod(PackedInt4Method):
    """A format whose scales the core's noise would make invalid (negative): it draws them itself
    (``own_dummy_params``), and records what its hook saw."""

    def own_dummy_params(self, layer) -> set[str]:
        return {"scales"}

    def init_dummy_weights(self, layer, generator) -> None:
        self.seen = {name: p.clone() for name, p in layer.named_parameters(recurse=False)}
        layer.scales.uniform_(0.5, 1.0, generator=generator)


def test_dummy_weights_end_with_each_quant_methods_own_fill() -> None:
    """``QuantMethod.init_dummy_weights`` runs on every quantized layer once the core's noise is in
    (it sees the noise), and what it writes stays; the parameters it draws itself the core leaves
    as the layer made them (zeros), so each is drawn once."""
    from sglang_core.weights.loader import init_dummy_weights

    model = torch.nn.Module()
    model.proj = ColumnParallelLinear(128, 16, tp=group(0, 1), quant_method=PositiveScalesMethod())
    init_dummy_weights(model, seed=0)
    seen = model.proj.quant_method.seen
    assert bool((seen["qweight"] != 0).any()) and bool((seen["qzeros"] != 0).any())  # the core's noise came first
    assert bool((seen["scales"] == 0).all())  # but not into the method's own
    assert float(model.proj.scales.min()) >= 0.5 and bool((model.proj.qweight != 0).any())

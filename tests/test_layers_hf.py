"""The layers the model families need, each against its Hugging Face counterpart: LayerNorm (whole
and per attention head), Gemma's (1 + w) RMSNorm, OLMo 2's RMSNorms (rounded once, after the
weight), the activations by ``hidden_act`` name, and rotary embedding (layouts, partial rotary,
every rope scaling, both config spellings, the M-RoPE extension point), computed by transformers'
own code.

The rope tables are checked twice: the frequencies against
``transformers.modeling_rope_utils.ROPE_INIT_FUNCTIONS`` built from real config classes, and the
rotation itself against the ``apply_rotary_pos_emb`` of the model that uses it, down to tiny
random Phi-3 and GPT-J models run end to end (our fused kernel included, in Triton's interpreter).
"""

from __future__ import annotations

import copy
import threading
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace
from unittest import mock

import pytest
import torch
from transformers import (
    DeepseekV3Config,
    GemmaConfig,
    GPTJConfig,
    GPTNeoXConfig,
    LlamaConfig,
    Phi3Config,
    PhiConfig,
    Qwen2VLTextConfig,
    StableLmConfig,
)
from transformers.activations import ACT2FN
from transformers.models.cohere.modeling_cohere import CohereLayerNorm
from transformers.models.stablelm.modeling_stablelm import StableLmLayerNormPerHead
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from sglang_core.layers.activation import GeluAndMul, SiluAndMul, act_fn, gated_act_fn
from sglang_core.layers.norm import HeadwiseLayerNorm, LayerNorm, RMSNorm, SplitHeadsRMSNorm
from sglang_core.layers.parallel import QKVParallelLinear, TPGroup
from sglang_core.layers.rotary import (
    LongRopeRotaryEmbedding,
    MRotaryEmbedding,
    RotaryEmbedding,
    rope_frequencies,
    rope_from_config,
    rope_parameters,
    yarn_softmax_scale,
)
from sglang_core.model_executor.model_api import load_by_name

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FLOAT32 = dict(atol=1e-5, rtol=1e-5)
TINY = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, intermediate_size=96, vocab_size=97,
            num_hidden_layers=1)


def fused_path(module: torch.nn.Module, *args):
    """The layer's fused-kernel branch: on the GPU where there is one, else in Triton's interpreter."""
    module = copy.deepcopy(module).to(DEVICE)
    with mock.patch(f"{type(module).forward.__module__}.use_fused", return_value=True):
        out = module(*(arg.to(DEVICE) for arg in args))
    return tuple(o.cpu() for o in out) if isinstance(out, tuple) else out.cpu()


def qk(tokens: int, heads: int, kv_heads: int, head_dim: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """q and k as views of one fused projection output, as a model passes them."""
    torch.manual_seed(seed)
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * head_dim)
    q, k, _ = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    return q.view(tokens, heads, head_dim), k.view(tokens, kv_heads, head_dim)


# --- LayerNorm -------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [True, False])
def test_layer_norm_matches_torch(dtype: torch.dtype, bias: bool) -> None:
    torch.manual_seed(1)
    reference = torch.nn.LayerNorm(96, eps=1e-5, bias=bias, dtype=dtype)
    torch.nn.init.normal_(reference.weight)
    if bias:
        torch.nn.init.normal_(reference.bias)
    norm = LayerNorm(96, 1e-5, bias=bias, params_dtype=dtype)
    norm.load_state_dict(reference.state_dict())
    x = (torch.randn(5, 96) * 4 + 3).to(dtype)
    residual = torch.randn(5, 96).to(dtype)
    with torch.no_grad():
        torch.testing.assert_close(norm(x), reference(x), atol=0, rtol=0)
        out, summed = norm(x, residual)
        torch.testing.assert_close(summed, x + residual, atol=0, rtol=0)
        torch.testing.assert_close(out, reference(x + residual), atol=0, rtol=0)
        tolerance = FLOAT32 if dtype == torch.float32 else dict(atol=1e-2, rtol=1.6e-2)
        torch.testing.assert_close(fused_path(norm, x), reference(x), **tolerance)


def test_layer_norm_without_bias_has_no_bias_parameter() -> None:
    assert [name for name, _ in LayerNorm(8, bias=False).named_parameters()] == ["weight"]


# --- RMSNorm with a weight offset ------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_weight_offset_matches_gemma_rms_norm(dtype: torch.dtype) -> None:
    """Gemma's ``(1 + w)`` RMSNorm: its checkpoint ``w``, loaded as models load weights into an
    RMSNorm with ``weight_offset=1``, gives the same output on both paths, with a residual too."""
    from transformers.models.gemma.modeling_gemma import GemmaRMSNorm

    torch.manual_seed(4)
    reference = GemmaRMSNorm(96, eps=1e-6)
    torch.nn.init.normal_(reference.weight)
    reference = reference.to(dtype)
    norm = RMSNorm(96, 1e-6, dtype, weight_offset=1.0)
    assert load_by_name(dict(norm.named_parameters()), reference.state_dict().items(), {}) == {"weight"}
    x = (torch.randn(5, 96) * 4 + 3).to(dtype)
    residual = torch.randn(5, 96).to(dtype)
    # bfloat16: the reference rounds once, we round the normed input and the stored 1 + w too.
    tolerance = FLOAT32 if dtype == torch.float32 else dict(atol=1e-2, rtol=1.6e-2)
    with torch.no_grad():
        torch.testing.assert_close(norm(x), reference(x), **tolerance)
        out, summed = norm(x, residual)
        torch.testing.assert_close(summed, x + residual, atol=0, rtol=0)
        torch.testing.assert_close(out, reference(x + residual), **tolerance)
        torch.testing.assert_close(fused_path(norm, x), reference(x), **tolerance)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_headwise_layer_norm_matches_cohere_and_stablelm(dtype: torch.dtype) -> None:
    """One scale per head, loaded whole (Cohere's ``[heads, head_dim]``) or head by head (StableLM's
    ``norms.<h>.weight``), against both models' own q/k norms."""
    torch.manual_seed(2)
    heads, dim, eps = 4, 16, 1e-3
    cohere = CohereLayerNorm(hidden_size=(heads, dim), eps=eps)
    with torch.no_grad():
        cohere.weight.copy_((torch.randn(heads, dim) + 1).to(dtype))  # values the dtype holds exactly
    stablelm = StableLmLayerNormPerHead(dim, heads, eps=eps).to(dtype)
    whole, by_head = HeadwiseLayerNorm(heads, dim, eps, dtype), HeadwiseLayerNorm(heads, dim, eps, dtype)
    whole.weight.weight_loader(whole.weight, cohere.weight.data.to(dtype))
    for h, norm in enumerate(stablelm.norms):
        norm.weight.data.copy_(cohere.weight[h])
        by_head.weight.weight_loader(by_head.weight, norm.weight.data, h)
    x = (torch.randn(5, heads, dim) * 3 + 1).to(dtype)  # [tokens, heads, head_dim]
    tolerance = FLOAT32 if dtype == torch.float32 else dict(atol=1e-2, rtol=1.6e-2)
    with torch.no_grad():
        torch.testing.assert_close(whole(x), cohere(x), **tolerance)
        # StableLM normalises [batch, heads, tokens, head_dim].
        torch.testing.assert_close(by_head(x), stablelm(x.transpose(0, 1).unsqueeze(0))[0].transpose(0, 1), **tolerance)


@pytest.mark.parametrize("heads, kv_heads, tp_size", [(4, 2, 2), (4, 2, 4)], ids=["split", "kv-replicated"])
def test_headwise_layer_norm_holds_the_heads_its_rank_projects(heads: int, kv_heads: int, tp_size: int) -> None:
    """Under tensor parallelism each rank's q/k norm scales exactly the heads its q/k projection
    computes (QKVParallelLinear's split, kv heads replicated when ranks outnumber them)."""
    dim = 4
    for rank in range(tp_size):
        tp = TPGroup(rank=rank, size=tp_size)
        qkv = QKVParallelLinear(1, dim, heads, kv_heads, tp=tp)
        for shard, total in (("q", heads), ("k", kv_heads)):
            # Row r of a projection belongs to head r // dim; the norm's row h holds the value h.
            qkv.weight_loader(qkv.weight, torch.arange(total * dim).float().unsqueeze(1) // dim, shard)
            projected = qkv.weight.data[:, 0].split(qkv.output_sizes)["qkv".index(shard)][::dim]
            whole, by_head = HeadwiseLayerNorm(total, dim, tp=tp), HeadwiseLayerNorm(total, dim, tp=tp)
            whole.weight.weight_loader(whole.weight, torch.arange(total).float().unsqueeze(1).expand(total, dim))
            for h in range(total):
                by_head.weight.weight_loader(by_head.weight, torch.full((dim,), float(h)), h)
            assert whole.weight[:, 0].tolist() == projected.tolist(), (shard, rank)
            assert torch.equal(by_head.weight, whole.weight), (shard, rank)


class ThreadRanks:
    """``size`` tensor-parallel ranks as threads of this process: ``all_reduce`` sums every rank's
    tensor (a barrier on each side), as a process group would."""

    def __init__(self, size: int):
        self.barrier, self.parts = threading.Barrier(size), [None] * size

    def group(self, rank: int) -> TPGroup:
        ranks = self

        class ThreadGroup(TPGroup):
            def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
                ranks.parts[self.rank] = x.clone()
                ranks.barrier.wait()
                total = sum(ranks.parts)
                ranks.barrier.wait()
                return x.copy_(total)

        return ThreadGroup(rank=rank, size=len(self.parts))

    def run(self, work) -> list:
        """``work(tp)`` on every rank at once; each rank's result."""
        with ThreadPoolExecutor(len(self.parts)) as pool:
            return list(pool.map(lambda rank: work(self.group(rank)), range(len(self.parts))))


@pytest.mark.parametrize("heads, kv_heads, tp_size", [(4, 2, 2), (4, 2, 4)], ids=["split", "kv-replicated"])
def test_split_heads_rms_norm_matches_olmo2_on_every_rank(heads: int, kv_heads: int, tp_size: int) -> None:
    """OLMo 2's q/k RMSNorm over every head of the projection: each rank's norm of the heads its
    q/k projection computes (kv heads replicated when ranks outnumber them) equals those heads of
    transformers' norm over the whole projection."""
    from transformers.models.olmo2.modeling_olmo2 import Olmo2RMSNorm

    torch.manual_seed(4)
    dim, eps = 8, 1e-2
    for total in (heads, kv_heads):
        reference = Olmo2RMSNorm(total * dim, eps)
        with torch.no_grad():
            reference.weight.add_(torch.randn(total * dim) * 0.3)
        x = torch.randn(5, total * dim) * 2 + 0.5

        def rank_output(tp: TPGroup) -> tuple[torch.Tensor, torch.Tensor]:
            qkv = QKVParallelLinear(1, dim, heads, total, tp=tp)  # ``total`` as the kv heads: its k split
            rows = torch.arange(total * dim).float().unsqueeze(1)
            qkv.weight_loader(qkv.weight, rows, "k")
            columns = qkv.weight.data[:, 0].split(qkv.output_sizes)[1].long()  # the k features this rank has
            norm = SplitHeadsRMSNorm(total, dim, eps, tp=tp)
            norm.weight.weight_loader(norm.weight, reference.weight.data)
            with torch.no_grad():
                return norm(x[:, columns]), reference(x)[:, columns]

        for got, expected in ThreadRanks(tp_size).run(rank_output):
            torch.testing.assert_close(got, expected, **FLOAT32)


def exactly_summed(rows: int, width: int, dtype: torch.dtype) -> torch.Tensor:
    """Rows of eighths in [-3, 3]: their squares add up exactly in float32 in any order, so a
    norm's statistics equal transformers' however the sum is split (across ranks, in a kernel) and
    only the rounding of the output can differ."""
    return (torch.randint(-24, 25, (rows, width)) / 8).to(dtype)


def olmo2_reference(weight: torch.Tensor, eps: float) -> tuple[torch.nn.Module, torch.nn.Module]:
    """transformers' OLMo 2 RMSNorm in ``weight``'s dtype with ``weight``, and Llama's, which rounds
    the normalised input before the weight multiplies it."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm
    from transformers.models.olmo2.modeling_olmo2 import Olmo2RMSNorm

    olmo2, llama = Olmo2RMSNorm(weight.shape[0], eps), LlamaRMSNorm(weight.shape[0], eps)
    for norm in (olmo2, llama):
        norm.weight.data.copy_(weight)
    return olmo2.to(weight.dtype), llama.to(weight.dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_olmo2_norms_round_as_transformers(dtype: torch.dtype) -> None:
    """Every norm OLMo 2 builds (per layer, q/k, final) multiplies by its weight in float32 and
    rounds once, as transformers' Olmo2RMSNorm: bit-exact in bfloat16 and float16, on inputs where
    Llama's rounding order gives another result; the fused kernel too, in float16 (Triton's
    interpreter truncates float32 to bfloat16 where the GPU rounds to nearest)."""
    from transformers import Olmo2Config

    from sglang_core.model_executor.model_api import ModelContext
    from sglang_plugins.models.olmo2.model import Olmo2ForCausalLM

    torch.manual_seed(7)
    config = Olmo2Config(**TINY, rms_norm_eps=1e-5)
    model = Olmo2ForCausalLM(config, ModelContext(dtype=dtype))
    layer = model.model.layers[0]
    norms = {"post_attention_layernorm": layer.post_attention_layernorm,
             "post_feedforward_layernorm": layer.post_feedforward_layernorm,
             "q_norm": layer.self_attn.q_norm, "k_norm": layer.self_attn.k_norm, "norm": model.model.norm}
    for name, norm in norms.items():
        weight = (torch.randn(norm.weight.shape[0]) * 0.5 + 1).to(dtype)
        norm.weight.data.copy_(weight)
        olmo2, llama = olmo2_reference(weight, config.rms_norm_eps)
        x = exactly_summed(6, weight.shape[0], dtype)
        with torch.no_grad():
            expected = olmo2(x)
            assert not torch.equal(llama(x), expected), name  # the input tells the two orders apart
            assert torch.equal(norm(x), expected), name
            if dtype == torch.float16:
                assert torch.equal(fused_path(norm, x), expected), name


@pytest.mark.parametrize("heads, kv_heads, tp_size", [(4, 2, 2), (4, 2, 4)], ids=["split", "kv-replicated"])
def test_split_heads_rms_norm_scaled_in_float32_matches_olmo2_in_bfloat16(heads: int, kv_heads: int,
                                                                          tp_size: int) -> None:
    """OLMo 2's q/k norms under tensor parallelism round as transformers' do: each rank's heads are
    bit-exact against transformers' bfloat16 norm over the whole projection (which heads a rank
    holds is the float32 test's above)."""
    torch.manual_seed(5)
    dim, eps = 8, 1e-5
    for total in (heads, kv_heads):
        weight = (torch.randn(total * dim) * 0.5 + 1).bfloat16()
        olmo2, llama = olmo2_reference(weight, eps)
        x = exactly_summed(6, total * dim, torch.bfloat16)
        with torch.no_grad():
            expected = olmo2(x)
            assert not torch.equal(llama(x), expected)

        def rank_output(tp: TPGroup) -> tuple[torch.Tensor, torch.Tensor]:
            norm = SplitHeadsRMSNorm(total, dim, eps, torch.bfloat16, tp, scale_in_float32=True)
            norm.weight.weight_loader(norm.weight, weight)
            columns = slice(norm.first, norm.first + norm.weight.shape[0])
            with torch.no_grad():
                return norm(x[:, columns]), expected[:, columns]

        for got, want in ThreadRanks(tp_size).run(rank_output):
            assert torch.equal(got, want)


# --- Activations -----------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["silu", "swish", "gelu", "gelu_python", "gelu_pytorch_tanh", "gelu_new",
                                  "gelu_fast", "gelu_python_tanh", "quick_gelu", "relu", "relu2"])
def test_act_fn_matches_hf(name: str) -> None:
    torch.manual_seed(2)
    x = torch.randn(4, 64) * 3
    torch.testing.assert_close(act_fn(name)(x), ACT2FN[name](x), atol=1e-6, rtol=1e-6)
    # bfloat16: HF's gelu_new/gelu_fast round after every op where torch's kernel rounds once.
    xb = x.bfloat16()
    torch.testing.assert_close(act_fn(name)(xb), ACT2FN[name](xb), atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("hidden_act", ["gelu_pytorch_tanh", "gelu", "silu"])
def test_gated_mlp_matches_hf_gemma_mlp(dtype: torch.dtype, hidden_act: str) -> None:
    """Gemma's GeGLU MLP ``down(act(gate(x)) * up(x))``, through our gated layer over the fused
    ``[gate | up]`` output (HF's Gemma config turns a legacy "gelu" into the tanh form itself)."""
    from transformers.models.gemma.modeling_gemma import GemmaMLP

    config = GemmaConfig(**TINY, head_dim=16, hidden_act=hidden_act)
    torch.manual_seed(3)
    mlp = GemmaMLP(config).to(dtype)
    act = gated_act_fn(config.hidden_act)
    assert isinstance(act, SiluAndMul if hidden_act == "silu" else GeluAndMul)
    x = torch.randn(6, 64).to(dtype)
    with torch.no_grad():
        gate_up = torch.cat([mlp.gate_proj(x), mlp.up_proj(x)], dim=-1)
        # Equal but for the order of float32 roundings, which transformers versions change.
        torch.testing.assert_close(mlp.down_proj(act(gate_up)), mlp(x),
                                   **(FLOAT32 if dtype == torch.float32 else dict(atol=0, rtol=0)))
        tolerance = FLOAT32 if dtype == torch.float32 else dict(atol=1e-2, rtol=1.6e-2)
        torch.testing.assert_close(mlp.down_proj(fused_path(act, gate_up)), mlp(x), **tolerance)


def test_gelu_and_mul_exact_matches_hf_gelu() -> None:
    x = torch.randn(3, 40) * 3
    gate, up = x.chunk(2, dim=-1)
    torch.testing.assert_close(GeluAndMul("none")(x), ACT2FN["gelu"](gate) * up, atol=0, rtol=0)


def test_phi2_mlp_with_act_fn_matches_hf() -> None:
    from transformers.models.phi.modeling_phi import PhiMLP

    config = PhiConfig(**TINY, hidden_act="gelu_new")
    torch.manual_seed(4)
    mlp = PhiMLP(config)
    x = torch.randn(5, 64)
    with torch.no_grad():
        torch.testing.assert_close(mlp.fc2(act_fn(config.hidden_act)(mlp.fc1(x))), mlp(x), **FLOAT32)


def test_unknown_activations_are_refused_by_field_name() -> None:
    with pytest.raises(ValueError, match="^hidden_act: 'mish'"):
        act_fn("mish")
    with pytest.raises(ValueError, match="^hidden_act: 'mish'"):
        gated_act_fn("mish")
    with pytest.raises(ValueError, match="^approximate: "):
        GeluAndMul("erf")


# --- Rope frequencies vs transformers' ROPE_INIT_FUNCTIONS ------------------------------------

def _llama(rope: dict, **extra) -> LlamaConfig:
    return LlamaConfig(**TINY, max_position_embeddings=512, rope_parameters={"rope_theta": 20000.0, **rope}, **extra)


LONGROPE = {"rope_type": "longrope", "rope_theta": 10000.0, "short_factor": [1.0, 1.3, 2.0, 3.0],
            "long_factor": [1.5, 3.5, 7.0, 16.0]}


def _phi3(**extra) -> Phi3Config:
    # head_dim 16, half of it rotary: four frequencies
    return Phi3Config(**TINY, max_position_embeddings=1024, original_max_position_embeddings=256,
                      partial_rotary_factor=0.5, rope_parameters=dict(LONGROPE), **extra)


def _deepseek(rope: dict) -> DeepseekV3Config:
    return DeepseekV3Config(**TINY, max_position_embeddings=4096, qk_rope_head_dim=16, qk_nope_head_dim=16,
                            v_head_dim=16, kv_lora_rank=16, q_lora_rank=24, rope_parameters=rope)


YARN_DEEPSEEK = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 32.0, "original_max_position_embeddings": 128,
                 "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 0.8}

# (config, rotary head_dim, the length our table serves, the sequence length HF computes for)
ROPE_CASES = {
    "linear": (_llama({"rope_type": "linear", "factor": 4.0}), 16, None, None),
    "llama3": (_llama({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                       "original_max_position_embeddings": 64}), 16, None, None),
    "dynamic_within_trained_length": (_llama({"rope_type": "dynamic", "factor": 2.0}), 16, None, None),
    "dynamic_beyond_trained_length": (_llama({"rope_type": "dynamic", "factor": 2.0}), 16, 2000, 2000),
    "yarn": (_llama({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128,
                     "beta_fast": 16.0}), 16, None, None),
    "yarn_untruncated_with_attention_factor": (
        _llama({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128, "truncate": False,
                "attention_factor": 0.9}), 16, None, None),
    "yarn_deepseek_mscale": (_deepseek(dict(YARN_DEEPSEEK)), 16, None, None),
    "longrope_short": (_phi3(), 16, 256, None),
    "longrope_long": (_phi3(), 16, None, 1024),
}


@pytest.mark.parametrize("case", list(ROPE_CASES))
def test_rope_frequencies_match_transformers(case: str) -> None:
    config, head_dim, max_position, hf_seq_len = ROPE_CASES[case]
    params = rope_parameters(config)
    hf_inv_freq, hf_attention_factor = ROPE_INIT_FUNCTIONS[params["rope_type"]](config, "cpu", seq_len=hf_seq_len)
    rotary_dim = int(head_dim * params["partial_rotary_factor"])
    scaling = params if params["rope_type"] != "default" else None
    inv_freq, attention_factor = rope_frequencies(rotary_dim, params["rope_theta"], scaling,
                                                  max_position or config.max_position_embeddings)
    torch.testing.assert_close(inv_freq, hf_inv_freq, atol=0, rtol=2e-7)
    assert attention_factor == pytest.approx(hf_attention_factor, rel=1e-12)
    assert case != "yarn_deepseek_mscale" or attention_factor != 1.0  # mscale / mscale_all_dim matters here


def test_rope_frequencies_default_with_partial_rotary_match_stablelm() -> None:
    from transformers.models.stablelm.modeling_stablelm import StableLmRotaryEmbedding

    config = StableLmConfig(**TINY, partial_rotary_factor=0.25, rope_theta=30000.0)
    hf = StableLmRotaryEmbedding(config)
    rope = rope_from_config(config, 16)
    assert rope.rotary_dim == 4
    inv_freq, factor = rope_frequencies(4, 30000.0, None, config.max_position_embeddings)
    torch.testing.assert_close(inv_freq, hf.inv_freq, atol=0, rtol=0)
    assert factor == hf.attention_scaling == 1.0


def test_yarn_softmax_scale_matches_deepseek_attention() -> None:
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3Attention

    config = _deepseek(dict(YARN_DEEPSEEK))
    attention = DeepseekV3Attention(config, 0)
    ours = yarn_softmax_scale(rope_parameters(config), (16 + 16) ** -0.5)
    assert ours == pytest.approx(attention.scaling, rel=1e-12)
    assert ours != pytest.approx((16 + 16) ** -0.5)
    default = _deepseek({"rope_type": "default", "rope_theta": 10000.0})
    assert yarn_softmax_scale(rope_parameters(default), 0.25) == 0.25


# --- Whole tables vs the models' rotary modules (incl. their per-forward length updates) -----

def _one_sequence_positions(rope: RotaryEmbedding, seq_len: int) -> torch.Tensor:
    """The positions of one sequence of ``seq_len`` tokens as ``rope`` takes them (LongRoPE's
    [2, T] also give each token the length its factors are chosen by)."""
    positions = torch.arange(seq_len)
    if isinstance(rope, LongRopeRotaryEmbedding):
        return torch.stack((positions, torch.full_like(positions, seq_len)))
    return positions


@pytest.mark.parametrize("case,module,seq_len,max_position", [
    ("dynamic_within", "llama", 300, None),
    ("dynamic_beyond", "llama", 2000, 2000),
    ("longrope_short", "phi3", 200, 256),
    ("longrope_long", "phi3", 1024, None),
    ("longrope_short_of_both_tables", "phi3", 200, None),
])
def test_rope_table_matches_hf_rotary_module(case: str, module: str, seq_len: int, max_position: int | None) -> None:
    """What HF's rotary module hands its attention for a sequence of ``seq_len`` tokens equals our
    table when it serves ``max_position`` (see rotary.py on length-dependent scalings); LongRoPE
    serving past the original length picks its table by the sequence length given per token."""
    if module == "llama":
        from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding as HFRotary

        config, head_dim = _llama({"rope_type": "dynamic", "factor": 2.0}), 16
    else:
        from transformers.models.phi3.modeling_phi3 import Phi3RotaryEmbedding as HFRotary

        config, head_dim = _phi3(), 16
    positions = torch.arange(seq_len)
    hf_cos, hf_sin = HFRotary(config)(torch.zeros(1), positions[None])
    rope = rope_from_config(config, head_dim, max_position=max_position)
    half = rope.rotary_dim // 2
    assert hf_cos.shape[-1] == rope.rotary_dim
    assert isinstance(rope, LongRopeRotaryEmbedding) == (module == "phi3" and max_position is None)
    cos, sin = rope.cos_sin(_one_sequence_positions(rope, seq_len))
    torch.testing.assert_close(cos, hf_cos[0, :, :half], atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(sin, hf_sin[0, :, :half], atol=2e-5, rtol=1e-5)


# --- Config spellings -------------------------------------------------------------------------

def test_rope_parameters_reads_transformers4_spelling() -> None:
    """``rope_theta`` + ``rope_scaling`` with the old ``type`` key, as transformers 4 configs have."""
    old = SimpleNamespace(rope_theta=5000.0, rope_scaling={"type": "linear", "factor": 2.0},
                          max_position_embeddings=512, partial_rotary_factor=0.5)
    params = rope_parameters(old)
    assert params["rope_type"] == "linear" and params["rope_theta"] == 5000.0
    assert params["partial_rotary_factor"] == 0.5 and "type" not in params
    new = LlamaConfig(**TINY, max_position_embeddings=512, rope_theta=5000.0, partial_rotary_factor=0.5,
                      rope_scaling={"type": "linear", "factor": 2.0})
    hf_inv_freq, _ = ROPE_INIT_FUNCTIONS["linear"](new, "cpu")
    ours = rope_from_config(old, 16)
    torch.testing.assert_close(ours.cos_cache[1], hf_inv_freq.cos(), atol=0, rtol=0)
    torch.testing.assert_close(ours.cos_cache, rope_from_config(new, 16).cos_cache, atol=0, rtol=0)


def test_rope_parameters_old_type_names_and_rotary_dims() -> None:
    su = SimpleNamespace(rope_scaling={"type": "su", **{k: v for k, v in LONGROPE.items() if k != "rope_type"}},
                         max_position_embeddings=1024, original_max_position_embeddings=256, rope_theta=10000.0)
    assert rope_parameters(su)["rope_type"] == "longrope"
    neox = GPTNeoXConfig(**TINY, rotary_pct=0.5)
    assert rope_from_config(neox, 16).rotary_dim == 8
    gptj = GPTJConfig(n_embd=64, n_head=4, rotary_dim=8, n_positions=128, vocab_size=97, n_layer=1)
    assert rope_from_config(gptj, 16, interleaved=True).rotary_dim == 8


def test_unsupported_rope_type_is_refused_by_field_name() -> None:
    config = SimpleNamespace(rope_scaling={"rope_type": "proportional", "factor": 2.0}, max_position_embeddings=64)
    with pytest.raises(ValueError, match="^rope_scaling: rope_type 'proportional'"):
        rope_from_config(config, 16)


# --- The rotation vs the models' apply_rotary_pos_emb ------------------------------------------

@pytest.mark.parametrize("path", ["torch", "fused"])
def test_partial_rotate_half_matches_gpt_neox(path: str) -> None:
    from transformers.models.gpt_neox.modeling_gpt_neox import GPTNeoXRotaryEmbedding, apply_rotary_pos_emb

    config = GPTNeoXConfig(**TINY, partial_rotary_factor=0.25, max_position_embeddings=256,
                           rope_parameters={"rope_type": "yarn", "factor": 2.0, "rope_theta": 10000.0})
    rope = rope_from_config(config, 16)
    positions = torch.tensor([0, 5, 63, 64, 200, 255, 17])
    q, k = qk(len(positions), 4, 2, 16)
    cos, sin = GPTNeoXRotaryEmbedding(config)(torch.zeros(1), positions[None])
    hf_q, hf_k = apply_rotary_pos_emb(q.transpose(0, 1)[None], k.transpose(0, 1)[None], cos, sin)
    got_q, got_k = (fused_path if path == "fused" else lambda m, *a: m(*a))(rope, positions, q.clone(), k.clone())
    torch.testing.assert_close(got_q, hf_q[0].transpose(0, 1), **FLOAT32)
    torch.testing.assert_close(got_k, hf_k[0].transpose(0, 1), **FLOAT32)


@pytest.mark.parametrize("path", ["torch", "fused"])
def test_interleaved_partial_rotary_matches_gptj(path: str) -> None:
    from transformers.models.gptj import modeling_gptj

    head_dim, rotary_dim = 16, 8
    config = GPTJConfig(n_embd=64, n_head=4, rotary_dim=rotary_dim, n_positions=128, vocab_size=97, n_layer=1)
    rope = rope_from_config(config, head_dim, interleaved=True)
    positions = torch.tensor([0, 1, 2, 50, 127, 64])
    q, k = qk(len(positions), 4, 2, head_dim, seed=5)
    table = modeling_gptj.create_sinusoidal_positions(128, rotary_dim)[positions][None]
    sin, cos = table.split(rotary_dim // 2, dim=-1)

    def hf(x: torch.Tensor) -> torch.Tensor:  # [T, heads, dim] as GPTJAttention splits and rotates it
        x = x[None]
        rotated = modeling_gptj.apply_rotary_pos_emb(x[..., :rotary_dim], sin, cos)
        return torch.cat([rotated, x[..., rotary_dim:]], dim=-1)[0]

    expected_q, expected_k = hf(q), hf(k)
    got_q, got_k = (fused_path if path == "fused" else lambda m, *a: m(*a))(rope, positions, q.clone(), k.clone())
    torch.testing.assert_close(got_q, expected_q, **FLOAT32)
    torch.testing.assert_close(got_k, expected_k, **FLOAT32)


def test_interleaved_rotary_matches_deepseek_up_to_its_layout() -> None:
    """DeepSeek's ``rope_interleave`` turns GPT-J pairs but writes the result de-interleaved
    (evens then odds); q.k is the same either way, as both get the same permutation."""
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import (
        DeepseekV3RotaryEmbedding,
        apply_rotary_pos_emb_interleave,
    )

    config = _deepseek(dict(YARN_DEEPSEEK))
    rope = rope_from_config(config, config.qk_rope_head_dim, interleaved=True)
    positions = torch.tensor([0, 3, 127, 128, 4000])
    q, k = qk(len(positions), 4, 1, 16, seed=6)
    cos, sin = DeepseekV3RotaryEmbedding(config)(torch.zeros(1), positions[None])
    hf_q, hf_k = apply_rotary_pos_emb_interleave(q.transpose(0, 1)[None], k.transpose(0, 1)[None], cos, sin)
    got_q, got_k = rope(positions, q, k)
    for got, hf in ((got_q, hf_q), (got_k, hf_k)):
        torch.testing.assert_close(torch.cat([got[..., 0::2], got[..., 1::2]], dim=-1), hf[0].transpose(0, 1),
                                   **FLOAT32)


# --- M-RoPE through the extension point -------------------------------------------------------

@pytest.mark.parametrize("path", ["torch", "fused"])
def test_mrope_on_the_cos_sin_seam_matches_qwen2_vl(path: str) -> None:
    """``mrope_section`` in the rope parameters builds ``MRotaryEmbedding``: positions [3, T],
    frequency band ``i`` turned by position component ``i % 3``."""
    from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VLRotaryEmbedding, apply_rotary_pos_emb

    config = Qwen2VLTextConfig(**TINY, max_position_embeddings=512,
                               rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                "mrope_section": [2, 3, 3]})
    rope = rope_from_config(config, 16)
    assert isinstance(rope, MRotaryEmbedding)
    positions = torch.tensor([[0, 1, 2, 3, 3, 3], [0, 1, 2, 3, 4, 4], [0, 1, 2, 3, 3, 5]]) * 7
    q, k = qk(6, 4, 2, 16, seed=7)
    cos, sin = Qwen2VLRotaryEmbedding(config)(torch.zeros(1), positions[:, None])
    hf_q, hf_k = apply_rotary_pos_emb(q.transpose(0, 1)[None], k.transpose(0, 1)[None], cos, sin)
    got_q, got_k = (fused_path if path == "fused" else lambda m, *a: m(*a))(rope, positions, q.clone(), k.clone())
    torch.testing.assert_close(got_q, hf_q[0].transpose(0, 1), **FLOAT32)
    torch.testing.assert_close(got_k, hf_k[0].transpose(0, 1), **FLOAT32)


# --- Real tiny models, end to end --------------------------------------------------------------

def _captured_rotary(module, function: str, model, input_ids: torch.Tensor) -> list[tuple]:
    """Runs ``model`` and records (arguments, result) of each call of ``module.function``."""
    original, calls = getattr(module, function), []

    def recording(*args, **kwargs):
        result = original(*args, **kwargs)
        calls.append((args, result))
        return result

    with mock.patch.object(module, function, recording), torch.no_grad():
        model(input_ids)
    return calls


@pytest.mark.parametrize("seq_len,max_position", [(24, 32), (24, None), (80, None)])
@pytest.mark.parametrize("path", ["torch", "fused"])
def test_phi3_longrope_partial_rotary_in_a_tiny_model(seq_len: int, max_position: int | None, path: str) -> None:
    """A random Phi-3 with LongRoPE and partial rotary: q and k before and after HF's rotation,
    inside the model's own forward, short (<= 32 original positions, from the short table alone
    or from both) and long factors."""
    from transformers import Phi3ForCausalLM
    from transformers.models.phi3 import modeling_phi3

    config = Phi3Config(**TINY, max_position_embeddings=80, original_max_position_embeddings=32,
                        partial_rotary_factor=0.5, pad_token_id=0,
                        rope_parameters=dict(LONGROPE))
    torch.manual_seed(8)
    model = Phi3ForCausalLM(config).eval()
    ids = torch.randint(1, 97, (1, seq_len))
    [((hf_in_q, hf_in_k, *_), (hf_q, hf_k))] = _captured_rotary(modeling_phi3, "apply_rotary_pos_emb", model, ids)
    rope = rope_from_config(config, 16, max_position=max_position)
    q, k = hf_in_q[0].transpose(0, 1).contiguous(), hf_in_k[0].transpose(0, 1).contiguous()
    positions = _one_sequence_positions(rope, seq_len)
    got_q, got_k = (fused_path if path == "fused" else lambda m, *a: m(*a))(rope, positions, q, k)
    torch.testing.assert_close(got_q, hf_q[0].transpose(0, 1), **FLOAT32)
    torch.testing.assert_close(got_k, hf_k[0].transpose(0, 1), **FLOAT32)


def test_gptj_interleaved_rotary_in_a_tiny_model() -> None:
    """A random GPT-J (interleaved, partial rotary): the rotary part of q and k as its attention rotates it."""
    from transformers import GPTJForCausalLM
    from transformers.models.gptj import modeling_gptj

    config = GPTJConfig(n_embd=64, n_head=4, rotary_dim=8, n_positions=64, vocab_size=97, n_layer=1)
    torch.manual_seed(9)
    model = GPTJForCausalLM(config).eval()
    calls = _captured_rotary(modeling_gptj, "apply_rotary_pos_emb", model, torch.randint(0, 97, (1, 12)))
    assert len(calls) == 2  # k, then q
    rope = rope_from_config(config, 16, interleaved=True)
    positions = torch.arange(12)
    for (rotary_part, *_), hf_rotated in calls:
        x = torch.cat([rotary_part[0], torch.randn(12, 4, 8)], dim=-1)  # [T, heads, head_dim]
        got, _ = rope(positions, x, x[:, :1])
        torch.testing.assert_close(got[..., :8], hf_rotated[0], **FLOAT32)
        assert torch.equal(got[..., 8:], x[..., 8:])

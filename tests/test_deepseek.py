"""DeepSeek-V2/V3 beyond the contract suite's token checks (tests/model_contract.py has their
cases): the KV pool keeps one latent per token and layer (with ``disable_mla`` every head's key
and value instead), multi-token-prediction layers in a checkpoint are skipped, a routing method
transformers does not have is refused, the input's two projections merge exactly where both are
replicated, and an MoE layer's batch-1 decode launches none of the kernels the fusions removed
(benchmarks/count_layer_kernels.py counts them)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Callable

import pytest
import torch
import transformers
from safetensors.torch import save_file

from model_contract import CASES
from sglang_core.engine import Engine
from sglang_core.layers.parallel import TPGroup
from sglang_core.model_executor.model_api import ModelContext
from sglang_plugins.attention.torch_native.backend import TorchNativeBackend
from sglang_plugins.models.deepseek.model import DeepseekV2ForCausalLM, DeepseekV3ForCausalLM
from test_model_contract import CHUNK, NEW_TOKENS, _build, _reference_greedy

KV_BUDGET_GB = 1e-3


def _values_per_token_and_layer(config: dict, disable_mla: bool) -> int:
    """One latent (``kv_lora_rank + qk_rope_head_dim``), or with ``disable_mla`` every head's key
    (``qk_nope_head_dim + qk_rope_head_dim``) and value (``v_head_dim``)."""
    if disable_mla:
        return config["num_attention_heads"] * (config["qk_nope_head_dim"] + config["qk_rope_head_dim"]
                                                + config["v_head_dim"])
    return config["kv_lora_rank"] + config["qk_rope_head_dim"]


@pytest.mark.parametrize("dtype, element_size, disable_mla", [("float32", 4, False), ("bfloat16", 2, False),
                                                              ("bfloat16", 2, True)])
def test_kv_pool_holds_one_latent_or_every_heads_kv(tmp_path, dtype: str, element_size: int,
                                                    disable_mla: bool) -> None:
    """A token costs num_layers * (kv_lora_rank + qk_rope_head_dim) elements, no per-head keys or
    values; with disable_mla, num_layers * heads * (key + value width) and no latent."""
    _build("deepseek-v2", tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    values = _values_per_token_and_layer(config, disable_mla)
    with Engine(str(tmp_path), device="cpu", dtype=dtype, kv_cache_memory_gb=KV_BUDGET_GB,
                disable_mla=disable_mla) as engine:
        size = engine.memory_report()["kv_pool_size"]
    assert size == int(KV_BUDGET_GB * 2**30) // (config["num_hidden_layers"] * values * element_size)


def _rounded_to(fp8: torch.dtype) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda x: x.to(fp8).to(x.dtype)


def _round_what_the_pool_keeps(model, per_head: bool, fp8: torch.dtype, monkeypatch) -> None:
    """transformers' DeepSeek with what our pool stores rounded to ``fp8``: the rotated k_pe, and
    the normed latent (``kv_a_layernorm``'s output) or, caching per head, every head's key and
    value (``kv_b_proj``'s output)."""
    from transformers.models.deepseek_v2 import modeling_deepseek_v2
    from transformers.models.deepseek_v3 import modeling_deepseek_v3

    stored = _rounded_to(fp8)
    for module, name in [(modeling_deepseek_v2, "apply_rotary_emb"), (modeling_deepseek_v3, "apply_rotary_pos_emb"),
                         (modeling_deepseek_v3, "apply_rotary_pos_emb_interleave")]:
        rotary = getattr(module, name)
        monkeypatch.setattr(module, name, lambda q, k, *args, rotary=rotary, **kwargs: (
            lambda q_out, k_out: (q_out, stored(k_out)))(*rotary(q, k, *args, **kwargs)))
    for layer in model.model.layers:
        cached = layer.self_attn.kv_b_proj if per_head else layer.self_attn.kv_a_layernorm
        cached.register_forward_hook(lambda _module, _args, out: stored(out))


@pytest.mark.parametrize("name, kv_cache_dtype", [("deepseek-v3-moe", "fp8_e4m3"),
                                                  ("deepseek-v2-lite-moe-per-head", "fp8_e5m2")])
def test_fp8_kv_cache_matches_reference_with_the_same_rounding(tmp_path, name: str, kv_cache_dtype: str,
                                                               monkeypatch) -> None:
    """--kv-cache-dtype fp8_*: the latent pool (or with --disable-mla every head's K/V) in 8 bits
    (the latent norm's launch does not store rows into such a pool: TokenKVPool.store converts):
    transformers float32 rounding what the pool keeps the same way is the reference, greedy tokens
    and logprobs to 1e-4, over prefill chunks and a cached prefix; plain transformers differs by
    far more, so the rounding is really there."""
    fp8 = {"fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}[kv_cache_dtype]
    model, prompts = _build(name, tmp_path)
    prompts = prompts + [prompts[3] + [5, 6, 7]]  # its prefix cached by the request before it
    plain = [_reference_greedy(model, prompt, NEW_TOKENS)[1] for prompt in prompts]
    _round_what_the_pool_keeps(model, bool(CASES[name].engine.get("disable_mla")), fp8, monkeypatch)
    with Engine(str(tmp_path), device="cpu", chunked_prefill_size=CHUNK, kv_cache_dtype=kv_cache_dtype,
                **CASES[name].engine) as engine:
        params = {"temperature": 0, "ignore_eos": True, "max_new_tokens": NEW_TOKENS}
        results = engine.generate(input_ids=prompts[:-1], sampling_params=params, return_logprob=True)
        results.append(engine.generate(input_ids=prompts[-1], sampling_params=params, return_logprob=True))
        engine.check_memory()
    assert results[-1]["meta_info"]["cached_tokens"] >= CHUNK
    gaps = []
    for prompt, result, plain_logprobs in zip(prompts, results, plain):
        tokens, logprobs = _reference_greedy(model, prompt, NEW_TOKENS)
        assert result["output_ids"] == tokens, f"prompt of {len(prompt)} tokens"
        got = [logprob for logprob, _token, _text in result["meta_info"]["output_token_logprobs"]]
        assert got == pytest.approx(logprobs, abs=1e-4), f"prompt of {len(prompt)} tokens"
        gaps += [abs(a - b) for a, b in zip(plain_logprobs, logprobs)]
    assert max(gaps) > 1e-2  # the 8-bit rounding moves the logprobs well beyond the tolerance


def _mtp_layer_tensors(config: dict) -> dict[str, torch.Tensor]:
    """Tensors of a DeepSeek-V3 multi-token-prediction layer, numbered after the decoder's layers."""
    p = f"model.layers.{config['num_hidden_layers']}."
    hidden, vocab = config["hidden_size"], config["vocab_size"]
    return {p + "embed_tokens.weight": torch.randn(vocab, hidden), p + "enorm.weight": torch.ones(hidden),
            p + "hnorm.weight": torch.ones(hidden), p + "eh_proj.weight": torch.randn(hidden, 2 * hidden),
            p + "shared_head.norm.weight": torch.ones(hidden),
            p + "shared_head.head.weight": torch.randn(vocab, hidden),
            p + "self_attn.kv_a_proj_with_mqa.weight": torch.randn(40, hidden),
            p + "mlp.experts.0.gate_proj.weight": torch.randn(16, hidden),
            p + "mlp.gate.e_score_correction_bias": torch.zeros(8)}


def test_multi_token_prediction_weights_are_skipped(tmp_path) -> None:
    """A checkpoint with an MTP layer (as DeepSeek-V3's layer 61) serves as the decoder alone."""
    model, prompts = _build("deepseek-v3-yarn", tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    mtp = _mtp_layer_tensors(config)
    save_file(mtp, str(tmp_path / "model-mtp.safetensors"), metadata={"format": "pt"})
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    index["weight_map"].update({name: "model-mtp.safetensors" for name in mtp})
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    prompt = prompts[3]
    with Engine(str(tmp_path), device="cpu", chunked_prefill_size=CHUNK) as engine:
        result = engine.generate(input_ids=prompt, sampling_params={"temperature": 0, "ignore_eos": True,
                                                                    "max_new_tokens": NEW_TOKENS})
    assert result["output_ids"] == _reference_greedy(model, prompt, NEW_TOKENS)[0]


# Options of DeepSeek's own model code that transformers does not read, set as no released config
# sets them: V2's routing is softmax by "greedy" or "group_limited_greedy", V3's sigmoid by
# "noaux_tc"; DeepSeek's code makes only every moe_layer_freq-th layer sparse.
@pytest.mark.parametrize("version, option", [
    ("V2", {"topk_method": "noaux_tc"}), ("V2", {"scoring_func": "sigmoid"}), ("V3", {"scoring_func": "softmax"}),
    ("V3", {"topk_method": "greedy"}), ("V3", {"moe_layer_freq": 2})])
def test_unread_routing_options_are_refused(version: str, option: dict) -> None:
    sizes = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_attention_heads=2, q_lora_rank=16,
                 kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, num_hidden_layers=2,
                 n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, first_k_dense_replace=0, n_group=1,
                 topk_group=1)
    config_cls, model_cls = ((transformers.DeepseekV2Config, DeepseekV2ForCausalLM) if version == "V2" else
                             (transformers.DeepseekV3Config, DeepseekV3ForCausalLM))
    model_cls(config_cls(**sizes), ModelContext())  # the released values (or none) are served
    with pytest.raises(ValueError, match=next(iter(option))):
        model_cls(config_cls(**sizes, **option), ModelContext())


@pytest.mark.parametrize("name, tp, merged", [
    ("deepseek-v2", 2, True),  # q_a_proj: replicated like kv_a_proj_with_mqa, at any tp
    ("deepseek-v3-rotate-half", 1, True),  # ... biased alike
    ("deepseek-v2-moe", 1, True),  # q_proj on one rank
    ("deepseek-v2-moe", 2, False),  # q_proj split by heads over ranks
    ("deepseek-v2-lite-yarn", 1, False)])  # kv_a_proj_with_mqa has a bias, q_proj none
def test_input_projections_merge_where_both_are_replicated(name: str, tp: int, merged: bool) -> None:
    """Merged, a layer holds one ``fused_qkv_a_proj`` whose shards are the checkpoint's query and
    latent projections (loaded from transformers' state dict), and not the two."""
    config, reference = CASES[name].make()
    torch.manual_seed(0)
    with torch.no_grad():
        for p in reference.parameters():
            p.normal_()
    ours = (DeepseekV2ForCausalLM if "v2" in name else DeepseekV3ForCausalLM)(
        config, ModelContext(tp=TPGroup(rank=0, size=tp)))
    ours.load_weights(reference.state_dict().items())
    attention, theirs = ours.model.layers[0].self_attn, reference.model.layers[0].self_attn
    query = "q_proj" if config.q_lora_rank is None else "q_a_proj"
    assert attention.merged_input == merged
    assert hasattr(attention, "fused_qkv_a_proj") == merged
    assert hasattr(attention, "kv_a_proj_with_mqa") != merged and hasattr(attention, query) != merged
    if merged:
        expected = torch.cat([getattr(theirs, query).weight, theirs.kv_a_proj_with_mqa.weight])
        assert torch.equal(attention.fused_qkv_a_proj.weight, expected)


@pytest.mark.skipif(torch.cuda.is_available(), reason="counts in Triton's interpreter, which is off where there is a GPU")
def test_moe_layer_decode_launches_none_of_the_fused_away_kernels() -> None:
    """A DeepSeek-V2-Lite-shaped MoE layer's batch-1 decode with the fused paths on: the input's
    projections, o_proj and the float32 router each one GEMV (no cast before the router), no
    ``cat`` (the cached row and the attention query are written in place), the shared experts
    inside the one fused MoE call (no SiLU-and-mul or GEMV of their own), no store into the KV
    pool of its own (the latent norm's launch writes the cached row into its slot), and the
    absorbed query's ``bmm`` and both rotaries one launch: 14 kernels."""
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "count_layer_kernels.py"
    spec = importlib.util.spec_from_file_location("count_layer_kernels", script)
    counter = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(counter)
    kernels, _, _ = counter.moe_layer_decode()
    assert len(kernels) == 14
    assert kernels.count("triton._gemv_kernel") == 3 and kernels.count("aten.bmm") == 1
    assert kernels.count("triton._gate_up_kernel") == kernels.count("triton._down_kernel") == 1
    for removed in ("aten.cat", "aten._to_copy", "aten.mm", "triton._act_and_mul_kernel", "aten.index_put_",
                    "triton._store_kv_kernel", "triton._rope_kernel"):
        assert removed not in kernels
    # The fused launches' results (float32: the interpreter's bfloat16 dot is not CUDA's): the
    # cached row the latent norm stored, and the attention's output over the query the one
    # absorbed-query launch built, as the PyTorch paths storing through the pool (the torch-native
    # backend's store) give them.
    _, cached_row, attended = counter.moe_layer_decode(dtype=torch.float32)
    _, stored_by_the_pool, expected = counter.moe_layer_decode(fused=False, backend=TorchNativeBackend,
                                                               dtype=torch.float32)
    assert stored_by_the_pool.abs().sum() > 0 and expected.abs().sum() > 0
    torch.testing.assert_close(cached_row, stored_by_the_pool, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(attended, expected, atol=1e-6, rtol=1e-5)

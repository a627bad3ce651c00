"""Greedy outputs token-for-token equal to Hugging Face transformers (float32, CPU)."""

from __future__ import annotations

import asyncio
import random

import pytest
import torch
from transformers import AutoModelForCausalLM

from reference import hf_causal_lm, hf_greedy
from sglang_core.engine import Engine

GREEDY = {"temperature": 0, "ignore_eos": True}


def _prompts(seed: int, lengths: list[int], vocab: int, shared_prefix: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    prefix = [rng.randrange(3, vocab) for _ in range(shared_prefix)]
    return [prefix + [rng.randrange(3, vocab) for _ in range(n)] for n in lengths]


async def _staggered(engine: Engine, prompts: list[list[int]], max_new: list[int], gap: float) -> list[dict]:
    """Submit requests ``gap`` seconds apart so they join a batch that is already running."""

    async def one(i: int) -> dict:
        await asyncio.sleep(gap * i)
        return await engine.async_generate(input_ids=prompts[i], sampling_params={**GREEDY, "max_new_tokens": max_new[i]})

    return await asyncio.gather(*(one(i) for i in range(len(prompts))))


def _check_against_hf(model_folder, prompts, max_new, gap: float = 0.02, **settings) -> Engine:
    hf = hf_causal_lm(model_folder)
    expected = [hf_greedy(hf, p, n) for p, n in zip(prompts, max_new)]
    engine = Engine(str(model_folder), **settings)
    try:
        results = asyncio.run(_staggered(engine, prompts, max_new, gap))
        for i, (res, exp) in enumerate(zip(results, expected)):
            assert res["output_ids"] == exp, f"request {i} (prompt {len(prompts[i])} tokens) differs from HF"
            assert res["meta_info"]["completion_tokens"] == len(exp)
        engine.check_memory()
    except BaseException:
        engine.shutdown()
        raise
    return engine


@pytest.mark.parametrize("settings", [
    {},
    {"chunked_prefill_size": 8},
    {"disable_radix_cache": True, "chunked_prefill_size": 8},
    {"schedule_policy": "fcfs"},
    {"enable_mixed_chunk": True, "chunked_prefill_size": 8},
    {"max_step_tokens": 12},
    {"max_step_tokens": 3},
    {"target_step_ms": 0.001, "max_step_tokens": 40},
    {"target_step_ratio": 1.5, "max_step_tokens": 40},
    {"max_queue_prefill_ms": 0.001, "max_step_tokens": 12, "chunked_prefill_size": 24},
], ids=["default", "chunked", "chunked-nocache", "fcfs", "mixed", "step-budget", "step-budget-tiny",
        "step-target", "step-ratio", "step-queue"])
def test_tiny_llama_matches_hf(tiny_llama, settings):
    prompts = _prompts(1, [5, 37, 12, 64, 3, 21], 259, shared_prefix=9)
    max_new = [20, 7, 33, 12, 25, 16]
    # Mixed steps need a decode running while another prompt is chunked. Staggered arrivals
    # only give that when the machine keeps pace with the gap (a slow CI step let each request
    # finish alone), so that case sends all at once: 196 prompt tokens in chunks of 8 while the
    # first finished ones decode, whatever the speed.
    # A step token budget (fixed, or from a target far below any step's time: the floor of
    # MIN_STEP_TOKENS) chunks the prompts itself and makes every prefill step a mixed one; a
    # queue target far below any step's time grows steps past the budget to the chunk size.
    mixed = settings.get("enable_mixed_chunk") or settings.get("max_step_tokens")
    gap = 0.0 if mixed else 0.02
    engine = _check_against_hf(tiny_llama, prompts, max_new, gap=gap, **settings)
    try:
        if mixed:  # decodes really rode along with prefill chunks
            assert engine.stats()["mixed_decode_tokens"] > 0
    finally:
        engine.shutdown()


@pytest.mark.parametrize("schedule", [{}, {"enable_mixed_chunk": True}, {"max_step_tokens": 16}],
                         ids=["plain", "mixed", "step-budget"])
def test_tiny_llama_under_retraction(tiny_llama, schedule: dict):
    """A KV pool too small for every running request forces retraction; outputs stay exact."""
    prompts = _prompts(2, [20, 24, 18, 30, 22, 26], 259)
    max_new = [40] * 6
    engine = _check_against_hf(tiny_llama, prompts, max_new, gap=0.0, max_total_tokens=160, new_token_ratio=0.0,
                               chunked_prefill_size=64, **schedule)
    try:
        assert engine.stats()["retractions"] > 0, "the tiny pool should have forced a retraction"
    finally:
        engine.shutdown()


def test_tiny_mistral_sliding_window(tmp_path):
    from transformers import MistralConfig, MistralForCausalLM

    from reference import save_tiny_model

    config = MistralConfig(vocab_size=259, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=256,
                           sliding_window=8, eos_token_id=2, bos_token_id=1)
    folder = save_tiny_model(tmp_path, config, MistralForCausalLM)
    prompts = _prompts(3, [6, 19, 30], 259)
    engine = _check_against_hf(folder, prompts, [14, 10, 6], chunked_prefill_size=8)
    engine.shutdown()


def test_prefix_cache_reports_cached_tokens(tiny_llama):
    prompts = _prompts(4, [10, 12], 259, shared_prefix=48)
    with Engine(str(tiny_llama)) as engine:
        first = engine.generate(input_ids=prompts[0], sampling_params={**GREEDY, "max_new_tokens": 4})
        second = engine.generate(input_ids=prompts[1], sampling_params={**GREEDY, "max_new_tokens": 4})
        assert first["meta_info"]["cached_tokens"] == 0
        assert second["meta_info"]["cached_tokens"] == 48
    with Engine(str(tiny_llama), disable_radix_cache=True) as engine:
        engine.generate(input_ids=prompts[0], sampling_params={**GREEDY, "max_new_tokens": 4})
        again = engine.generate(input_ids=prompts[1], sampling_params={**GREEDY, "max_new_tokens": 4})
        assert again["meta_info"]["cached_tokens"] == 0


def test_running_requests_prompt_is_shared_while_it_decodes(tiny_llama):
    """A prompt enters the radix tree once prefilled, not when its request ends: a request that
    arrives while the first still decodes reuses the shared part. Outputs stay HF's, and all
    memory comes back."""
    prompts = _prompts(6, [7, 9, 11], 259, shared_prefix=40)
    max_new = [900, 5, 5]
    hf = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    with Engine(str(tiny_llama)) as engine:

        async def staggered() -> list[dict]:
            first = asyncio.ensure_future(engine.async_generate(
                input_ids=prompts[0], sampling_params={**GREEDY, "max_new_tokens": max_new[0]}))
            await asyncio.sleep(0.1)  # the first is decoding now
            rest = [await engine.async_generate(input_ids=p, sampling_params={**GREEDY, "max_new_tokens": n})
                    for p, n in zip(prompts[1:], max_new[1:])]
            assert not first.done(), "the first request should still be decoding"
            return [await first, *rest]

        results = asyncio.run(staggered())
        engine.check_memory()
    assert results[0]["meta_info"]["cached_tokens"] == 0
    assert results[1]["meta_info"]["cached_tokens"] == 40
    for res, p, n in zip(results, prompts, max_new):
        assert res["output_ids"] == hf_greedy(hf, p, n)


@pytest.mark.parametrize("chunked_prefill_size", [2048, 16])
def test_requests_sharing_a_prompt_prefix_compute_it_once(tiny_llama, chunked_prefill_size: int):
    """Arriving together, requests that share a 40-token prefix are not prefilled side by side:
    all but the first wait a step and take the prefix from the cache (also when the first's
    prompt is prefilled in chunks). Outputs equal HF's; memory comes back whole."""
    prompts = _prompts(7, [5, 8, 3, 6], 259, shared_prefix=40)
    hf = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    with Engine(str(tiny_llama), chunked_prefill_size=chunked_prefill_size) as engine:
        outs = engine.generate(input_ids=prompts, sampling_params={**GREEDY, "max_new_tokens": 6})
        engine.check_memory()
    assert sorted(o["meta_info"]["cached_tokens"] for o in outs) == [0, 40, 40, 40]
    for out, prompt in zip(outs, prompts):
        assert out["output_ids"] == hf_greedy(hf, prompt, 6)


def test_cascade_decode_groups_requests_sharing_a_cached_prefix(tiny_llama):
    """With --enable-cascade-decode the scheduler hands decode steps the groups of requests that
    share a cached prefix (the Triton backend reads it once per group; this CPU backend ignores
    the groups): outputs stay HF's and the groups were formed."""
    prompts = _prompts(8, [5, 8, 3, 6, 4], 259, shared_prefix=40)
    hf = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    with Engine(str(tiny_llama), enable_cascade_decode=True) as engine:
        outs = engine.generate(input_ids=prompts, sampling_params={**GREEDY, "max_new_tokens": 8})
        assert engine.stats()["cascade_decode_rows"] > 0
        engine.check_memory()
    for out, prompt in zip(outs, prompts):
        assert out["output_ids"] == hf_greedy(hf, prompt, 8)


def test_logprobs_match_hf(tiny_llama):
    prompt = _prompts(5, [30], 259)[0]
    hf = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    with Engine(str(tiny_llama), chunked_prefill_size=8) as engine:
        res = engine.generate(input_ids=prompt, sampling_params={**GREEDY, "max_new_tokens": 5}, return_logprob=True,
                              logprob_start_len=3, top_logprobs_num=3)
    full = prompt + res["output_ids"]
    with torch.no_grad():
        logp = torch.log_softmax(hf(torch.tensor([full])).logits[0].float(), -1)
    meta = res["meta_info"]
    inputs = meta["input_token_logprobs"]
    assert [t for _, t, _ in inputs] == prompt[3:]
    for i, (lp, tok, _) in enumerate(inputs):
        assert lp == pytest.approx(logp[3 + i - 1, tok].item(), abs=1e-4)
    for i, (lp, tok, _) in enumerate(meta["output_token_logprobs"]):
        pos = len(prompt) + i - 1
        assert lp == pytest.approx(logp[pos, tok].item(), abs=1e-4)
        top = meta["output_top_logprobs"][i]
        ref = torch.topk(logp[pos], 3)
        assert [t for _, t, _ in top] == ref.indices.tolist()
    assert meta["normalized_prompt_logprob"] == pytest.approx(sum(lp for lp, _, _ in inputs) / len(inputs))


@pytest.mark.slow
def test_smollm2_matches_hf(default_model_folder):
    """The embedded default model, with chunked prefill and a shared prefix."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(default_model_folder)
    texts = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village by the sea,"]
    prompts = [tok(t)["input_ids"] for t in texts]
    engine = _check_against_hf(default_model_folder, prompts, [12, 12, 12], chunked_prefill_size=8)
    engine.shutdown()


ON_GPU = pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(),
                                                                         reason="needs a CUDA GPU")])
# cuda: the Triton backend with CUDA graphs, its K/V written by the fused store kernel
DEVICE_SETTINGS = {"cpu": {}, "cuda": {"device": "cuda", "dtype": "float32", "attention_backend": "triton",
                                       "cuda_graph_max_bs": 16}}


@pytest.mark.parametrize("device", ["cpu", ON_GPU])
@pytest.mark.parametrize("kv_cache_dtype", ["fp8_e4m3", "fp8_e5m2"])
def test_fp8_kv_cache_matches_hf_with_the_same_rounding(tiny_llama, kv_cache_dtype, device, monkeypatch):
    """--kv-cache-dtype fp8_*: HF float32 (on the CPU) with its keys (after RoPE) and values
    rounded to the same 8-bit type is the reference: equal greedy tokens and logprobs (to 1e-4 on
    the CPU, 1e-3 from the GPU), where plain HF differs by far more, so the rounding is really
    there; prefix-cached and chunked requests included. The pool holds 4x the tokens of a
    float32 pool in the same memory."""
    from transformers.models.llama import modeling_llama

    fp8 = {"fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}[kv_cache_dtype]

    def stored(x: torch.Tensor) -> torch.Tensor:
        return x.to(fp8).to(x.dtype)

    def teacher_forced(model, prompt: list[int], out: list[int]) -> torch.Tensor:
        with torch.no_grad():
            logits = model(torch.tensor([prompt + out])).logits[0, len(prompt) - 1:-1]
        return torch.log_softmax(logits.double(), -1)[torch.arange(len(out)), torch.tensor(out)]

    plain = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    rope = modeling_llama.apply_rotary_pos_emb

    def rope_then_store(q, k, *args, **kwargs):
        q, k = rope(q, k, *args, **kwargs)
        return q, stored(k)

    monkeypatch.setattr(modeling_llama, "apply_rotary_pos_emb", rope_then_store)
    hf = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    for layer in hf.model.layers:
        layer.self_attn.v_proj.register_forward_hook(lambda module, args, out: stored(out))

    prompts = _prompts(7, [5, 37, 12, 64, 3, 21], 259, shared_prefix=9)
    max_new = [20, 7, 33, 12, 25, 16]
    expected = [hf_greedy(hf, p, n) for p, n in zip(prompts, max_new)]
    settings = {"kv_cache_memory_gb": 0.001, "max_running_requests": 64, **DEVICE_SETTINGS[device]}
    with Engine(str(tiny_llama), kv_cache_dtype=kv_cache_dtype, chunked_prefill_size=16, **settings) as engine:
        params = [{**GREEDY, "max_new_tokens": n} for n in max_new]
        results = engine.generate(input_ids=prompts, sampling_params=params, return_logprob=True)
        fp8_pool = engine.memory_report()["kv_pool_size"]
        engine.check_memory()
    with Engine(str(tiny_llama), **settings) as engine:
        float32_pool = engine.memory_report()["kv_pool_size"]
    assert fp8_pool == 4 * float32_pool
    gaps = []
    for prompt, res, exp in zip(prompts, results, expected):
        assert res["output_ids"] == exp
        ours = torch.tensor([x[0] for x in res["meta_info"]["output_token_logprobs"]], dtype=torch.float64)
        reference = teacher_forced(hf, prompt, exp)
        torch.testing.assert_close(ours, reference, atol=1e-4 if device == "cpu" else 1e-3, rtol=0)
        gaps.append((teacher_forced(plain, prompt, exp) - reference).abs().max().item())
    assert max(gaps) > 1e-2  # the 8-bit rounding moves the logprobs well beyond the tolerance

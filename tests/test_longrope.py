"""Phi-3's LongRoPE served past ``original_max_position_embeddings``: each token takes its
factors by its sequence's length when it is processed (short within the original length, long
beyond; a prompt by its whole length, also in chunks), not one set for the whole served context
nor one per batch.

The reference is transformers' own ``generate`` (float32, one prompt at a time) wherever it keeps
its KV cache: for sequences that stay within the original length and prompts longer than it.
For a sequence that crosses the original length while decoding, Phi-3's ``generate`` drops its
cache at the crossing and recomputes every token with the long factors; the engine keeps the
cached K turned by the short factors (``LongRopeRotaryEmbedding``), which is transformers'
forward stepped with its cache kept: that is the reference for those, and for the prefix-cache
caveat.
"""

from __future__ import annotations

import inspect
import random

import pytest
import torch
from transformers import DynamicCache, Phi3Config, Phi3ForCausalLM

from model_contract import tiny
from sglang_core.engine import Engine
from test_model_contract import _randomize, _save

ORIGINAL = 32
NEW_TOKENS = 12
CHUNK = 16
GREEDY = {"temperature": 0, "ignore_eos": True, "max_new_tokens": NEW_TOKENS}
# Prompts that generate keeps its cache for: within the original length to the end (21: the last
# step's sequence is exactly the original length); just past it; past it in three prefill chunks.
CACHED_LENGTHS = (10, 21, ORIGINAL + 1, 45)
# Prompts crossing it while decoding: at the 7th step; exactly the original (the first decode step).
CROSSING_LENGTHS = (26, ORIGINAL)


def _config() -> Phi3Config:
    # Rotary on 12 of 16 dims: 6 factors each; served context (512) far past the original 32.
    return Phi3Config(**tiny(original_max_position_embeddings=ORIGINAL, partial_rotary_factor=0.75,
                             rope_scaling={"type": "longrope", "short_factor": [1.0, 1.2, 1.5, 2.0, 3.0, 4.0],
                                           "long_factor": [2.0, 4.0, 7.0, 11.0, 18.0, 30.0]}))


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    folder = tmp_path_factory.mktemp("phi3-longrope-per-token")
    config = _config()
    model = Phi3ForCausalLM(config).float().eval()
    _randomize(model, seed=15)
    _save(folder, config, model)
    model.generation_config.eos_token_id = None  # as ignore_eos: always NEW_TOKENS tokens
    rng = random.Random(15)
    prompts = [[rng.randrange(3, config.vocab_size) for _ in range(n)] for n in CACHED_LENGTHS + CROSSING_LENGTHS]
    engine = Engine(str(folder), chunked_prefill_size=CHUNK)
    yield model, engine, prompts, folder
    engine.shutdown()


def _hf_generate(model, prompt: list[int]) -> tuple[list[int], list[float]]:
    """transformers' greedy ``generate`` and each token's logprob."""
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=NEW_TOKENS, do_sample=False,
                             output_scores=True, return_dict_in_generate=True)
    tokens = out.sequences[0, len(prompt):].tolist()
    return tokens, [torch.log_softmax(score[0].float(), -1)[t].item() for score, t in zip(out.scores, tokens)]


def _hf_stepped(model, prompt: list[int], cached: int = 0) -> tuple[list[int], list[float]]:
    """Greedy decoding by transformers' forward with one KV cache kept throughout (each pass picks
    the factors by its own last position + 1): the prompt's first ``cached`` tokens in a pass of
    their own (a cached prefix), the rest in one, then one token per pass."""
    cache = DynamicCache(config=model.config)
    # transformers 5.25 names the argument ``cache``; earlier versions ``past_key_values`` (and
    # would swallow ``cache`` silently, running every pass without the cache).
    cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    tokens, logprobs = [], []
    with torch.no_grad():
        for piece in ([prompt[:cached]] if cached else []) + [prompt[cached:]]:
            logits = model(torch.tensor([piece]), **{cache_arg: cache}, use_cache=True).logits
        for _ in range(NEW_TOKENS):
            last = logits[0, -1].float()
            tokens.append(int(last.argmax()))
            logprobs.append(torch.log_softmax(last, -1)[tokens[-1]].item())
            logits = model(torch.tensor([tokens[-1:]]), **{cache_arg: cache}, use_cache=True).logits
    return tokens, logprobs


def _engine_logprobs(result: dict) -> list[float]:
    return [logprob for logprob, _token, _text in result["meta_info"]["output_token_logprobs"]]


def _assert_matches(result: dict, reference: tuple[list[int], list[float]], what: str) -> None:
    tokens, logprobs = reference
    assert result["output_ids"] == tokens, what
    assert _engine_logprobs(result) == pytest.approx(logprobs, abs=1e-4), what


def _reference(model, prompt: list[int]) -> tuple[list[int], list[float]]:
    return _hf_stepped(model, prompt) if len(prompt) in CROSSING_LENGTHS else _hf_generate(model, prompt)


def test_each_token_takes_the_factors_of_its_sequence_length(served):
    """All prompts in one batch: short and long tokens share prefill and decode steps."""
    model, engine, prompts, _folder = served
    results = engine.generate(input_ids=prompts, sampling_params=GREEDY, return_logprob=True)
    for prompt, result in zip(prompts, results):
        _assert_matches(result, _reference(model, prompt), f"prompt of {len(prompt)} tokens")
    engine.check_memory()


def test_overlapped_decode_chooses_alike(served):
    """The overlapped schedule (CUDA graphs' on a GPU, switched on here as tests/test_overlap.py
    does) launches a decode step before its input token is on the host. Tokens only: a request
    that wants logprobs is never overlapped."""
    model, _engine, prompts, folder = served
    with Engine(str(folder), chunked_prefill_size=CHUNK) as engine:
        engine.core.core.scheduler.overlap_max_bs = 64
        results = engine.generate(input_ids=prompts, sampling_params=GREEDY)
        assert engine.stats()["overlapped_steps"] > 0
        engine.check_memory()
    for prompt, result in zip(prompts, results):
        assert result["output_ids"] == _reference(model, prompt)[0], f"prompt of {len(prompt)} tokens"


@pytest.mark.parametrize("base", [0, 3], ids=["short-prefix", "long-prefix"])
def test_cached_prefix_on_the_same_side_matches_generate(served, base: int):
    """A prompt extending one served before, on the same side of the original length, reuses its
    cached K (turned by the same factors) and matches ``generate`` from scratch."""
    model, engine, prompts, _folder = served
    engine.generate(input_ids=prompts[base], sampling_params=GREEDY)
    prompt = prompts[base] + [5, 6, 7, 8]
    result = engine.generate(input_ids=prompt, sampling_params=GREEDY, return_logprob=True)
    assert result["meta_info"]["cached_tokens"] >= len(prompts[base]) - 1
    _assert_matches(result, _hf_generate(model, prompt), "cached prefix")
    engine.check_memory()


def test_cached_short_prefix_of_a_long_prompt_keeps_its_short_factors(served):
    """The prefix-cache caveat: a long prompt extending a cached short one reads the prefix's K as
    the short prompt turned it, i.e. transformers' forward continuing from the prefix's own cache."""
    model, engine, prompts, _folder = served
    prefix = prompts[4]  # 26 tokens: short
    engine.generate(input_ids=prefix, sampling_params={**GREEDY, "max_new_tokens": 1})
    prompt = prefix + prompts[3][:20]  # 46 tokens: long
    result = engine.generate(input_ids=prompt, sampling_params=GREEDY, return_logprob=True)
    cached = result["meta_info"]["cached_tokens"]
    assert CHUNK <= cached <= len(prefix)
    _assert_matches(result, _hf_stepped(model, prompt, cached), "short cached prefix, long prompt")
    engine.check_memory()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_cuda_graphs_choose_per_token(served):
    """On a GPU in float32: the fused rotary kernel and captured decode graphs make the same choice."""
    model, _engine, prompts, folder = served
    with Engine(str(folder), device="cuda", dtype="float32", attention_backend="triton",
                chunked_prefill_size=CHUNK, cuda_graph_max_bs=8) as engine:
        results = engine.generate(input_ids=prompts, sampling_params=GREEDY)
        engine.check_memory()
    for prompt, result in zip(prompts, results):
        assert result["output_ids"] == _reference(model, prompt)[0], f"prompt of {len(prompt)} tokens"

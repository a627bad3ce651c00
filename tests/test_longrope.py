"""Phi-3's LongRoPE served past ``original_max_position_embeddings``, token for token as
transformers' ``generate`` (float32, one prompt at a time) serves it: short factors for a sequence
within the original length, long factors past it, for every token of the sequence. A sequence
that crosses the original length while decoding has its cache dropped by ``generate`` and every
token turned again by the long factors: the engine prefills it again (its output kept), and its
prefix cache keeps short- and long-factor tokens apart (``scheduler/length_regimes.py``), so
what a request reuses never depends on which requests came before it. Prompts are prefilled in
chunks and batched with others throughout.
"""

from __future__ import annotations

import random

import pytest
import torch
from transformers import Phi3Config, Phi3ForCausalLM

from model_contract import tiny
from sglang_core.engine import Engine
from test_model_contract import _randomize, _save

ORIGINAL = 32
NEW_TOKENS = 12
CHUNK = 16
GREEDY = {"temperature": 0, "ignore_eos": True, "max_new_tokens": NEW_TOKENS}
# Prompts that stay on one side: within the original length to the end (21: the last step's
# sequence is exactly the original length); just past it; past it in three prefill chunks.
ONE_SIDED_LENGTHS = (10, 21, ORIGINAL + 1, 45)
# Prompts crossing it while decoding: at the 7th step; exactly the original (the first decode step).
CROSSING_LENGTHS = (26, ORIGINAL)


def _config() -> Phi3Config:
    # Rotary on 12 of 16 dims: 6 factors each; served context (512) far past the original 32.
    return Phi3Config(**tiny(original_max_position_embeddings=ORIGINAL, partial_rotary_factor=0.75,
                             rope_scaling={"type": "longrope", "short_factor": [1.0, 1.2, 1.5, 2.0, 3.0, 4.0],
                                           "long_factor": [2.0, 4.0, 7.0, 11.0, 18.0, 30.0]}))


def _prompts(seed: int, lengths: tuple[int, ...], vocab_size: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab_size) for _ in range(n)] for n in lengths]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    folder = tmp_path_factory.mktemp("phi3-longrope")
    config = _config()
    model = Phi3ForCausalLM(config).float().eval()
    _randomize(model, seed=15)
    _save(folder, config, model)
    model.generation_config.eos_token_id = None  # as ignore_eos: always NEW_TOKENS tokens
    prompts = _prompts(15, ONE_SIDED_LENGTHS + CROSSING_LENGTHS, config.vocab_size)
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


def _assert_matches(model, prompts: list[list[int]], results: list[dict]) -> None:
    for prompt, result in zip(prompts, results):
        tokens, logprobs = _hf_generate(model, prompt)
        what = f"prompt of {len(prompt)} tokens"
        assert result["output_ids"] == tokens, what
        engine_logprobs = [logprob for logprob, _token, _text in result["meta_info"]["output_token_logprobs"]]
        assert engine_logprobs == pytest.approx(logprobs, abs=1e-4), what


def test_each_sequence_takes_the_factors_of_its_length(served):
    """All prompts in one batch: short and long tokens share prefill and decode steps, and the
    crossing requests are prefilled again in the steps of the others."""
    model, engine, prompts, _folder = served
    results = engine.generate(input_ids=prompts, sampling_params=GREEDY, return_logprob=True)
    _assert_matches(model, prompts, results)
    engine.check_memory()


# Other schedules, each with the statistic that shows it ran: the overlapped one (CUDA graphs' on
# a GPU, switched on here as tests/test_overlap.py does) launches a decode step before its input
# token is on the host, not one that crosses; mixed steps decode riding along prefill steps; a
# step token budget with a KV pool too small for the batch retracts for memory too.
SCHEDULES = {"overlapped": ({}, "overlapped_steps"),
             "mixed": ({"enable_mixed_chunk": True}, "mixed_decode_tokens"),
             "budget-small-pool": ({"max_step_tokens": 24, "max_total_tokens": 160}, "retractions")}


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_other_schedules_choose_alike(served, schedule: str):
    """Tokens only under the overlapped schedule: a request that wants logprobs is never overlapped."""
    model, _engine, prompts, folder = served
    settings, statistic = SCHEDULES[schedule]
    overlapped = schedule == "overlapped"
    with Engine(str(folder), chunked_prefill_size=CHUNK, **settings) as engine:
        if overlapped:
            engine.core.core.scheduler.overlap_max_bs = 64
        results = engine.generate(input_ids=prompts, sampling_params=GREEDY, return_logprob=not overlapped)
        assert engine.stats()[statistic] > 0
        engine.check_memory()
    if overlapped:
        for prompt, result in zip(prompts, results):
            assert result["output_ids"] == _hf_generate(model, prompt)[0], f"prompt of {len(prompt)} tokens"
    else:
        _assert_matches(model, prompts, results)


@pytest.mark.parametrize("base", [4, 3], ids=["short-prefix-crossing", "long-prefix"])
def test_cached_prefix_on_the_same_side_is_reused(served, base: int):
    """A prompt extending one served before (its prompt and output, which the engine cached up to
    the crossing or to the end) on the same side of the original length reuses its cached K; a
    short one that then crosses is prefilled again without its short-factor K."""
    model, engine, prompts, _folder = served
    first = engine.generate(input_ids=prompts[base], sampling_params=GREEDY)
    prompt = prompts[base] + first["output_ids"][:4]
    result = engine.generate(input_ids=prompt, sampling_params=GREEDY, return_logprob=True)
    assert result["meta_info"]["cached_tokens"] == len(prompt) - 1  # the last token is always computed
    _assert_matches(model, [prompt], [result])
    engine.check_memory()


@pytest.mark.parametrize("first", ["short", "long"])
def test_cached_prefix_on_the_other_side_is_not_reused(served, first: str):
    """A long prompt extending a short one served before, or short prompts cut from a long one
    (one of them crossing later, when the long one's K is its to reuse), batched with others:
    nothing of the other side is reused, and each matches ``generate`` from scratch."""
    model, engine, _prompts_, _folder = served
    short, long, other_short, other_long = _prompts(16 if first == "short" else 17, (26, 46, 18, 40),
                                                    model.config.vocab_size)
    long[:len(short)] = short
    cached, reusing = ([short], [long]) if first == "short" else ([long], [long[:20], short])
    engine.generate(input_ids=cached, sampling_params={**GREEDY, "max_new_tokens": 1})
    batch = reusing + [other_short, other_long]
    results = engine.generate(input_ids=batch, sampling_params=GREEDY, return_logprob=True)
    assert [r["meta_info"]["cached_tokens"] for r in results[: len(reusing)]] == [0] * len(reusing)
    _assert_matches(model, batch, results)
    engine.check_memory()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_cuda_graphs_choose_alike(served):
    """On a GPU in float32: the fused rotary kernel and captured decode graphs make the same choice."""
    model, _engine, prompts, folder = served
    with Engine(str(folder), device="cuda", dtype="float32", attention_backend="triton",
                chunked_prefill_size=CHUNK, cuda_graph_max_bs=8) as engine:
        results = engine.generate(input_ids=prompts, sampling_params=GREEDY)
        engine.check_memory()
    for prompt, result in zip(prompts, results):
        assert result["output_ids"] == _hf_generate(model, prompt)[0], f"prompt of {len(prompt)} tokens"

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
from transformers import AutoTokenizer, Phi3Config, Phi3ForCausalLM

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
# Prompt logprobs from this position on, and the likeliest tokens of each step.
LOGPROB_START, TOP_LOGPROBS = 5, 3


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


def _hf_generate(model, prompt: list[int], max_new_tokens: int = NEW_TOKENS,
                 **generate_kwargs) -> tuple[list[int], list[torch.Tensor]]:
    """transformers' greedy ``generate``: its tokens and each step's logprobs over the vocabulary."""
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=max_new_tokens, do_sample=False,
                             output_scores=True, return_dict_in_generate=True, **generate_kwargs)
    return out.sequences[0, len(prompt):].tolist(), [torch.log_softmax(score[0].float(), -1) for score in out.scores]


def _assert_matches(model, prompts: list[list[int]], results: list[dict], top: int = 0) -> None:
    """Tokens and their logprobs as ``generate``'s, and with ``top`` the ids of each step's
    ``top`` likeliest tokens."""
    for prompt, result in zip(prompts, results):
        tokens, steps = _hf_generate(model, prompt)
        what = f"prompt of {len(prompt)} tokens"
        assert result["output_ids"] == tokens, what
        engine_logprobs = [logprob for logprob, _token, _text in result["meta_info"]["output_token_logprobs"]]
        assert engine_logprobs == pytest.approx([step[t].item() for step, t in zip(steps, tokens)], abs=1e-4), what
        if top:
            engine_top = [{token for _logprob, token, _text in step}
                          for step in result["meta_info"]["output_top_logprobs"]]
            assert engine_top == [set(step.topk(top).indices.tolist()) for step in steps], what


def _assert_prompt_logprobs(model, prompt: list[int], result: dict, start: int) -> None:
    """The prompt's logprobs from position ``start`` (each token's given those before it) as one
    forward pass over the prompt gives them: once each, none added by a prefill again."""
    with torch.no_grad():
        logprobs = torch.log_softmax(model(torch.tensor([prompt])).logits[0].float(), -1)
    expected = [logprobs[i - 1, prompt[i]].item() for i in range(start, len(prompt))]
    engine_logprobs = [logprob for logprob, _token, _text in result["meta_info"]["input_token_logprobs"]]
    assert engine_logprobs == pytest.approx(expected, abs=1e-4), f"prompt of {len(prompt)} tokens"


def test_each_sequence_takes_the_factors_of_its_length(served):
    """All prompts in one batch: short and long tokens share prefill and decode steps, and the
    crossing requests are prefilled again in the steps of the others."""
    model, engine, prompts, _folder = served
    results = engine.generate(input_ids=prompts, sampling_params=GREEDY, return_logprob=True,
                              logprob_start_len=LOGPROB_START, top_logprobs_num=TOP_LOGPROBS)
    _assert_matches(model, prompts, results, TOP_LOGPROBS)
    for prompt, result in zip(prompts, results):
        _assert_prompt_logprobs(model, prompt, result, LOGPROB_START)
    engine.check_memory()


CROSSER = 26  # the crossing prompt (CROSSING_LENGTHS): its 7th token is sampled from the original length


def _crosser(prompts: list[list[int]]) -> list[int]:
    return next(p for p in prompts if len(p) == CROSSER)


@pytest.mark.parametrize("end", ["max-new-tokens-at-boundary", "max-new-tokens-past", "stop-token-at-boundary",
                                 "stop-token-past"])
def test_output_ending_at_the_crossing(served, end: str):
    """Two samples of a prompt whose output ends on the last token sampled within the original
    length, or on the first one past it (prefilled again for it)."""
    model, engine, prompts, _folder = served
    prompt = _crosser(prompts)
    last = ORIGINAL - CROSSER + (1 if end.endswith("at-boundary") else 2)  # output tokens
    if end.startswith("stop-token"):
        stop = _hf_generate(model, prompt)[0][last - 1]
        params, expected = {"stop_token_ids": [stop]}, _hf_generate(model, prompt, eos_token_id=stop)[0]
    else:
        params, expected = {"max_new_tokens": last}, _hf_generate(model, prompt, last)[0]
    results = engine.generate(input_ids=[prompt], sampling_params={**GREEDY, "ignore_eos": False, "n": 2, **params})
    assert [r["output_ids"] for r in results] == [expected] * 2
    engine.check_memory()


def test_stream_sends_each_token_once(served):
    """The crossing's prefill again sends nothing: the stream's chunks add up to the output."""
    model, engine, prompts, _folder = served
    prompt = _crosser(prompts)
    chunks = list(engine.generate(input_ids=prompt, sampling_params=GREEDY, stream=True))
    result = engine.generate(input_ids=prompt, sampling_params=GREEDY)
    assert result["output_ids"] == _hf_generate(model, prompt)[0]
    assert "".join(chunk["text"] for chunk in chunks) == result["text"]
    assert [len(chunk["output_ids"]) for chunk in chunks] == list(range(1, NEW_TOKENS + 1))
    assert chunks[-1]["output_ids"] == result["output_ids"]
    engine.check_memory()


@pytest.mark.parametrize("length", [20, CROSSER], ids=["forced-text-crossing", "free-text-crossing"])
def test_constrained_output_crossing(served, length: int):
    """A regex's grammar state outlives the prefill again (no token fed to it twice): as
    ``generate`` masked to the regex's letters, where the text the regex forces (jump-forward)
    or a free letter takes the sequence past the original length."""
    model, engine, _prompts_, folder = served
    prompt = _prompts(length, (length,), model.config.vocab_size)[0]
    tokenizer = AutoTokenizer.from_pretrained(folder)
    letters = tokenizer.convert_tokens_to_ids(list("abcdefghijklmnopqrstuvwxyz"))
    pattern = [letters] * 10 + [[tokenizer.convert_tokens_to_ids(c)] for c in "xyzw"] + [letters] * 5

    def allowed(_batch: int, ids: torch.Tensor) -> list[int]:
        return pattern[len(ids) - length]

    expected = _hf_generate(model, prompt, len(pattern), prefix_allowed_tokens_fn=allowed)[0]
    result = engine.generate(input_ids=prompt, sampling_params={"temperature": 0, "max_new_tokens": 30,
                                                                "regex": "[a-z]{10}xyzw[a-z]{5}"})
    assert result["output_ids"] == expected
    engine.check_memory()


@pytest.mark.parametrize("when", ["at-crossing", "retracted"])
def test_abort_at_the_crossing(served, monkeypatch, when: str):
    """A request aborted in the step it would cross in, or once retracted to be prefilled again,
    gives back every KV slot; the others in its batch go on as ``generate``."""
    model, engine, prompts, _folder = served
    core = engine.core.core
    scheduler, victim = core.scheduler, _crosser(prompts)
    retract, step, aborted = scheduler.admission.retract_to_recompute, core.step, []

    def retract_then_abort(running, waiting):
        targets = [r.rid for r in scheduler.regimes.crossing(running) if r.origin_input_ids == victim]
        if when == "at-crossing":
            abort(targets)
        retracted = retract(running, waiting)
        if when == "retracted":
            abort(targets)
        return retracted

    def abort(rids: list[str]) -> None:
        for rid in rids:
            aborted.extend(core.abort(rid))

    def step_then_aborts():
        """The step's outputs and those of the aborts made inside it, delivered together."""
        outputs = step() + aborted
        aborted.clear()
        return outputs

    monkeypatch.setattr(scheduler.admission, "retract_to_recompute", retract_then_abort)
    monkeypatch.setattr(core, "step", step_then_aborts)
    results = engine.generate(input_ids=prompts, sampling_params=GREEDY, return_logprob=True)
    victim_index = prompts.index(victim)
    assert results[victim_index]["meta_info"]["finish_reason"]["type"] == "abort"
    others = [i for i in range(len(prompts)) if i != victim_index]
    _assert_matches(model, [prompts[i] for i in others], [results[i] for i in others])
    engine.check_memory()


# Other schedules, each with the statistic that shows it ran: the overlapped one (CUDA graphs' on
# a GPU, switched on here as tests/test_overlap.py does) launches a decode step before its input
# token is on the host, not one that crosses; mixed steps decode riding along prefill steps; a
# step token budget with a KV pool too small for the batch retracts for memory too.
SCHEDULES = {"overlapped": ({}, "overlapped_steps"),
             "mixed": ({"enable_mixed_chunk": True}, "mixed_decode_tokens"),
             "budget-small-pool": ({"max_step_tokens": 24, "max_total_tokens": 160}, "retractions"),
             # Two tensor-parallel ranks (gloo) whose pool is too small for the batch: both ranks
             # follow rank 0's retractions, for the crossing and for memory.
             "tp2-small-pool": ({"tp_size": 2, "max_total_tokens": 160}, "retractions"),
             "no-radix-cache": ({"disable_radix_cache": True, "enable_mixed_chunk": True}, "mixed_decode_tokens")}


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

"""Tensor parallelism on the CPU (gloo, two ranks in two processes): the model-contract cases'
greedy tokens and logprobs equal transformers' float32 reference and the one-rank engine's, for
KV heads split across ranks, q/k/v biases, soft-caps, multi-head latent attention and MoE
experts split by their intermediate size (DeepSeek-V2's MoE case: both); each step's batch
reaches the other rank as tensors (``StepChannel``, checked field by field). One KV head
replicated on both ranks, and ranks dying: tests/test_tensor_parallel_ranks.py."""

from __future__ import annotations

import pytest
import torch

from model_contract import CASES
from sglang_core.engine import Engine
from sglang_core.layers.parallel import TPGroup
from sglang_core.model_executor.forward_batch import ForwardMode
from sglang_core.model_executor.runner import StepInput
from sglang_core.model_executor.step_channel import StepChannel
from test_model_contract import CHUNK, _build, _reference_greedy

NEW_TOKENS = 8
GREEDY = {"temperature": 0, "ignore_eos": True, "max_new_tokens": NEW_TOKENS}
# llama: 2 KV heads split (one KV head replicated: tests/test_tensor_parallel_ranks.py); qwen2:
# q/k/v biases; gemma2: attention and final soft-caps, windows; deepseek-v2-moe: multi-head latent
# attention (heads split, the latent replicated), then routed experts whose intermediate size is
# split (as Mixtral's would be: the same ExpertWeights) beside shared experts (a GatedMLP).
TP_CASES = ["llama", "qwen2", "gemma2", "deepseek-v2-moe"]


def _generate(engine: Engine, prompts: list[list[int]]) -> list[dict]:
    return engine.generate(input_ids=prompts, sampling_params=GREEDY, return_logprob=True, logprob_start_len=0)


def _logprobs(result: dict) -> list[float]:
    """Every prompt token's logprob but the first, then every output token's."""
    meta = result["meta_info"]
    return [lp for lp, _, _ in meta["input_token_logprobs"][1:] + meta["output_token_logprobs"]]


@pytest.fixture(scope="module", params=TP_CASES)
def served(request, tmp_path_factory):
    """(reference model, two-rank engine, prompts, the one-rank engine's results)."""
    folder = tmp_path_factory.mktemp(request.param)
    model, prompts = _build(request.param, folder)
    settings = {"device": "cpu", "chunked_prefill_size": CHUNK, **CASES[request.param].engine}
    with Engine(str(folder), **settings) as single:
        expected = _generate(single, prompts)
    engine = Engine(str(folder), tp_size=2, **settings)
    yield model, engine, prompts, expected
    (rank1,) = engine.core.core.tp_ranks.processes
    engine.shutdown()
    assert rank1.returncode == 0  # told to stop, it exited cleanly


def test_tokens_and_logprobs_match_reference_and_one_rank(served):
    model, engine, prompts, expected = served
    results = _generate(engine, prompts)
    for prompt, result, single in zip(prompts, results, expected):
        tokens, _ = _reference_greedy(model, prompt, NEW_TOKENS)
        assert result["output_ids"] == tokens == single["output_ids"], f"prompt of {len(prompt)} tokens"
        ids = prompt + tokens
        with torch.no_grad():
            out = model(torch.tensor([ids]))
        logits = getattr(out, "logits", out)[0, :-1].float()
        reference = torch.log_softmax(logits, dim=-1).gather(1, torch.tensor(ids[1:])[:, None]).squeeze(1)
        torch.testing.assert_close(torch.tensor(_logprobs(result)), reference, atol=1e-4, rtol=1e-4)
        assert _logprobs(result) == pytest.approx(_logprobs(single), abs=1e-5)
    engine.check_memory()


def test_cached_prefix_and_overlapped_decode(served):
    """A prefix from the cache (its slots reach the other rank in the step) and overlapped decode
    (input ids still on the device when sent) give the reference's tokens."""
    model, engine, prompts, _ = served
    engine.generate(input_ids=prompts[3], sampling_params={**GREEDY, "max_new_tokens": 1})  # cached now
    prompt = prompts[3] + [5, 6, 7, 8, 9]
    scheduler = engine.core.core.scheduler
    scheduler.overlap_max_bs = 64
    try:
        results = engine.generate(input_ids=[prompt, prompts[2]], sampling_params=GREEDY)
    finally:
        scheduler.overlap_max_bs = 0
    assert results[0]["meta_info"]["cached_tokens"] >= CHUNK
    assert engine.stats()["overlapped_steps"] > 0
    for ids, result in zip([prompt, prompts[2]], results):
        assert result["output_ids"] == _reference_greedy(model, ids, NEW_TOKENS)[0]
    engine.check_memory()


def test_step_channel_carries_every_field(monkeypatch):
    """What ``send`` broadcasts, ``receive`` turns back into the same step, and writes the batch's
    ``req_to_token`` rows (up to each request's length) into the receiving rank's table."""
    sent: list[torch.Tensor] = []
    monkeypatch.setattr(StepChannel, "_broadcast", lambda self, x: sent.append(x.clone()))
    leader_rows = torch.randint(1, 1000, (6, 40))
    step = StepInput(mode=ForwardMode.DECODE, input_ids=torch.tensor([11, 12, 13]), positions=[20, 7, 31],
                     out_cache_loc=torch.tensor([101, 102, 103]), req_pool_indices=[4, 1, 2], seq_lens=[21, 8, 32],
                     prefix_lens=[20, 7, 31], fill_lens=[22, 8, 32], logit_index=[0, 1, 2],
                     shared_prefixes=((5, (0, 2)), (3, (1,))),
                     input_embeds=([0, 2], torch.randn(2, 8, dtype=torch.bfloat16)))
    StepChannel(TPGroup(), leader_rows).send(step)

    replies = iter(sent)
    monkeypatch.setattr(StepChannel, "_broadcast", lambda self, x: x.copy_(next(replies)))
    follower_rows = torch.zeros(6, 40, dtype=torch.int64)
    got = StepChannel(TPGroup(), follower_rows).receive()
    assert torch.equal(got.input_ids, step.input_ids) and torch.equal(got.out_cache_loc, step.out_cache_loc)
    rows, embeds = got.input_embeds
    assert rows == step.input_embeds[0] and embeds.dtype == torch.bfloat16 and torch.equal(embeds, step.input_embeds[1])
    for field in ("mode", "positions", "req_pool_indices", "seq_lens", "prefix_lens", "fill_lens", "logit_index",
                  "shared_prefixes"):
        assert getattr(got, field) == getattr(step, field), field
    for row, length in zip(step.req_pool_indices, step.seq_lens):
        assert torch.equal(follower_rows[row, :length], leader_rows[row, :length])
        assert not follower_rows[row, length:].any()
    assert not follower_rows[[0, 3, 5]].any()

    monkeypatch.setattr(StepChannel, "_broadcast", lambda self, x: x.zero_())  # what ``stop`` sends
    assert StepChannel(TPGroup(), follower_rows).receive() is None

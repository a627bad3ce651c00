"""Tensor parallelism on the CPU (gloo, two ranks in two processes): the model-contract cases'
greedy tokens and logprobs equal transformers' float32 reference and the one-rank engine's, for
KV heads split across ranks, q/k/v biases, soft-caps, q/k norms over every head (OLMo 2),
multi-head latent attention and MoE experts split by their intermediate size (DeepSeek-V2's MoE
case: both), and Mixtral's and DeepSeek-V2's experts split by expert parallelism
(``enable_ep_moe``: half the experts whole on each rank; equal to the one-rank engine's, so to
DeepSeek-V2's two ranks without it); each step's batch reaches the other rank as tensors
(``StepChannel``, checked field by field), which keep the other rank's ``req_to_token`` equal to
rank 0's with decode payloads of the batch's size. One KV head replicated on both ranks, and
ranks dying: tests/test_tensor_parallel_ranks.py."""

from __future__ import annotations

from collections import deque

import pytest
import torch

from model_contract import CASES
from sglang_core.engine import Engine
from sglang_core.layers.attention_spec import AttentionLayerSpec
from sglang_core.layers.experts import ExpertWeights
from sglang_core.layers.parallel import TPGroup
from sglang_core.mem.kv_pool import ReqToTokenPool, TokenKVPool
from sglang_core.model_executor.forward_batch import ForwardMode
from sglang_core.model_executor.runner import StepInput
from sglang_core.model_executor.step_channel import HEADER_LEN, StepChannel
from sglang_core.request import Req
from sglang_core.sampling.params import SamplingParams
from sglang_core.scheduler.request_memory import RequestMemory
from test_model_contract import CHUNK, _build, _reference_greedy

NEW_TOKENS = 8
GREEDY = {"temperature": 0, "ignore_eos": True, "max_new_tokens": NEW_TOKENS}
# llama: 2 KV heads split (one KV head replicated: tests/test_tensor_parallel_ranks.py); qwen2:
# q/k/v biases; gemma2: attention and final soft-caps, windows; deepseek-v2-moe: multi-head latent
# attention (heads split, the latent replicated), then routed experts whose intermediate size is
# split (as Mixtral's would be: the same ExpertWeights), the shared experts stacked after them
# and split alike;
# olmo2: q/k RMSNorms over every head, their statistics all-reduced over the ranks' heads.
# deepseek-v2-lite-moe-per-head: the same with --disable-mla, every head's K/V cached, on its rank.
# "+ep": expert parallelism (4 of 8 experts whole on each rank; DeepSeek's shared experts are a
# tensor-parallel MLP instead). Each two-rank engine costs a rank's start (seconds): the one-rank engine is the
# baseline of every case.
TP_CASES = ["llama", "qwen2", "gemma2", "deepseek-v2-moe", "deepseek-v2-lite-moe-per-head", "olmo2-bias-gqa-tied",
            "mixtral+ep", "deepseek-v2-moe+ep"]


def _generate(engine: Engine, prompts: list[list[int]]) -> list[dict]:
    return engine.generate(input_ids=prompts, sampling_params=GREEDY, return_logprob=True, logprob_start_len=0)


def _logprobs(result: dict) -> list[float]:
    """Every prompt token's logprob but the first, then every output token's."""
    meta = result["meta_info"]
    return [lp for lp, _, _ in meta["input_token_logprobs"][1:] + meta["output_token_logprobs"]]


@pytest.fixture(scope="module", params=TP_CASES)
def served(request, tmp_path_factory):
    """(reference model, two-rank engine, prompts, the one-rank engine's results); with "+ep" the
    engine's experts are split by expert parallelism."""
    name, _, ep = request.param.partition("+")
    folder = tmp_path_factory.mktemp(name)
    model, prompts = _build(name, folder)
    settings = {"device": "cpu", "chunked_prefill_size": CHUNK, **CASES[name].engine}
    with Engine(str(folder), **settings) as single:
        expected = _generate(single, prompts)
    engine = Engine(str(folder), tp_size=2, enable_ep_moe=bool(ep), **settings)
    yield model, engine, prompts, expected
    (rank1,) = engine.core.core.tp_ranks.processes
    engine.shutdown()
    assert rank1.returncode == 0  # told to stop, it exited cleanly


def test_tokens_and_logprobs_match_reference_and_one_rank(served):
    model, engine, prompts, expected = served
    ep = engine.core.core.runner.settings.enable_ep_moe
    heads = model.config.num_attention_heads
    assert all(spec.num_heads == heads // 2 for spec in engine.core.core.runner.layer_specs)
    for experts in (m for m in engine.core.core.runner.model.modules() if isinstance(m, ExpertWeights)):
        routed = experts.num_experts - experts.shared_experts
        assert routed == (experts.total_experts // 2 if ep else experts.total_experts)
        # DeepSeek-V2's 2 shared experts are stacked after the routed ones unless EP or mlp_bias keeps an MLP.
        stacks = not ep and "DeepseekV2" in type(model).__name__ and not model.config.mlp_bias
        assert experts.shared_experts == (2 if stacks else 0)
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


class Sender(StepChannel):
    """Rank 0's channel, its broadcasts appended to ``wire``."""

    def __init__(self, pool: ReqToTokenPool, wire: deque):
        super().__init__(TPGroup(), pool)
        self.wire = wire

    def _broadcast(self, x: torch.Tensor) -> None:
        self.wire.append(x.clone())


class Receiver(Sender):
    """Another rank's channel, reading what ``Sender`` put on ``wire``."""

    def _broadcast(self, x: torch.Tensor) -> None:
        x.copy_(self.wire.popleft())


def test_step_channel_carries_every_field():
    """What ``send`` broadcasts, ``receive`` turns back into the same step, and writes the batch's
    ``req_to_token`` rows (up to each request's length, its rows being new) into the receiving
    rank's table."""
    wire = deque()
    leader = ReqToTokenPool(6, 40, "cpu")
    leader.req_to_token[:] = torch.randint(1, 1000, (6, 40))
    step = StepInput(mode=ForwardMode.DECODE, input_ids=torch.tensor([11, 12, 13]), positions=[20, 7, 31],
                     out_cache_loc=torch.tensor([101, 102, 103]), req_pool_indices=[4, 1, 2], seq_lens=[21, 8, 32],
                     prefix_lens=[20, 7, 31], fill_lens=[22, 8, 32], logit_index=[0, 1, 2],
                     shared_prefixes=((5, (0, 2)), (3, (1,))),
                     input_embeds=([0, 2], torch.randn(2, 8, dtype=torch.bfloat16)))
    leader.req_to_token[step.req_pool_indices, [n - 1 for n in step.seq_lens]] = step.out_cache_loc
    Sender(leader, wire).send(step)

    follower = ReqToTokenPool(6, 40, "cpu")
    got = Receiver(follower, wire).receive()
    assert torch.equal(got.input_ids, step.input_ids) and torch.equal(got.out_cache_loc, step.out_cache_loc)
    rows, embeds = got.input_embeds
    assert rows == step.input_embeds[0] and embeds.dtype == torch.bfloat16 and torch.equal(embeds, step.input_embeds[1])
    for field in ("mode", "positions", "req_pool_indices", "seq_lens", "prefix_lens", "fill_lens", "logit_index",
                  "shared_prefixes"):
        assert getattr(got, field) == getattr(step, field), field
    for row, length in zip(step.req_pool_indices, step.seq_lens):
        assert torch.equal(follower.req_to_token[row, :length], leader.req_to_token[row, :length])
        assert not follower.req_to_token[row, length:].any()
    assert not follower.req_to_token[[0, 3, 5]].any() and not wire

    wire.append(torch.zeros(HEADER_LEN, dtype=torch.int64))  # what ``stop`` sends
    assert Receiver(follower, wire).receive() is None


def test_step_channel_carries_a_prefill_steps_media_positions():
    """Two requests' [3, tokens] M-RoPE positions (a model's media positions) come back whole, the
    fields after them in place."""
    wire = deque()
    table = torch.tensor([[0, 1, 1, 1, 1, 3, 4], [0, 1, 1, 2, 2, 5, 6], [0, 1, 2, 1, 2, 7, 8]])
    step = StepInput(mode=ForwardMode.EXTEND, input_ids=[5, 9, 9, 9, 9, 6, 7], positions=table,
                     out_cache_loc=torch.arange(1, 8), req_pool_indices=[1, 0], seq_lens=[4, 3], prefix_lens=[0, 0],
                     fill_lens=[4, 3], logit_index=[3, 6])
    Sender(ReqToTokenPool(2, 8, "cpu"), wire).send(step)
    got = Receiver(ReqToTokenPool(2, 8, "cpu"), wire).receive()
    assert torch.equal(got.positions, table) and got.input_ids.tolist() == step.input_ids and not wire
    for field in ("req_pool_indices", "seq_lens", "prefix_lens", "fill_lens", "logit_index"):
        assert getattr(got, field) == getattr(step, field), field


class MirroredMemory:
    """Rank 0's ``RequestMemory`` (a radix cache) and its steps sent to a second rank's table, with
    a plain-Python model of every live request's row (its KV slots, as the memory hands them out)."""

    def __init__(self, rows: int = 5, context: int = 1200):
        layer = AttentionLayerSpec(1, 1, 1, 1, 1.0)
        self.memory = RequestMemory(ReqToTokenPool(rows, context, "cpu"), TokenKVPool(4000, [layer], torch.float32,
                                                                                      "cpu"), radix_cache=True)
        self.wire = deque()
        self.sender = Sender(self.memory.req_pool, self.wire)
        self.follower = ReqToTokenPool(rows, context, "cpu")
        self.receiver = Receiver(self.follower, self.wire)
        self.model: dict[str, list[int]] = {}
        self.payloads: list[int] = []

    def admit(self, rid: str, prompt: list[int]) -> Req:
        req = Req(rid=rid, origin_input_ids=prompt, sampling_params=SamplingParams())
        prefix, handle = self.memory.cache.match_prefix(req.key_ids[:-1])  # the last token is computed
        self.memory.cache.lock(handle)
        self.memory.admit(req, prefix, handle)
        self.model[rid] = prefix.tolist()
        return req

    def step(self, mode: ForwardMode, spans: list[tuple[Req, int, int]], slots: torch.Tensor) -> None:
        """Send one step over the requests' token ranges; check the second rank's rows."""
        self.sender.send(StepInput(
            mode=mode, input_ids=[0] * len(slots), positions=[p for _, a, b in spans for p in range(a, b)],
            out_cache_loc=slots, req_pool_indices=[r.req_pool_idx for r, _, _ in spans], seq_lens=[b for *_, b in spans],
            prefix_lens=[a for _, a, _ in spans], fill_lens=[b for *_, b in spans], logit_index=[0]))
        self.payloads.append(self.wire[1].numel())
        self.receiver.receive()
        for req, _, end in spans:
            row = req.req_pool_idx
            assert self.follower.req_to_token[row, :end].tolist() == self.model[req.rid][:end], req.rid
            assert self.memory.req_pool.req_to_token[row, :end].tolist() == self.model[req.rid][:end], req.rid

    def prefill(self, reqs: list[Req], chunk: int = 128) -> None:
        """The requests' prompts in chunks, batched; then each prompt is cached (re-pointing a
        prompt another request of the batch cached first)."""
        while any(r.kv_len < r.fill_len for r in reqs):
            spans = [(r, r.kv_len, min(r.kv_len + chunk, r.fill_len)) for r in reqs if r.kv_len < r.fill_len]
            for req, start, end in spans:
                assert self.memory.grow(req, end - start)
                self.model[req.rid] += self.memory.token_slots(req, start, end).tolist()
            self.step(ForwardMode.EXTEND, spans, torch.cat([self.memory.token_slots(*span) for span in spans]))
        for req in reqs:
            self.memory.cache_prompt(req)
            self.model[req.rid][: req.kv_len] = self.memory.cache.match_prefix(req.key_ids[: req.kv_len])[0].tolist()

    def decode(self, reqs: list[Req]) -> None:
        slots = self.memory.append_slots(reqs)
        for req, slot in zip(reqs, slots.tolist()):
            req.origin_input_ids.append(7)  # the sampled token, as the next step's input
            self.model[req.rid].append(slot)
        self.step(ForwardMode.DECODE, [(r, r.kv_len - 1, r.kv_len) for r in reqs], slots)

    def release(self, req: Req, cache: bool) -> None:
        self.memory.release(req, cache)
        del self.model[req.rid]


def test_step_channel_mirrors_rows_and_sends_decode_steps_of_the_batch_size():
    """Prefills (chunked, from a cached prefix, a prompt cached twice in one batch and re-pointed),
    decodes, a retraction and re-admission, an abort, a finish and rows reused: after each step the
    second rank's rows equal rank 0's and the model's; a decode step's payload is the same at any
    context length."""
    m = MirroredMemory()
    shared = list(range(10, 310))
    a = m.admit("a", shared + [1, 2])
    m.prefill([a])
    b, c, d = m.admit("b", shared + [3, 4, 5]), m.admit("c", [9] * 40), m.admit("d", [9] * 40)
    assert b.prefix_len == 300 and c.prefix_len == d.prefix_len == 0  # b reuses a's cached prompt
    m.prefill([b, c, d])
    assert list(m.memory.req_pool.rewritten) == [d.req_pool_idx]  # d's prompt now points at c's slots
    for _ in range(3):
        m.decode([a, b, c, d])
    resent, short = m.payloads[-3], m.payloads[-1]
    assert resent == short + 40  # d's re-pointed row, once

    m.release(b, cache=True)  # retracted
    m.release(c, cache=False)  # aborted
    m.release(a, cache=True)  # finished
    e = m.admit("e", [4] * 700)  # in rows a and c left, their old entries stale
    b = m.admit("b", b.origin_input_ids)
    f = m.admit("f", [6] * 1000)
    assert b.prefix_len == 305  # its cached prompt and output, but the last token
    m.prefill([e, b, f], chunk=512)
    for _ in range(3):
        m.decode([d, e, b, f])
    assert m.payloads[-1] == short  # four requests, contexts of 40 to 1000 tokens (300 before)

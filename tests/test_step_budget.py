"""The step token budget (``--max-step-tokens``, ``--target-step-ms``): in a step that carries
prefill the running requests' decodes come first and prefill chunks fill the rest.

The scheduler is driven one step at a time on a tiny model, each forward pass's token count
seen at the runner: no step exceeds the budget, every running request gets its token in every
step, every request finishes its full length and every KV slot comes back. The cost model is
checked against lines computed by hand. Token-exactness against HF: tests/test_engine_hf.py.
"""

from __future__ import annotations

import random
import re
import types

import pytest
from transformers import AutoTokenizer

from sglang_core.config import EngineSettings
from sglang_core.engine_core import EngineCore
from sglang_core.messages import GenerateRequest
from sglang_core.model_executor.forward_batch import ForwardMode
from sglang_core.plugins import PluginManager
from sglang_core.request import Req
from sglang_core.scheduler import scheduler as scheduler_module
from sglang_core.scheduler.step_budget import COST_WINDOW, MIN_STEP_TOKENS, StepBudget, StepCostModel

# ---- the cost model -------------------------------------------------------------------------

A, B = 2**-9, 2**-13  # seconds, seconds per token: exact in binary


def test_the_cost_line_is_the_least_squares_line_of_the_steps():
    model = StepCostModel()
    assert model.fit() is None
    model.record(100, 0.5)
    model.record(100, 0.7)
    assert model.fit() == (0.0, pytest.approx(0.006)), "steps of one size: the line through the origin"
    model.record(110, 0.5)  # sizes 100-110 span less than a quarter of their mean: still no slope
    assert model.fit() == (0.0, pytest.approx(1.7 / 310))
    # Noisy points near 0.01 + 0.001 * x. By hand: mean x 15, mean y 0.0255, Sxx 500, Sxy 0.51,
    # so slope 0.51 / 500 = 0.00102 and intercept 0.0255 - 15 * 0.00102 = 0.0102.
    model = StepCostModel()
    for x, y in ((0, 0.011), (10, 0.019), (20, 0.031), (30, 0.041)):
        model.record(x, y)
    a, b = model.fit()
    assert a == pytest.approx(0.0102) and b == pytest.approx(0.00102)
    assert model.tokens_within(0.05) == 39  # (0.05 - 0.0102) / 0.00102 = 39.02


def test_flat_or_falling_step_times_bound_nothing():
    model = StepCostModel()
    model.record(10, 0.02)
    model.record(50, 0.01)
    assert model.tokens_within(0.015) is None


def test_the_budget_follows_the_target_within_cap_and_floor():
    settings = EngineSettings(model_path="unused", max_step_tokens=256, target_step_ms=1000 * (A + 300.5 * B))
    budget = StepBudget(settings)
    assert budget.tokens() == 256, "no measurements yet: the cap"
    budget.record(200, A + B * 200)
    assert budget.tokens() == 256, "the target allows more: the cap wins"
    budget.cap = 1000
    assert budget.tokens() == 293, "one step size: proportional to its time, (A + 300.5 B) / (A / 200 + B)"
    for tokens in (40, 120):
        budget.record(tokens, A + B * tokens)
    assert budget.tokens() == 300
    for tokens in range(COST_WINDOW):  # a slower regime replaces the old steps in the window
        budget.record(tokens + 1, 0.05 + B * tokens)
    # Its fixed cost 0.05 - B is past the target: no size meets it, and a step below the knee,
    # (0.05 - B) / B = 408.6 tokens, would spend most of its time on the fixed cost.
    assert budget.tokens() == 408, "a target below a step's fixed cost: the line's knee"
    for _ in range(COST_WINDOW):  # then every step is held at the knee: one size fixes no line
        budget.record(408, 0.05 + B * 407)
    assert budget.tokens() == 408, "steps of one size keep the last knee (not the origin line's 0)"
    for tokens in range(COST_WINDOW):  # a fixed cost of 10 B: its knee, 10 tokens, is below the floor
        budget.record(tokens + 1, 11 * B + B * tokens)
    budget.target_s = 0.001 * B
    assert budget.costs.knee() == 10
    assert budget.tokens() == MIN_STEP_TOKENS, "a knee below the floor: the floor"


def test_a_fixed_budget_records_nothing():
    budget = StepBudget(EngineSettings(model_path="unused", max_step_tokens=64))
    budget.record(10, 1.0)
    budget.record(20, 3.0)
    assert budget.tokens() == 64 and not budget.costs.samples


def test_a_long_queue_grows_the_budget_to_prefill_it_within_the_queue_target():
    """Steps cost A + B * tokens, A = 16 B; the queue target T = 256 B. A budget B prefills Q
    queued tokens beside d decodes in Q / (B - d) steps of (16 + B) B each: by hand the least
    B with Q (16 + B) <= 256 (B - d)."""
    settings = EngineSettings(model_path="unused", max_step_tokens=64, chunked_prefill_size=512,
                              max_queue_prefill_ms=1000 * 256 * B)
    budget = StepBudget(settings)
    assert budget.tokens(4, 10_000) == 64, "no step measured yet: nothing to grow by"
    for tokens in (16, 64):
        budget.record(tokens, A + B * tokens)
    assert budget.tokens(4, 0) == 64, "an empty queue: the cap"
    assert budget.tokens(4, 128) == 64, "128 tokens need 24 (3072 / 128): the cap already does"
    assert budget.tokens(4, 200) == 76, "(200 * 16 + 256 * 4) / (256 - 200) = 75.4"
    assert budget.tokens(100, 200) == 515, "(200 * 16 + 256 * 100) / 56 = 514.3"
    assert budget.tokens(4, 256) == 516, "no budget clears 256 tokens in time: decodes + the chunk size"
    assert budget.tokens(200, 200) == 712, "(3200 + 51200) / 56 = 971.4, past decodes + the chunk size"
    budget.cap = 1024
    assert budget.tokens(4, 300) == 1024, "a cap past decodes + the chunk size is never lowered"


def test_the_queue_target_needs_a_step_budget():
    with pytest.raises(ValueError, match="max_queue_prefill_ms"):
        EngineSettings(model_path="unused", max_queue_prefill_ms=100)


@pytest.mark.parametrize("field", ["max_step_tokens", "target_step_ms", "target_step_ratio"])
def test_a_step_budget_needs_chunked_prefill(field):
    with pytest.raises(ValueError, match=field):
        EngineSettings(model_path="unused", chunked_prefill_size=0, **{field: 64})


def test_a_time_target_is_in_ms_or_a_ratio_not_both():
    with pytest.raises(ValueError, match="target_step_ratio"):
        EngineSettings(model_path="unused", target_step_ms=12, target_step_ratio=2)


# ---- the scheduler under the budget -----------------------------------------------------------

def make_core(model, **settings) -> tuple[EngineCore, list[tuple[ForwardMode, int]]]:
    """An engine core whose runner logs (mode, tokens) of every forward pass."""
    config = EngineSettings(model_path=str(model), device="cpu", **settings)
    core = EngineCore(config, PluginManager(config.plugins))
    steps: list[tuple[ForwardMode, int]] = []
    forward = core.runner.forward

    def logged(step):
        steps.append((step.mode, len(step.input_ids)))
        return forward(step)

    core.runner.forward = logged
    return core, steps


def add(core: EngineCore, rid: str, prompt: list[int], max_new_tokens: int) -> None:
    core.add(GenerateRequest(rid=rid, input_ids=prompt, sampling_params={
        "temperature": 0.0, "ignore_eos": True, "max_new_tokens": max_new_tokens}))


def prompt(rng: random.Random, length: int) -> list[int]:
    return [rng.randrange(3, 259) for _ in range(length)]


def run_to_the_end(core: EngineCore) -> dict[str, int]:
    """Step until idle, checking before and after each step that every running request gets
    exactly one token from it (none is starved). Returns each request's output length."""
    sched = core.scheduler
    outputs: dict[str, int] = {}
    for _ in range(2000):
        if not core.has_work():
            break
        before = {r.rid: len(r.output_ids) for r in sched.running}
        reqs = {r.rid: r for r in sched.running}
        core.step()
        for rid, count in before.items():
            assert len(reqs[rid].output_ids) == count + 1, f"{rid} got no token from this step"
        outputs |= {r.rid: len(r.output_ids) for r in reqs.values()}
        outputs |= {r.rid: len(r.output_ids) for r in sched.running}
    assert not core.has_work()
    return outputs


def check_all_memory_back(core: EngineCore) -> None:
    core.scheduler.check_memory()
    assert core.scheduler.flush_cache()
    report = core.scheduler.memory_report()
    assert report["kv_free"] == report["kv_pool_size"] and report["request_rows_free"] == report["request_rows"]


@pytest.mark.parametrize("budget", [24, 5], ids=["prefill-fills-the-rest", "decodes-fill-the-budget"])
def test_every_step_stays_within_the_budget_and_every_request_finishes(tiny_llama, budget: int):
    """Three requests decode while five prompts longer than the budget arrive. With a budget of
    24, prompts are cut into chunks sharing steps with the decodes; with 5, the decodes soon
    fill the budget and prefill waits for a request to finish, never squeezing a decode out."""
    core, steps = make_core(tiny_llama, max_step_tokens=budget)
    rng = random.Random(budget)
    lengths = {f"early{i}": 30 for i in range(3)} | {f"late{i}": rng.randint(8, 20) for i in range(5)}
    for i in range(3):
        add(core, f"early{i}", prompt(rng, 4), lengths[f"early{i}"])
    while len(core.scheduler.running) < 3:
        core.step()
    for i in range(5):
        add(core, f"late{i}", prompt(rng, rng.randint(30, 60)), lengths[f"late{i}"])
    outputs = run_to_the_end(core)
    assert outputs == lengths, "every request finishes its full length"
    assert max(tokens for _, tokens in steps) <= budget
    mixed = core.call("stats")["mixed_decode_tokens"]
    assert mixed > 0, "decodes rode along with prefill chunks"
    check_all_memory_back(core)


def test_an_abort_mid_chunk_gives_back_every_slot(tiny_llama):
    """A prompt aborted part-way through its chunks under the budget, while others decode and a
    prompt sharing its prefix waits: its slots, cached or not, all come back, and the others
    finish their full length."""
    core, _ = make_core(tiny_llama, max_step_tokens=6)
    rng = random.Random(6)
    lengths = {"early0": 20, "early1": 20, "sharer": 5}
    for rid in ("early0", "early1"):
        add(core, rid, prompt(rng, 4), lengths[rid])
    core.step()
    long_prompt = prompt(rng, 60)
    add(core, "aborted", long_prompt, 9)
    add(core, "sharer", long_prompt[:40] + prompt(rng, 5), lengths["sharer"])
    while core.scheduler.chunked is None or core.scheduler.chunked.kv_len < 12:
        core.step()
    assert core.scheduler.chunked.rid == "aborted"
    core.abort("aborted")
    outputs = run_to_the_end(core)
    assert {rid: n for rid, n in outputs.items() if rid != "aborted"} == lengths
    check_all_memory_back(core)


# Three sampled letters, 40 characters the grammar forces (one jump-forward of 40 byte tokens),
# two sampled digits.
FORCED_REGEX = "[a-z]{3}" + re.escape("-forced-by-the-grammar-forty-characters-") + "[0-9]{2}"


def run_with_jumps(model, overlap: bool = False, shrink_to: int | None = None,
                   **settings) -> tuple[dict[str, Req], list[tuple[ForwardMode, int]], int, EngineCore]:
    """Two unconstrained requests decode while two constrained ones arrive whose grammar forces
    a 40-token run. ``overlap``: decodes are launched ahead (CUDA graphs do so on a GPU).
    ``shrink_to``: once all four run, the budget drops to this, below the decodes (as a time
    target's can), so jumps wait for decode steps. Steps until idle. Returns the requests by rid,
    the forward passes, the stalls (a step running an extend that gives a running unconstrained
    request no token) and the core."""
    core, steps = make_core(model, **settings)
    sched = core.scheduler
    if overlap:
        sched.overlap_max_bs = 64
    rng = random.Random(23)
    for i in range(2):
        add(core, f"plain{i}", prompt(rng, 4), 40)
    while len(sched.running) < 2:
        core.step()
    for i in range(2):
        core.add(GenerateRequest(rid=f"forced{i}", input_ids=prompt(rng, 10), sampling_params={
            "temperature": 0.0, "max_new_tokens": 60, "regex": FORCED_REGEX}))
    reqs = {r.rid: r for r in sched.running + sched.waiting}
    stalls = 0
    for _ in range(500):
        if not core.has_work():
            break
        if shrink_to is not None and len(sched.running) == 4:
            sched.step_budget.cap = shrink_to
        before = {r.rid: len(r.output_ids) for r in sched.running if r.rid.startswith("plain")}
        passes = len(steps)
        core.step()
        if any(mode is ForwardMode.EXTEND for mode, _ in steps[passes:]):
            stalls += sum(len(reqs[rid].output_ids) == count for rid, count in before.items())
    assert not core.has_work()
    return reqs, steps, stalls, core


@pytest.mark.parametrize("budget, overlap, shrink_to", [(8, False, None), (4, False, None), (8, True, 2)],
                         ids=["room-for-chunks", "decodes-leave-two", "decodes-fill-a-shrunk-budget-overlapped"])
def test_jump_forward_tokens_count_against_the_budget(tiny_llama, budget: int, overlap: bool, shrink_to: int | None):
    """A grammar's forced run is extended in chunks that fit the budget beside the decodes, not
    in one step past it, or waits while decodes fill the budget; the outputs are token for token
    those of the run without a budget, and every KV slot comes back. The decodes get a token from
    every step that extends, as they do not without a budget (a jump's step carries no decode)."""
    unbounded, unbounded_steps, unbounded_stalls, _ = run_with_jumps(tiny_llama)
    bounded, steps, stalls, core = run_with_jumps(tiny_llama, overlap, shrink_to, max_step_tokens=budget)
    assert max(tokens for _, tokens in unbounded_steps) > 40, "without a budget a jump runs in one step"
    assert unbounded_stalls > 0
    assert max(tokens for _, tokens in steps) <= budget
    assert stalls == 0, "decodes come first"
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_llama))
    for rid, req in bounded.items():
        assert req.output_ids == unbounded[rid].output_ids, rid
        if rid.startswith("forced"):
            assert req.forced_tokens >= 40, "the grammar's literal was appended by jump-forward"
            assert re.fullmatch(FORCED_REGEX, tokenizer.decode(req.output_ids)), rid
    check_all_memory_back(core)


def make_costed_core(model, monkeypatch, **settings) -> tuple[EngineCore, list[tuple[ForwardMode, int]]]:
    """``make_core`` on a fake clock (the scheduler's ``time.perf_counter``) that each forward
    pass advances by A + B * its tokens."""
    clock = [0.0]
    monkeypatch.setattr(scheduler_module, "time", types.SimpleNamespace(perf_counter=lambda: clock[0],
                                                                          monotonic=scheduler_module.time.monotonic))
    core, steps = make_core(model, **settings)
    forward = core.runner.forward

    def costly(step):
        clock[0] += A + B * len(step.input_ids)
        return forward(step)

    core.runner.forward = costly
    return core, steps


def test_a_latency_target_becomes_a_budget_from_measured_steps(tiny_llama, monkeypatch):
    """Steps cost A + B * tokens on a fake clock; a target of A + 40.5 B allows 40 tokens a step.
    The first step fills the cap; the next is sized by that step's time alone (the line through
    the origin: (A + 40.5 B) / (A / 64 + B) = 45.2 tokens); from then on the line is exact and no
    step carrying prefill exceeds 40 tokens, though the queue would fill every step to the cap."""
    core, steps = make_costed_core(tiny_llama, monkeypatch, max_step_tokens=64, target_step_ms=1000 * (A + 40.5 * B))
    rng = random.Random(7)
    lengths = {f"r{i}": rng.randint(4, 12) for i in range(10)}
    for rid, n in lengths.items():
        add(core, rid, prompt(rng, rng.randint(30, 70)), n)
    assert run_to_the_end(core) == lengths
    budget = core.scheduler.step_budget
    assert budget.tokens() == 40
    measured = [tokens for tokens, _ in budget.costs.samples]
    extends = [tokens for mode, tokens in steps if mode is ForwardMode.EXTEND]
    assert measured == extends, "every step carrying prefill was timed"
    assert extends[:2] == [64, 45]
    assert len(extends) > 5 and max(extends[2:]) <= 40 and extends[2] == 40
    check_all_memory_back(core)


def test_a_ratio_target_follows_the_running_batchs_decode_step(tiny_llama, monkeypatch):
    """Every forward pass costs A + B * tokens on a fake clock. Three requests decode while
    prompts arrive; with --target-step-ratio R a step carrying prefill may take R times the
    median plain decode step measured so far. Replaying the logged steps gives the reference:
    each gap between two consecutive decode steps is the second one's cost, and no step carrying
    prefill holds more tokens than the exact line allows for R times their median."""
    ratio, cap = 3.0, 64  # 3 decodes: (3 (A + 3B) - A) / B = 41 tokens, between the floor and the cap
    core, steps = make_costed_core(tiny_llama, monkeypatch, max_step_tokens=cap, target_step_ratio=ratio)
    rng = random.Random(11)
    lengths = {f"early{i}": 40 for i in range(3)} | {f"late{i}": rng.randint(6, 14) for i in range(6)}
    for i in range(3):
        add(core, f"early{i}", prompt(rng, 4), lengths[f"early{i}"])
    while len(core.scheduler.running) < 3:
        core.step()
    for _ in range(4):  # a few plain decode steps measured before the prompts arrive
        core.step()
    for i in range(6):
        add(core, f"late{i}", prompt(rng, rng.randint(40, 90)), lengths[f"late{i}"])
    assert run_to_the_end(core) == lengths

    gaps: list[float] = []
    bounded = 0
    previous = None
    for mode, tokens in steps:
        if mode is ForwardMode.EXTEND and gaps:
            window = sorted(gaps[-32:])
            mid = len(window) // 2
            median = window[mid] if len(window) % 2 else (window[mid - 1] + window[mid]) / 2
            allowed = min(cap, max(MIN_STEP_TOKENS, int((ratio * median - A) / B)))
            assert tokens <= allowed, (tokens, allowed)
            bounded += allowed < cap
        if mode is ForwardMode.DECODE and previous is ForwardMode.DECODE:
            gaps.append(A + B * tokens)
        previous = mode
    assert bounded > 0, "the ratio target bound some step below the cap"
    measured = sorted(core.scheduler.step_budget.decode_times)
    assert measured == pytest.approx(sorted(gaps[-32:])), "each measured gap is exactly one decode step"
    check_all_memory_back(core)


@pytest.mark.parametrize("queue_ms, grows", [(1000 * 400 * B, True), (1e6, False)], ids=["tight", "loose"])
def test_a_queue_target_grows_steps_only_while_the_queue_is_long(tiny_llama, monkeypatch, queue_ms, grows):
    """Ten prompts (~500 tokens) arrive at once under a 16-token budget, steps costing A + B *
    tokens on a fake clock. With a queue target of 400 B (A = 16 B) no budget prefills the whole
    queue in time, so steps grow to the decodes plus the 48-token chunk size, past the cap;
    once the queue is short they are bounded again: a prompt arriving alone into an idle queue
    is chunked at the cap. With a loose target no step passes the cap. Every request finishes its
    full length and every slot comes back."""
    cap, chunk = 16, 48
    core, steps = make_costed_core(tiny_llama, monkeypatch, max_step_tokens=cap, chunked_prefill_size=chunk,
                                   max_queue_prefill_ms=queue_ms)
    rng = random.Random(5)
    lengths = {f"r{i}": rng.randint(4, 12) for i in range(10)}
    for rid, n in lengths.items():
        add(core, rid, prompt(rng, rng.randint(30, 70)), n)
    while len(core.scheduler.running) < 2:
        core.step()
    add(core, "late", prompt(rng, 4), 40)  # a decode that outlives the queue
    outputs = run_to_the_end(core)
    extends = [tokens for mode, tokens in steps if mode is ForwardMode.EXTEND]
    assert extends[0] == cap, "no step measured yet: the cap"
    assert max(extends) <= 11 + chunk, "at most every request decoding plus one chunk"
    assert (max(extends) > cap) is grows
    lengths |= {"late": 40}
    assert outputs == lengths
    passes = len(steps)
    add(core, "alone", prompt(rng, 40), 3)
    assert run_to_the_end(core) == {"alone": 3}
    assert [tokens for mode, tokens in steps[passes:] if mode is ForwardMode.EXTEND][:1] == [cap], \
        "40 tokens alone need (40 * 16) / (400 - 40) = 1.8 tokens a step: the cap stands"
    check_all_memory_back(core)

"""Who owns each KV slot, checked after every scheduler step against a plain-Python model.

The model is built here from the pools and the prefix cache alone: every slot of the KV pool
is free, owned by the cache, or owned by exactly one live request (its row from ``prefix_len``
to ``kv_len``; the row's first ``prefix_len`` slots are the cache's, borrowed under a lock).
The scenarios are the ones no end-of-run leak check sees: an abort while a decode step is in
flight (overlapped schedule), failing every request mid-flight, and retraction when the pool
runs out. The engine core is driven one step at a time so the state between steps is visible.
"""

from __future__ import annotations

import random

import pytest

from sglang_core.config import EngineSettings
from sglang_core.engine_core import EngineCore
from sglang_core.messages import GenerateRequest
from sglang_core.plugins import PluginManager
from sglang_core.request import Req


def make_core(model, overlap: bool, **settings) -> EngineCore:
    config = EngineSettings(model_path=str(model), device="cpu", **settings)
    core = EngineCore(config, PluginManager(config.plugins))
    if overlap:  # on the CPU the overlapped schedule runs the same code but must be switched on
        core.scheduler.overlap_max_bs = 64
    return core


def prefix_cache(core: EngineCore):
    return core.scheduler.memory.cache


def in_flight(core: EngineCore):
    return core.scheduler.overlap.in_flight


def live_requests(core: EngineCore) -> list[Req]:
    sched = core.scheduler
    return sched.waiting + sched.running + ([sched.chunked] if sched.chunked else [])


def owners(core: EngineCore) -> dict[int, str]:
    """slot -> "free", "cache" or the rid of the request that owns it; fails on a slot with two
    owners or none, a borrowed prefix slot the cache does not own, a leaked row or lock."""
    pool, table = core.runner.kv_pool, core.runner.req_pool.req_to_token
    cache = prefix_cache(core)
    owner: dict[int, str] = {}

    def claim(slots: list[int], who: str) -> None:
        for slot in slots:
            assert slot not in owner, f"slot {slot} owned by both {owner[slot]} and {who}"
            owner[slot] = who

    claim(pool.free_slots().tolist(), "free")
    claim(cache.all_slots().tolist(), "cache")
    rows, borrowed = [], set()
    for req in live_requests(core):
        if req.req_pool_idx is None:
            assert req.kv_len == req.prefix_len == 0 and req.cache_handle is None, req.rid
            continue
        rows.append(req.req_pool_idx)
        claim(table[req.req_pool_idx, req.prefix_len : req.kv_len].tolist(), req.rid)
        borrowed |= set(table[req.req_pool_idx, : req.prefix_len].tolist())
    assert sorted(owner) == list(range(1, pool.size + 1)), "a slot has no owner"
    assert all(owner[slot] == "cache" for slot in borrowed), "a request borrows a prefix the cache does not own"
    assert cache.protected_size() == len(borrowed), "locked cache tokens != prefixes live requests borrow"
    assert len(set(rows)) == len(rows), "two requests share a row"
    assert core.runner.req_pool.available_size() + len(rows) == core.runner.req_pool.size, "request rows leaked"
    return owner


def slots_of(core: EngineCore, req: Req) -> list[int]:
    return core.runner.req_pool.req_to_token[req.req_pool_idx, req.prefix_len : req.kv_len].tolist()


def add(core: EngineCore, rid: str, prompt: list[int], max_new_tokens: int, **params) -> None:
    core.add(GenerateRequest(rid=rid, input_ids=prompt, sampling_params={
        "temperature": 0.0, "ignore_eos": True, "max_new_tokens": max_new_tokens, **params}))


def prompts(seed: int, count: int, shared: int = 12) -> list[list[int]]:
    rng = random.Random(seed)
    head = [rng.randrange(3, 259) for _ in range(shared)]
    return [head + [rng.randrange(3, 259) for _ in range(rng.randint(2, 20))] for _ in range(count)]


def step_until(core: EngineCore, done, limit: int = 200) -> None:
    for _ in range(limit):
        if done():
            return
        core.step()
        owners(core)
    raise AssertionError("the scheduler never reached the awaited state")


def test_abort_during_overlapped_decode_gives_back_exactly_the_requests_slots(tiny_llama):
    """An abort while a decode step is in flight (it has written the KV of each request's last
    token and sampled a token not yet read back): the request's slots go to the cache (or back
    to the pool, where they duplicate cached tokens), it gets no token from the in-flight step,
    and the others keep decoding overlapped."""
    core = make_core(tiny_llama, overlap=True, max_total_tokens=400)
    for i, prompt in enumerate(prompts(1, 4)):
        add(core, f"r{i}", prompt, 30)
    # An extra penalised request: its sampling reads token history, so its steps are sampled
    # after the previous step's tokens are applied (the deferred path).
    add(core, "penalised", prompts(2, 1)[0], 30, frequency_penalty=0.5)
    step_until(core, lambda: in_flight(core) is not None and len(core.scheduler.running) == 5)
    for rid in ("r1", "penalised"):
        victim = next(r for r in core.scheduler.running if r.rid == rid)
        assert victim.kv_len == victim.fill_len, "in flight: the last token's KV is being written"
        held = slots_of(core, victim)
        outputs = len(victim.output_ids)
        overlapped = core.scheduler.overlapped_steps
        core.abort(rid)
        owner = owners(core)
        assert victim.finished and victim.req_pool_idx is None
        assert held and all(owner[s] in ("cache", "free") for s in held)
        assert any(owner[s] == "cache" for s in held), "the aborted request's computed KV was cached"
        core.step()
        owners(core)
        assert len(victim.output_ids) == outputs, "an aborted request got a token from the in-flight step"
        assert core.scheduler.overlapped_steps == overlapped + 1, "the others kept decoding overlapped"
    step_until(core, lambda: not core.has_work())
    core.scheduler.check_memory()


def test_fail_all_mid_flight_frees_every_request_slot(tiny_llama):
    """Failing every request while a step is in flight (an internal error) caches none of their
    KV: every slot a request owned is free afterwards, and nothing is left locked or held."""
    core = make_core(tiny_llama, overlap=True, max_total_tokens=400)
    for i, prompt in enumerate(prompts(3, 3)):
        add(core, f"r{i}", prompt, 20)
    step_until(core, lambda: in_flight(core) is not None)
    before = owners(core)
    requests = {rid for rid in before.values() if rid not in ("free", "cache")}
    assert requests == {"r0", "r1", "r2"}
    failed = core.fail_all("internal error: injected")
    assert sorted(out.rid for out in failed) == ["r0", "r1", "r2"]
    assert all(out.finished_reason["type"] == "abort" for out in failed)
    after = owners(core)
    assert all(after[slot] == "free" for slot, who in before.items() if who in requests)
    assert all(after[slot] == "cache" for slot, who in before.items() if who == "cache")
    assert not core.has_work()
    core.scheduler.check_memory()


@pytest.mark.parametrize("overlap", [False, True], ids=["plain", "overlapped"])
def test_a_failing_prefill_ends_its_requests_and_frees_their_slots(tiny_llama, overlap: bool):
    """The model raises during a prefill step (a plugin's bug): every request of that step, which
    admission had already taken off the queue, ends with an error (so its caller is answered)
    and gives back its slots; requests still queued are ended too, and the core serves on."""
    core = make_core(tiny_llama, overlap=overlap, max_total_tokens=400, chunked_prefill_size=24)
    for i, prompt in enumerate(prompts(5, 4, shared=0)):  # several whole prompts in the first step
        add(core, f"r{i}", prompt, 10)
    real_forward = core.runner.forward

    def broken(step):
        raise RuntimeError("a shape error in the model")

    core.runner.forward = broken
    outputs = core.step()
    assert sorted(out.rid for out in outputs) == ["r0", "r1", "r2", "r3"]
    assert all(out.finished_reason["type"] == "abort" and "shape error" in out.finished_reason["message"]
               for out in outputs)
    assert not core.has_work()
    owners(core)
    core.scheduler.check_memory()
    core.runner.forward = real_forward
    add(core, "after", prompts(6, 1)[0], 5)
    step_until(core, lambda: not core.has_work())
    core.scheduler.check_memory()


@pytest.mark.parametrize("overlap", [False, True], ids=["plain", "overlapped"])
def test_retraction_when_the_pool_runs_out(tiny_llama, overlap: bool):
    """A pool too small for every admitted request's output: before a decode step the newest
    running requests are retracted; each gives back every slot and its row, keeps its output,
    goes to the front of the queue, and later finishes its full length."""
    core = make_core(tiny_llama, overlap=overlap, max_total_tokens=160, new_token_ratio=0.0, chunked_prefill_size=16)
    sched = core.scheduler
    count, max_new = 6, 40
    for i, prompt in enumerate(prompts(4, count, shared=0)):
        add(core, f"r{i}", prompt, max_new)
    requests: dict[str, Req] = {}
    for _ in range(1000):
        if not core.has_work():
            break
        running = list(sched.running)
        outputs = {r.rid: len(r.output_ids) for r in running}
        retracted = {r.rid: r.times_retracted for r in running}
        core.step()
        owners(core)
        requests |= {r.rid: r for r in live_requests(core)}
        victims = [r for r in running if r.times_retracted > retracted[r.rid]]
        survivors = [r for r in running if r not in victims and not r.finished]
        for victim in victims:
            assert victim.req_pool_idx is None and victim.kv_len == 0, "a retracted request holds memory"
            assert len(victim.output_ids) == outputs[victim.rid], "a retracted request keeps its output"
            assert all(victim.arrival_time >= r.arrival_time for r in survivors), "the newest go first"
        assert sched.waiting[: len(victims)] == sorted(victims, key=lambda r: r.arrival_time), \
            "retracted requests wait at the front, the oldest first"
    assert not core.has_work()
    assert sched.retractions > 0, "the pool was meant to run out"
    assert len(requests) == count
    assert all(r.finished_reason == {"type": "length", "length": max_new} for r in requests.values())
    core.scheduler.check_memory()

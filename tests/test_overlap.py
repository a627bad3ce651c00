"""The overlapped decode schedule, checked on the CPU.

On a GPU the scheduler launches decode step N+1 before reading step N back (and, where sampling
needs N's tokens on the host, samples N+1 once they are applied). The logic is device-agnostic:
on the CPU it gains nothing (a forward pass has finished when it returns) but runs the same
code, so these tests switch it on there (``overlap_max_bs``, which CUDA graphs set on a GPU)
and compare with the plain schedule and with HF. tests/test_gpu.py repeats the constrained case
with CUDA graphs on a GPU.
"""

from __future__ import annotations

import asyncio
import random

import pytest
import torch
from transformers import AutoModelForCausalLM

from reference import check_constrained, check_stops_and_aborts, constrained_requests, hf_greedy
from sglang_core.engine import Engine


def overlapped(engine: Engine) -> Engine:
    engine.core.core.scheduler.overlap_max_bs = 64
    return engine


def staggered(engine: Engine, prompts: list[list[int]], params: list[dict]) -> list[dict]:
    """Requests arrive while others decode, so the running batch changes under the schedule."""

    async def one(i: int) -> dict:
        await asyncio.sleep(0.005 * i)
        return await engine.async_generate(input_ids=prompts[i], sampling_params=params[i])

    async def all_requests() -> list[dict]:
        return await asyncio.gather(*(one(i) for i in range(len(prompts))))

    return asyncio.run(all_requests())


def prompts(seed: int, count: int) -> list[list[int]]:
    rng = random.Random(seed)
    shared = [rng.randrange(3, 259) for _ in range(9)]
    return [shared + [rng.randrange(3, 259) for _ in range(rng.randint(1, 40))] for _ in range(count)]


def test_overlapped_greedy_matches_hf(tiny_llama):
    ps = prompts(1, 10)
    ns = [random.Random(i).randint(3, 30) for i in range(len(ps))]
    hf = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    with overlapped(Engine(str(tiny_llama))) as engine:
        results = staggered(engine, ps, [{"temperature": 0, "ignore_eos": True, "max_new_tokens": n} for n in ns])
        assert engine.stats()["overlapped_steps"] > 0
        engine.check_memory()
    for prompt, n, res in zip(ps, ns, results):
        assert res["output_ids"] == hf_greedy(hf, prompt, n)


@pytest.mark.parametrize("grammar_backend", ["outlines", "llguidance"])
def test_overlapped_constrained_and_penalised_equal_plain_schedule(tiny_llama, grammar_backend):
    """Constraints (with jump-forward), penalties, min_new_tokens and logit bias, greedy and
    seeded: the same tokens overlapped as not, every output valid, memory whole."""
    pytest.importorskip({"outlines": "outlines_core", "llguidance": "llguidance"}[grammar_backend])
    params = constrained_requests()
    ps = prompts(2, len(params))
    runs = {}
    for overlap in (True, False):
        engine = Engine(str(tiny_llama), grammar_backend=grammar_backend)
        with overlapped(engine) if overlap else engine:
            runs[overlap] = staggered(engine, ps, params)
            if overlap:
                assert engine.stats()["overlapped_steps"] > 0
            engine.check_memory()
    for p, got, want in zip(params, runs[True], runs[False]):
        assert got["output_ids"] == want["output_ids"], p
        check_constrained(p, got["text"])
        if "min_new_tokens" in p:
            assert got["meta_info"]["completion_tokens"] >= p["min_new_tokens"]
    assert sum(r["meta_info"].get("forced_tokens", 0) for r in runs[True]) > 0  # jump-forward ran


def test_overlapped_stops_and_aborts_return_all_memory(tiny_llama):
    with overlapped(Engine(str(tiny_llama))) as engine:
        check_stops_and_aborts(engine, prompts(3, 16))

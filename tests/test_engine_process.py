"""The engine core in a process of its own: same results as in-process, and its death is noticed."""

from __future__ import annotations

import asyncio
import os
import signal

import pytest

from sglang_core.engine import Engine

GREEDY = {"temperature": 0, "ignore_eos": True}


@pytest.fixture(scope="module")
def process_engine(tiny_llama):
    engine = Engine(str(tiny_llama), engine_in_subprocess=True, chunked_prefill_size=8)
    yield engine
    engine.shutdown()


def test_same_outputs_as_in_process(process_engine, tiny_llama):
    prompts = [[5, 6, 7], [9] * 20, [11, 12]]
    params = {**GREEDY, "max_new_tokens": 12}
    with Engine(str(tiny_llama)) as local:
        expected = local.generate(input_ids=prompts, sampling_params=params, return_logprob=True, logprob_start_len=0)
    got = process_engine.generate(input_ids=prompts, sampling_params=params, return_logprob=True, logprob_start_len=0)
    for e, g in zip(expected, got):
        assert g["output_ids"] == e["output_ids"]
        got_lp, exp_lp = g["meta_info"]["input_token_logprobs"], e["meta_info"]["input_token_logprobs"]
        assert [t for _, t, _ in got_lp] == [t for _, t, _ in exp_lp]
        assert [lp for lp, _, _ in got_lp[1:]] == pytest.approx([lp for lp, _, _ in exp_lp[1:]])
    process_engine.check_memory()


def test_engine_process_death_ends_requests(tiny_llama):
    engine = Engine(str(tiny_llama), engine_in_subprocess=True)
    try:
        async def run() -> dict:
            stream = await engine.async_generate(input_ids=[5, 6], sampling_params={**GREEDY, "max_new_tokens": 1000},
                                                 stream=True)
            chunks = [await anext(stream)]  # the request is running now
            os.kill(engine.core.process.pid, signal.SIGKILL)
            chunks += [c async for c in stream]
            return chunks[-1]

        result = asyncio.run(asyncio.wait_for(run(), 20))
        assert result["meta_info"]["finish_reason"]["type"] == "abort"
        assert not engine.alive
        with pytest.raises(RuntimeError):
            engine.generate(input_ids=[5], sampling_params=GREEDY)
    finally:
        engine.shutdown()

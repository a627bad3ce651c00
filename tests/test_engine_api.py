"""The Engine API: validation, stop conditions, streaming, n/seed, and that memory always comes back."""

from __future__ import annotations

import asyncio
import math
import time

import pytest

from sglang_core.engine import Engine

GREEDY = {"temperature": 0, "ignore_eos": True}


@pytest.fixture(scope="module")
def engine(tiny_llama):
    with Engine(str(tiny_llama), chunked_prefill_size=16) as eng:
        yield eng


@pytest.mark.parametrize("params, field", [
    ({"temperature": math.nan}, "temperature"),
    ({"temperature": -0.5}, "temperature"),
    ({"temperature": "hot"}, "temperature"),
    ({"top_p": 0.0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"top_k": -2}, "top_k"),
    ({"max_new_tokens": -1}, "max_new_tokens"),
    ({"no_such_field": 1}, "no_such_field"),
    ({"stop_token_ids": [100000]}, "stop_token_ids"),
    ({"logit_bias": {"999999": 1.0}}, "logit_bias"),
    ({"top_k": 10**23}, "top_k"),
    ({"seed": -(2**70)}, "seed"),
    ({"json_schema": "[" * 100_000 + "]" * 100_000}, "json_schema"),  # a RecursionError in json.loads
])
def test_bad_sampling_params_name_the_field(engine, params, field):
    with pytest.raises(ValueError, match=field):
        engine.generate(input_ids=[5, 6, 7], sampling_params=params)


@pytest.mark.parametrize("kwargs, field", [
    ({"prompt": ""}, "prompt"),
    ({"input_ids": []}, "input_ids"),
    ({"input_ids": [5, 259]}, "input_ids"),
    ({"input_ids": [5, -1]}, "input_ids"),
    ({"input_ids": [5] * 2000}, "prompt"),
    ({"prompt": "a", "input_ids": [5]}, "prompt"),
    ({"input_ids": [5], "top_logprobs_num": -1}, "top_logprobs_num"),
])
def test_bad_inputs_name_the_field(engine, kwargs, field):
    with pytest.raises(ValueError, match=field):
        engine.generate(**kwargs)


def test_rid_in_flight_is_rejected(engine):
    async def scenario():
        first = await engine.async_generate(input_ids=[5, 6], sampling_params={**GREEDY, "max_new_tokens": 30},
                                            rid="twice", stream=True)
        async for _ in first:
            break  # "twice" is now running
        with pytest.raises(ValueError, match="rid"):
            await engine.async_generate(input_ids=[7, 8], rid="twice")
        await first.aclose()
        await asyncio.to_thread(engine.memory_report)  # served after the abort, so the abort is done
        # Once it has ended, the rid is free again.
        again = await engine.async_generate(input_ids=[7, 8], sampling_params={**GREEDY, "max_new_tokens": 2},
                                            rid="twice")
        assert again["meta_info"]["id"] == "twice"

    asyncio.run(scenario())
    assert engine.memory_report()["running"] == 0


@pytest.fixture(scope="module")
def process_engine(tiny_llama):
    with Engine(str(tiny_llama), engine_in_subprocess=True) as eng:
        yield eng


# Values no msgpack message can carry (lone surrogates, integers past 64 bits) or that the engine
# process would not decode: each must be refused before the request is registered.
REFUSED = [
    ({"sampling_params": {"stop": "\ud800"}}, "stop"),
    ({"sampling_params": {"stop": ["ok", "x\udfff"]}}, "stop"),
    ({"sampling_params": {"regex": "a\ud800"}}, "regex"),
    ({"sampling_params": {"custom_params": {"a": [2**70]}}}, "custom_params"),
    ({"sampling_params": {"custom_params": {"a": object()}}}, "custom_params"),
    ({"top_logprobs_num": 2**70, "return_logprob": True}, "top_logprobs_num"),
    ({"logprob_start_len": 2**64, "return_logprob": True}, "logprob_start_len"),
    ({"return_logprob": "yes"}, "return_logprob"),
    ({"prompt": "a\ud800b", "input_ids": None}, "prompt"),
    ({"rid": "\ud800"}, "rid"),
    ({"rid": 5}, "rid"),
    ({"rid": ""}, "rid"),
]


@pytest.mark.parametrize("where", ["engine", "process_engine"])
def test_refused_request_leaves_no_stream_and_frees_its_rid(request, where):
    eng = request.getfixturevalue(where)
    for kwargs, field in REFUSED:
        with pytest.raises(ValueError, match=f"^{field}:"):
            eng.generate(**{"input_ids": [5, 6], "rid": "refused", **kwargs})
        again = eng.generate(input_ids=[5, 6], sampling_params={**GREEDY, "max_new_tokens": 2}, rid="refused")
        assert again["meta_info"]["id"] == "refused" and again["meta_info"]["completion_tokens"] == 2
    for rid in ("\ud800", 5, ""):
        with pytest.raises(ValueError, match="^rid:"):
            eng.abort(rid)
    assert eng.alive and not eng._streams
    eng.check_memory()


def test_failed_submit_unregisters_and_aborts_what_it_sent(process_engine, monkeypatch):
    """If handing a batch to the core fails part-way, no stream is left behind and the requests
    already sent are aborted (fault injected after the first request of a batch of two)."""
    real_add, sent = process_engine.core.add, []

    def add_once(request):
        if sent:
            raise RuntimeError("injected failure")
        sent.append(request.rid)
        real_add(request)

    monkeypatch.setattr(process_engine.core, "add", add_once)
    with pytest.raises(RuntimeError, match="injected"):
        process_engine.generate(input_ids=[[5, 6], [7, 8]], rid="half",
                                sampling_params={**GREEDY, "max_new_tokens": 10**6})
    monkeypatch.undo()
    assert sent == ["half-0"] and "half-1" not in process_engine._streams
    deadline = time.monotonic() + 20
    while process_engine._streams:  # "half-0" goes when its abort's final output arrives
        assert time.monotonic() < deadline, f"streams left behind: {list(process_engine._streams)}"
        time.sleep(0.02)
    again = process_engine.generate(input_ids=[[5, 6], [7, 8]], rid="half",
                                    sampling_params={**GREEDY, "max_new_tokens": 2})
    assert [r["meta_info"]["id"] for r in again] == ["half-0", "half-1"]
    report = process_engine.memory_report()
    assert report["running"] == 0 and report["waiting"] == 0
    process_engine.check_memory()


def test_max_new_tokens_clipped_to_what_the_kv_pool_holds(tiny_llama):
    """A KV pool smaller than the context: the output is clipped to the pool left after the prompt
    (as SGLang does), where it used to wait for room that never comes."""
    context, pool = 64, 40
    with Engine(str(tiny_llama), context_length=context, max_total_tokens=pool) as eng:
        for prompt_len in (1, 10, pool - 1):
            out = asyncio.run(asyncio.wait_for(eng.async_generate(
                input_ids=[9] * prompt_len, sampling_params={**GREEDY, "max_new_tokens": 10**6}), 60))
            assert out["meta_info"]["completion_tokens"] == pool - prompt_len
        with pytest.raises(ValueError, match="^prompt:"):
            eng.generate(input_ids=[9] * pool)
        eng.check_memory()


def test_prefill_only_caches_the_prompt_and_samples_nothing(engine):
    prompt = list(range(20, 60))
    out = engine.generate(input_ids=prompt, sampling_params={"max_new_tokens": 0}, return_logprob=True,
                          logprob_start_len=0)
    meta = out["meta_info"]
    assert out["output_ids"] == [] and out["text"] == ""
    assert meta["completion_tokens"] == 0 and meta["finish_reason"] == {"type": "length", "length": 0}
    assert meta["output_token_logprobs"] == [] and len(meta["input_token_logprobs"]) == len(prompt)
    again = engine.generate(input_ids=prompt + [7], sampling_params={**GREEDY, "max_new_tokens": 1})
    assert again["meta_info"]["cached_tokens"] >= len(prompt) - 1


def test_bad_settings_name_the_field(tiny_llama):
    with pytest.raises(ValueError, match="mem_fraction_static"):
        Engine(str(tiny_llama), mem_fraction_static=3)
    with pytest.raises(ValueError, match="bogus_setting"):
        Engine(str(tiny_llama), bogus_setting=1)
    with pytest.raises(ValueError, match="does not exist"):
        Engine("/no/such/model")


def test_malformed_model_folder(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config"):
        Engine(str(tmp_path), load_format="dummy")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="config.json"):
        Engine(str(empty))


def test_stop_string_across_tokens(engine):
    """Each byte is one token here, so a 3-character stop string always spans 3 tokens."""
    plain = engine.generate(input_ids=[40, 41, 42], sampling_params={**GREEDY, "max_new_tokens": 40})
    text = plain["text"]
    # Random bytes are often invalid UTF-8; take a window of whole characters seen there first.
    start = next(i for i in range(5, len(text) - 3)
                 if "\ufffd" not in text[i : i + 3] and text[i : i + 3] not in text[: i + 2])
    stop = text[start : start + 3]
    res = engine.generate(input_ids=[40, 41, 42], sampling_params={**GREEDY, "max_new_tokens": 40, "stop": [stop]})
    assert res["meta_info"]["finish_reason"] == {"type": "stop", "matched": stop}
    assert res["text"] == text[: text.index(stop)]


def test_stop_token_ids_and_min_new_tokens(engine):
    plain = engine.generate(input_ids=[50, 60], sampling_params={**GREEDY, "max_new_tokens": 20})["output_ids"]
    stop_id = plain[4]
    first = plain.index(stop_id)
    res = engine.generate(input_ids=[50, 60], sampling_params={**GREEDY, "max_new_tokens": 20, "stop_token_ids": [stop_id]})
    assert res["output_ids"] == plain[: first + 1]
    assert res["meta_info"]["finish_reason"] == {"type": "stop", "matched": stop_id}
    held = engine.generate(input_ids=[50, 60], sampling_params={**GREEDY, "max_new_tokens": 20, "min_new_tokens": 12,
                                                                "stop_token_ids": [stop_id]})
    assert len(held["output_ids"]) >= 12 and stop_id not in held["output_ids"][:12]


def test_streaming_concatenates_to_full_text(engine):
    params = {**GREEDY, "max_new_tokens": 30}
    full = engine.generate(input_ids=[70, 71, 72], sampling_params=params)
    chunks = list(engine.generate(input_ids=[70, 71, 72], sampling_params=params, stream=True))
    assert "".join(c["text"] for c in chunks) == full["text"]
    assert chunks[-1]["meta_info"]["finish_reason"] == {"type": "length", "length": 30}
    assert len(chunks) > 1

    async def collect() -> str:
        stream = await engine.async_generate(input_ids=[70, 71, 72], sampling_params=params, stream=True)
        return "".join([c["text"] async for c in stream])

    assert asyncio.run(collect()) == full["text"]


def test_n_and_seed(engine):
    params = {"temperature": 1.0, "max_new_tokens": 12, "ignore_eos": True, "seed": 1234}
    a = engine.generate(input_ids=[80, 81], sampling_params=params)
    b = engine.generate(input_ids=[80, 81], sampling_params=params)
    assert a["output_ids"] == b["output_ids"]
    many = engine.generate(input_ids=[80, 81], sampling_params={**params, "n": 3})
    assert len(many) == 3 and many[0]["output_ids"] == a["output_ids"]
    assert len({tuple(r["output_ids"]) for r in many}) > 1


def test_batch_with_per_prompt_params(engine):
    res = engine.generate(input_ids=[[5, 6], [7, 8, 9]], sampling_params=[{**GREEDY, "max_new_tokens": 3},
                                                                         {**GREEDY, "max_new_tokens": 5}])
    assert [len(r["output_ids"]) for r in res] == [3, 5]


def test_no_leaks_after_every_kind_of_ending(tiny_llama):
    """Finished, stopped, aborted mid-stream, aborted while queued and retracted requests all give back
    every KV slot and request row."""
    with Engine(str(tiny_llama), max_total_tokens=200, chunked_prefill_size=16, new_token_ratio=0.0) as eng:

        async def scenario():
            long = {**GREEDY, "max_new_tokens": 60}
            tasks = [asyncio.create_task(eng.async_generate(input_ids=[10 + i] * 20, sampling_params=long))
                     for i in range(5)]
            stopped = asyncio.create_task(eng.async_generate(
                input_ids=[30, 31], sampling_params={"temperature": 1.0, "max_new_tokens": 50, "stop": ["e", "a", "o"]}))
            stream = await eng.async_generate(input_ids=[40] * 10, sampling_params=long, stream=True)
            async for _ in stream:
                break  # client goes away mid-stream
            await stream.aclose()
            queued = asyncio.create_task(eng.async_generate(input_ids=[50] * 30, sampling_params=long, rid="gone"))
            await asyncio.sleep(0)
            eng.abort("gone")
            results = await asyncio.gather(*tasks, stopped, queued)
            return results

        results = asyncio.run(scenario())
        assert results[-1]["meta_info"]["finish_reason"]["type"] == "abort"
        assert eng.stats()["retractions"] > 0
        report = eng.memory_report()
        assert report["running"] == 0 and report["waiting"] == 0
        eng.check_memory()
        assert eng.flush_cache()
        assert eng.memory_report()["kv_free"] == report["kv_pool_size"]


def test_running_request_limit(site_with_recorder, tiny_llama):
    """No step ever samples for more requests than max_running_requests, whatever is queued."""
    sizes = site_with_recorder
    with Engine(str(tiny_llama), max_running_requests=3,
                plugins=["llama", "torch_native", "safetensors", "record"]) as eng:
        res = eng.generate(input_ids=[[5 + i, 6, 7] for i in range(8)],
                           sampling_params={**GREEDY, "max_new_tokens": 6})
    assert all(len(r["output_ids"]) == 6 for r in res)
    assert sizes and max(sizes) == 3


RECORDER = """
from sglang_core.hookspecs import hookimpl
from sglang_core.sampling.logits_processor import LogitsProcessor

SIZES = []


class Record(LogitsProcessor):
    def wants(self, params):
        return True

    def __call__(self, logits, batch, rows):
        SIZES.append(len(batch.reqs))


@hookimpl
def register_logits_processors(register):
    register("record_batch_sizes", Record)
"""


@pytest.fixture
def site_with_recorder(tmp_path, monkeypatch):
    from test_plugins import fake_distribution

    monkeypatch.syspath_prepend(str(tmp_path))
    fake_distribution(tmp_path, "record-plugin", {"record": RECORDER})
    import importlib

    module = importlib.import_module("record_plugin_record")
    return module.SIZES

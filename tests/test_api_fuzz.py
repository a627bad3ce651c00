"""Schema-driven fuzzing of a live server of the default model (the frontend-language tests'
shared one): 1,000 requests drawn from its own /openapi.json over every route must get a
documented status (never a 5xx) with a body, or every streamed event, that fits the documented
schema; afterwards the server still answers and its KV memory is whole. A longer run:
``python benchmarks/fuzz_api.py --cases N``."""

from __future__ import annotations

import httpx
import pytest

from api_fuzz import GENERATED_TOKENS, fuzz, operations, wait_until_memory_whole

CASES = 700


def test_fuzzed_requests_get_documented_answers_and_leave_memory_whole(lang_server):
    url = lang_server.url
    report = fuzz(url, CASES)
    assert not report.failures, "\n".join(report.failures[:10])
    assert report.total >= CASES
    # Drawn bodies reach generation, not only validation: every route that takes one served some.
    document = httpx.get(f"{url}/openapi.json").json()
    taking_bodies = {f"{op.method.upper()} {op.path}" for op in operations(document) if op.body is not None}
    served = {name for name, status in report.cases if status == 200}
    assert taking_bodies <= served, taking_bodies - served
    answer = httpx.post(f"{url}/v1/chat/completions", timeout=60, json={
        "messages": [{"role": "user", "content": "Hi"}], "max_tokens": GENERATED_TOKENS, "temperature": 0})
    assert answer.status_code == 200 and answer.json()["usage"]["completion_tokens"] == GENERATED_TOKENS
    wait_until_memory_whole(url)


UNSPELLABLE = "\U0007f4b5"  # a regex that validates but that no token of the model's vocabulary can spell


def test_a_constraint_the_vocabulary_cannot_spell_is_a_400_not_a_500(lang_server):
    """Found by the fuzzer: the engine aborted such a request when compiling its grammar and the
    frontends answered 500; the request is at fault, so it is a 400 naming the field."""
    url, chat = lang_server.url, [{"role": "user", "content": "Hi"}]
    answer = httpx.post(f"{url}/v1/chat/completions", timeout=60,
                        json={"messages": chat, "max_tokens": 2, "regex": UNSPELLABLE})
    assert answer.status_code == 400 and answer.json()["error"]["param"] == "regex", answer.text
    answer = httpx.post(f"{url}/v1/messages", timeout=60,
                        json={"model": "m", "messages": chat, "max_tokens": 2, "regex": UNSPELLABLE})
    assert answer.status_code == 400 and answer.json()["error"]["type"] == "invalid_request_error", answer.text
    streamed = httpx.post(f"{url}/v1/completions", timeout=60,
                          json={"prompt": "Hi", "max_tokens": 2, "regex": UNSPELLABLE, "stream": True})
    events = [line for line in streamed.text.split("\n") if line.startswith("data: {")]
    assert events and '"code": "400"' in events[-1], streamed.text


@pytest.mark.parametrize("extreme", [{"temperature": 1e306}, {"top_p": 5e-324}, {"repetition_penalty": 5e-324}])
def test_sampling_values_past_float32_still_follow_the_constraint(lang_server, extreme):
    """Found by the fuzzer: values the engine accepts that float32 cannot hold (temperature 1e306
    became inf, top_p 5e-324 became 0) made every probability NaN or 0, so a token the grammar
    masked out was drawn and the request failed with a 500."""
    for _ in range(3):
        answer = httpx.post(f"{lang_server.url}/v1/completions", timeout=60, json={
            "prompt": "The capital of France is", "max_tokens": 2, "temperature": 1, "regex": "[0-9]+", **extreme})
        assert answer.status_code == 200, answer.text
        assert answer.json()["choices"][0]["text"].isdigit(), answer.text

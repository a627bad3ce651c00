"""Anthropic's Messages API on our server, driven by the official ``anthropic`` client against a
real server running the embedded default model (SmolLM2-135M-Instruct); and the frontend
language's Anthropic backend against the same server.

References are independent of the code under test: token counts come from the tokenizer and its
chat template, greedy text from our OpenAI endpoints (another route, another request parser),
penalised text from the engine itself (the native /generate on the same token ids), a select
from Hugging Face's logits, constrained output is checked with ``re.fullmatch`` and ``jsonschema``.
The current SDK pins an API version without sampling parameters, so ``temperature`` travels in
``extra_body``, as it does for any client of a server that still takes it.
"""

from __future__ import annotations

import json
import re
import sys
import time

import anthropic
import httpx
import jsonschema
import openai
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sglang_core.lang.backend import GenParams, GenResult, Image, MissingExtraError, Prompt, UnsupportedError

MAX = 12  # generated tokens per request: keeps the file fast on CPU
GREEDY = {"temperature": 0}
USER = [{"role": "user", "content": "Write a short poem about the sea."}]
# A prefill the model continues for thousands of tokens: a request that only an abort ends early.
PHONE = r"[0-9]{3}-[0-9]{4}"
SCHEMA = {"type": "object",
          "properties": {"city": {"type": "string", "maxLength": 12}, "is_capital": {"type": "boolean"}},
          "required": ["city", "is_capital"], "additionalProperties": False}
CITY = [{"role": "user", "content": "What is the capital of France? Answer in JSON."}]
COUNTING = [{"role": "user", "content": "Count upwards from 1, separated by commas."},
            {"role": "assistant", "content": "1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12,"}]


@pytest.fixture(scope="module")
def server(lang_server):
    # The default model's session-wide server (conftest.py); it takes no API key: Anthropic's
    # clients authenticating (x-api-key, or Bearer) are tested on a keyed server in test_api_hardening.
    return lang_server


@pytest.fixture(scope="module")
def client(server) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=server.url, api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def oai(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def template_ids(hf_tokenizer, messages, prefill: str = "") -> list[int]:
    """The prompt ids by the tokenizer's own chat template (the reference for input_tokens)."""
    text = hf_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return hf_tokenizer(text + prefill, add_special_tokens=False)["input_ids"]


def create(client, messages, max_tokens=MAX, extra: dict | None = None, **kwargs):
    """Greedy unless ``extra`` (body fields the SDK has no parameter for) says otherwise."""
    return client.messages.create(model="any", max_tokens=max_tokens, messages=messages,
                                  extra_body={**GREEDY, **(extra or {})}, **kwargs)


def text_of(message) -> str:
    (block,) = message.content
    assert block.type == "text"
    return block.text


def memory(server) -> dict:
    info = httpx.get(f"{server.url}/get_server_info", timeout=30).json()
    return info["memory"]


def wait_all_memory_free(server, wait_s: float = 15) -> None:
    deadline = time.monotonic() + wait_s
    while True:
        mem = memory(server)
        if mem["running"] == 0 and mem["waiting"] == 0 and mem["kv_cache_locked"] == 0 \
                and mem["kv_free"] + mem["kv_cached"] == mem["kv_pool_size"] \
                and mem["request_rows_free"] == mem["request_rows"]:
            return
        assert time.monotonic() < deadline, f"memory not given back: {mem}"
        time.sleep(0.2)


# ---- the frontend: /v1/messages ---------------------------------------------------------------

def test_create(server, client, hf_tokenizer):
    msg = create(client, USER)
    assert msg.type == "message" and msg.role == "assistant" and msg.id.startswith("msg_")
    assert text_of(msg) and msg.model == "SmolLM2-135M-Instruct"
    assert msg.stop_reason in ("end_turn", "max_tokens") and msg.stop_sequence is None
    assert msg.usage.input_tokens == len(template_ids(hf_tokenizer, USER))
    assert 0 < msg.usage.output_tokens <= MAX
    # The same message read off the wire, field by field as Anthropic documents it.
    raw = httpx.post(f"{server.url}/v1/messages", timeout=60,
                     json={"model": "any", "max_tokens": MAX, "messages": USER, **GREEDY})
    assert raw.status_code == 200 and raw.headers["content-type"].startswith("application/json")
    body = raw.json()
    assert set(body) == {"id", "type", "role", "model", "content", "stop_reason", "stop_sequence", "usage"}
    assert body["id"].startswith("msg_") and body["id"] != msg.id
    assert {k: body[k] for k in ("type", "role", "model", "stop_reason", "stop_sequence")} == {
        "type": "message", "role": "assistant", "model": msg.model, "stop_reason": msg.stop_reason,
        "stop_sequence": None}
    assert body["content"] == [{"type": "text", "text": text_of(msg)}]
    assert body["usage"] == {"input_tokens": msg.usage.input_tokens, "output_tokens": msg.usage.output_tokens}


def test_max_tokens(client, hf_tokenizer):
    msg = create(client, COUNTING, max_tokens=7)
    assert msg.stop_reason == "max_tokens" and msg.usage.output_tokens == 7
    assert len(hf_tokenizer(text_of(msg), add_special_tokens=False)["input_ids"]) == 7


def test_greedy_equals_openai_chat(client, oai, hf_tokenizer):
    """System prompt and several turns: the same text and prompt size as our OpenAI chat route."""
    turns = [{"role": "user", "content": "Name a color."}, {"role": "assistant", "content": "Blue."},
             {"role": "user", "content": "Name another one, and say why you like it."}]
    system = "You are a terse assistant."
    msg = create(client, turns, system=system)
    ref = oai.chat.completions.create(model="any", max_tokens=MAX, temperature=0,
                                      messages=[{"role": "system", "content": system}, *turns])
    assert text_of(msg) == ref.choices[0].message.content
    assert msg.usage.input_tokens == ref.usage.prompt_tokens == \
        len(template_ids(hf_tokenizer, [{"role": "system", "content": system}, *turns]))
    assert msg.usage.output_tokens == ref.usage.completion_tokens
    assert msg.stop_reason == {"stop": "end_turn", "length": "max_tokens"}[ref.choices[0].finish_reason]
    # The system prompt as text blocks is the same prompt.
    blocks = create(client, turns, system=[{"type": "text", "text": system}])
    assert text_of(blocks) == text_of(msg) and blocks.usage.input_tokens == msg.usage.input_tokens


def test_assistant_prefill_is_continued(client, oai, hf_tokenizer):
    prefill = "The capital of France is"
    msg = create(client, [{"role": "user", "content": "What is the capital of France?"},
                          {"role": "assistant", "content": prefill}])
    ids = template_ids(hf_tokenizer, [{"role": "user", "content": "What is the capital of France?"}], prefill)
    assert msg.usage.input_tokens == len(ids)
    # The continuation of exactly those ids, through the completions route.
    ref = oai.completions.create(model="any", prompt=ids, max_tokens=MAX, temperature=0)
    assert text_of(msg) == ref.choices[0].text


def test_stop_sequences(client):
    free = text_of(create(client, USER))
    stop = free[len(free) // 2:][:3]
    assert stop.strip(), free
    msg = create(client, USER, stop_sequences=[stop, "never-appears"])
    assert msg.stop_reason == "stop_sequence" and msg.stop_sequence == stop
    assert text_of(msg) == free[: free.index(stop)]


def test_count_tokens(client, hf_tokenizer):
    system = "Be brief."
    count = client.messages.count_tokens(model="any", messages=USER, system=system)
    assert count.input_tokens == len(template_ids(hf_tokenizer, [{"role": "system", "content": system}, *USER]))


def test_stream(client, hf_tokenizer):
    whole = create(client, USER)
    with client.messages.stream(model="any", max_tokens=MAX, messages=USER, extra_body=GREEDY) as stream:
        pieces = list(stream.text_stream)
        final = stream.get_final_message()
    assert len(pieces) >= 2 and "".join(pieces) == text_of(final) == text_of(whole)
    assert final.stop_reason == whole.stop_reason and final.usage.output_tokens == whole.usage.output_tokens
    assert final.usage.input_tokens == len(template_ids(hf_tokenizer, USER))


def test_stream_events_as_anthropic_sends_them(client, server):
    """The documented order, each event as ``event: <type>`` + ``data: <json with that type>``."""
    order = r"message_start content_block_start (content_block_delta )+content_block_stop message_delta message_stop"
    events = client.messages.create(model="any", max_tokens=MAX, messages=USER, extra_body=GREEDY, stream=True)
    kinds = [event.type for event in events]  # the SDK drops pings
    assert re.fullmatch(order, " ".join(kinds)), kinds
    raw = httpx.post(f"{server.url}/v1/messages", timeout=60,
                     json={"model": "any", "max_tokens": 3, "stream": True, "messages": USER, **GREEDY})
    assert raw.headers["content-type"].startswith("text/event-stream")
    blocks = raw.text.split("\n\n")
    assert blocks[-1] == ""
    events = []
    for block in blocks[:-1]:
        name, data = block.split("\n")
        assert name.startswith("event: ") and data.startswith("data: ")
        events.append(json.loads(data[len("data: "):]))
        assert events[-1]["type"] == name[len("event: "):]
    kinds = [event["type"] for event in events]
    assert re.fullmatch(order.replace("start (", "start ping ("), " ".join(kinds)), kinds
    whole = create(client, USER, max_tokens=3)
    start = events[0]["message"]
    assert start["id"].startswith("msg_") and start["id"] != whole.id
    assert {k: start[k] for k in ("type", "role", "model", "content", "stop_reason", "stop_sequence")} == {
        "type": "message", "role": "assistant", "model": whole.model, "content": [], "stop_reason": None,
        "stop_sequence": None}
    assert start["usage"] == {"input_tokens": whole.usage.input_tokens, "output_tokens": 0}
    assert events[1] == {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}
    deltas = [e for e in events if e["type"] == "content_block_delta"]
    assert all(e["index"] == 0 and e["delta"]["type"] == "text_delta" for e in deltas)
    assert "".join(e["delta"]["text"] for e in deltas) == text_of(whole)
    assert events[-3] == {"type": "content_block_stop", "index": 0}
    assert events[-2] == {"type": "message_delta", "delta": {"stop_reason": whole.stop_reason, "stop_sequence": None},
                          "usage": {"output_tokens": whole.usage.output_tokens}}
    assert events[-1] == {"type": "message_stop"}


# ---- SGLang's extension fields on /v1/messages ---------------------------------------------------

def test_regex_extension(client, oai):
    msg = create(client, USER, max_tokens=16, extra={"regex": PHONE})
    assert re.fullmatch(PHONE, text_of(msg)), text_of(msg)
    assert msg.stop_reason == "end_turn"  # the constraint finished, not the token budget
    # The same constrained greedy text as our OpenAI chat route, and streamed.
    ref = oai.chat.completions.create(model="any", messages=USER, max_tokens=16, temperature=0,
                                      extra_body={"regex": PHONE})
    assert text_of(msg) == ref.choices[0].message.content
    with client.messages.stream(model="any", max_tokens=16, messages=USER,
                                extra_body={**GREEDY, "regex": PHONE}) as stream:
        assert "".join(stream.text_stream) == text_of(msg)


@pytest.mark.parametrize("schema", [SCHEMA, json.dumps(SCHEMA)], ids=["object", "string"])
def test_json_schema_extension(client, schema):
    msg = create(client, CITY, max_tokens=60, extra={"json_schema": schema})
    jsonschema.validate(json.loads(text_of(msg)), SCHEMA)


def test_sampling_extensions(client, hf_tokenizer):
    free = create(client, USER)
    # top_k=1 and min_p=1 each leave only the most likely token: sampling at temperature 1 is greedy.
    for extra in ({"top_k": 1}, {"min_p": 1.0}):
        assert text_of(create(client, USER, extra={"temperature": 1, **extra})) == text_of(free)
    # A stop token id ends the reply before that token (not part of the text), as end_turn.
    ids = hf_tokenizer(text_of(free), add_special_tokens=False)["input_ids"]
    stopped = create(client, USER, extra={"stop_token_ids": [ids[3]]})
    assert stopped.stop_reason == "end_turn" and stopped.usage.output_tokens == 4
    assert text_of(stopped) == text_of(free)[:len(hf_tokenizer.decode(ids[:3]))]
    # ignore_eos: the model runs to max_tokens past where it would end its turn.
    short = create(client, [{"role": "user", "content": "Say only: yes"}], max_tokens=60)
    assert short.stop_reason == "end_turn" and short.usage.output_tokens < 60
    long = create(client, [{"role": "user", "content": "Say only: yes"}], max_tokens=short.usage.output_tokens + 5,
                  extra={"ignore_eos": True})
    assert long.stop_reason == "max_tokens" and long.usage.output_tokens == short.usage.output_tokens + 5


@pytest.mark.parametrize("penalties", [{"frequency_penalty": 1.5, "presence_penalty": 1.0},
                                       {"repetition_penalty": 1.5}], ids=["frequency+presence", "repetition"])
def test_penalties_reach_the_engine(server, client, hf_tokenizer, penalties):
    """A penalised message is what the engine itself generates from the same token ids and the
    same penalties (through the native /generate), and not the unpenalised text."""
    penalised = create(client, USER, max_tokens=24, extra=penalties)
    engine = httpx.post(f"{server.url}/generate", timeout=120, json={
        "input_ids": template_ids(hf_tokenizer, USER),
        "sampling_params": {"max_new_tokens": 24, "temperature": 0, **penalties}}).json()
    assert text_of(penalised) == engine["text"]
    assert text_of(penalised) != text_of(create(client, USER, max_tokens=24))


def test_bad_regex_in_a_stream_is_an_invalid_request_event(server, client):
    """A regex the engine cannot compile, found once the stream's 200 is out: an error event of
    the client's kind, and the server serves on."""
    raw = httpx.post(f"{server.url}/v1/messages", timeout=60,
                     json={"model": "any", "max_tokens": 4, "stream": True, "messages": USER, "regex": "(a"})
    last = json.loads(raw.text.strip().split("\n")[-1][len("data: "):])
    assert last["type"] == "error" and last["error"]["type"] == "invalid_request_error"
    assert last["error"]["message"].startswith("regex: "), last
    assert re.fullmatch(PHONE, text_of(create(client, USER, max_tokens=16, extra={"regex": PHONE})))


@pytest.mark.parametrize("body, message", [
    ({"max_tokens": None}, "max_tokens: Field required"),
    ({"max_tokens": "12"}, "max_tokens: Input should be a valid integer"),
    ({"max_tokens": 0}, "max_tokens: Input should be greater than or equal to 1"),
    ({"max_tokens": 100_000}, "max_tokens: "),
    ({"messages": [{"role": "system", "content": "hi"}]}, "messages.0.role: "),
    ({"messages": [{"role": "user", "content": 7}]}, "messages.0.content: "),
    ({"messages": []}, "messages: at least one message is required"),
    ({"messages": [{"role": "assistant", "content": "Hi"}]}, "messages.0.role: the first message must use the user"),
    ({"messages": [{"role": "user", "content": [
        {"type": "text", "text": "What is this?"},
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}}]}]},
     "messages.0.content.1: image content is not supported"),
    ({"messages": [{"role": "user", "content": [{"type": "document", "source": {}}]}]},
     "messages.0.content.0: 'document' content blocks are not supported"),
    ({"messages": [{"role": "user", "content": ""}, {"role": "assistant", "content": "Hi"}]}, "messages.0: "),
    ({"messages": [*USER, {"role": "assistant", "content": "Sure. "}]},
     "messages: final assistant content cannot end with trailing whitespace"),
    ({"system": [{"type": "image", "source": {}}]}, "system.0: image content is not supported"),
    ({"temperature": "hot"}, "temperature: Input should be a valid number"),
    ({"temperature": 1.5}, "temperature: Input should be less than or equal to 1"),
    ({"top_k": 0}, "top_k: "),
    ({"stop_sequences": "END"}, "stop_sequences: Input should be a valid array"),
    ({"stop_sequences": [""]}, "stop_sequences.0: "),
    ({"tools": [{"name": "f"}]}, "tools.0.input_schema: Field required"),  # more: tests/test_tool_calling.py
    ({"thinking": {"type": "enabled", "budget_tokens": 1024}}, "thinking: this server does not separate reasoning"),
    ({"model": None}, "model: Field required"),
    # SGLang's extensions, checked as our OpenAI frontend checks them.
    ({"regex": "(a"}, "regex: "),
    ({"regex": 7}, "regex: Input should be a valid string"),
    ({"regex": ""}, "regex: must not be empty"),
    ({"json_schema": {"type": "nonsense"}}, "json_schema: "),
    ({"json_schema": "{not json"}, "json_schema: not valid JSON"),
    ({"json_schema": "[1]"}, "json_schema: must be a JSON object"),
    ({"json_schema": {"type": "object"}, "regex": "a+"}, "json_schema: give only one of regex and json_schema"),
    ({"min_p": 2}, "min_p: must be in [0, 1]"),
    ({"stop_token_ids": [10**9]}, "stop_token_ids: token ids must be in"),
    ({"ignore_eos": "yes"}, "ignore_eos: Input should be a valid boolean"),
    ({"min_tokens": 9}, "min_tokens: must be in [0, max_tokens]"),
    ({"frequency_penalty": 5}, "frequency_penalty: must be in [-2, 2]"),
])
def test_bad_input_is_400_in_anthropic_envelope(client, body, message):
    request = {"model": "any", "max_tokens": 4, "messages": USER, **body}
    request = {k: v for k, v in request.items() if v is not None}  # None: leave the field out
    with pytest.raises(anthropic.BadRequestError) as err:
        client.post("/v1/messages", body=request, cast_to=object)
    assert err.value.status_code == 400
    error = err.value.body
    assert error["type"] == "error" and error["error"]["type"] == "invalid_request_error"
    assert error["error"]["message"].startswith(message), error


JSON_LEAF = st.one_of(st.none(), st.booleans(), st.integers(-10**12, 10**12),
                      st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12))
JSON_VALUE = st.recursive(JSON_LEAF, lambda inner: st.lists(inner, max_size=3)
                          | st.dictionaries(st.text(max_size=8), inner, max_size=3), max_leaves=6)
BLOCK = st.one_of(st.fixed_dictionaries({"type": st.sampled_from(["text", "image", "tool_use", 3]),
                                         "text": st.one_of(st.text(max_size=12), JSON_LEAF)}), JSON_VALUE)
CONTENT = st.one_of(st.text(max_size=16), st.lists(BLOCK, max_size=2), JSON_LEAF)
FIELDS = {"model": JSON_LEAF, "system": CONTENT, "stream": JSON_LEAF, "metadata": JSON_VALUE,
          "max_tokens": st.one_of(st.integers(-2, 4), JSON_LEAF), "stop_sequences": JSON_VALUE,
          "temperature": JSON_LEAF, "top_p": JSON_LEAF, "top_k": st.one_of(st.integers(-2, 4), JSON_LEAF),
          "tools": JSON_VALUE, "thinking": JSON_VALUE,
          "regex": st.one_of(st.text(alphabet="ab()[]*+?|.{}0-9\\", max_size=8), JSON_LEAF),
          "json_schema": st.one_of(JSON_VALUE, st.text(max_size=12)), "stop_token_ids": JSON_VALUE,
          "min_p": JSON_LEAF, "ignore_eos": JSON_LEAF}
MESSAGE_BODIES = st.fixed_dictionaries({"messages": st.one_of(
    st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system", 1]), "content": CONTENT}),
             max_size=3), JSON_VALUE)}, optional=FIELDS)


@settings(max_examples=80, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(body=st.one_of(MESSAGE_BODIES.map(lambda b: json.dumps(b, allow_nan=True).encode()),
                      st.binary(max_size=48)))
def test_fuzz_never_5xx(server, body):
    resp = httpx.post(f"{server.url}/v1/messages", content=body, timeout=60,
                      headers={"content-type": "application/json"})
    assert resp.status_code < 500, f"{body[:200]!r} -> {resp.status_code} {resp.text[:300]}"
    if resp.status_code >= 400:
        error = resp.json()
        assert error["type"] == "error" and error["error"]["type"] == "invalid_request_error", error
        assert error["error"]["message"]


def test_server_serves_after_bad_input(client, server):
    resp = httpx.post(f"{server.url}/v1/messages", content=b'{"messages": [', timeout=10,
                      headers={"content-type": "application/json"})
    assert resp.status_code == 400 and resp.json()["error"]["message"].startswith("malformed JSON body")
    assert text_of(create(client, USER, max_tokens=3))
    for bad in ({"regex": "(a"}, {"json_schema": {"type": "nonsense"}}):
        with pytest.raises(anthropic.BadRequestError):
            create(client, USER, max_tokens=3, extra={**bad})
    assert re.fullmatch(PHONE, text_of(create(client, USER, max_tokens=16, extra={"regex": PHONE})))


def test_route_errors_in_anthropic_envelope(server):
    resp = httpx.get(f"{server.url}/v1/messages")
    assert resp.status_code == 405 and resp.json()["type"] == "error"
    # Other APIs keep their own envelope.
    resp = httpx.post(f"{server.url}/v1/chat/completions", json={})
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "messages"


def test_client_disconnect_aborts_and_frees_kv(client, server):
    """A client that leaves mid-stream or mid-request frees its engine request and KV at once
    (the counting continues for thousands of tokens: only an abort ends it within the wait)."""
    with client.messages.stream(model="any", max_tokens=4000, messages=COUNTING, extra_body=GREEDY) as stream:
        for _, _ in zip(stream.text_stream, range(3)):
            pass
    with pytest.raises(httpx.TimeoutException):
        httpx.post(f"{server.url}/v1/messages", timeout=1.0,
                   json={"model": "any", "max_tokens": 4000, "messages": COUNTING, **GREEDY})
    wait_all_memory_free(server)


# ---- the frontend language's backend -----------------------------------------------------------

@pytest.fixture(scope="module")
def backend(server):
    from sglang_core.lang.backends import load_backend

    backend = load_backend("anthropic", "any", base_url=server.url, api_key="unused", max_retries=0)
    yield backend
    backend.shutdown()


def chat_prompt(*messages: dict) -> Prompt:
    """A snapshot inside an open assistant turn, as the interpreter hands it over."""
    return Prompt(text="", messages=(*messages, {"role": "assistant", "content": ""}), open_role="assistant")


def test_backend_generate_matches_the_api(backend, client):
    from sglang_plugins.backends.anthropic.backend import AnthropicBackend

    assert isinstance(backend, AnthropicBackend) and backend.supports_images
    prompt = chat_prompt({"role": "system", "content": "You are a poet."}, *USER)
    result = backend.generate(prompt, GenParams(max_tokens=MAX, temperature=0))
    ref = create(client, USER, system="You are a poet.")
    assert result.text == text_of(ref)
    assert result.meta_info["prompt_tokens"] == ref.usage.input_tokens
    assert result.meta_info["completion_tokens"] == ref.usage.output_tokens
    assert result.meta_info["stop_reason"] == ref.stop_reason


LOCATE = {"name": "locate", "description": "Where a city is",
          "input_schema": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12}},
                           "required": ["city"], "additionalProperties": False}}


@pytest.mark.parametrize("stream", [False, True])
def test_backend_gen_with_tools_reads_the_calls(backend, client, stream):
    """``gen(tools=...)`` (OpenAI function tools, as the language takes them) on sgl.Anthropic: the
    calls are the tool_use blocks the official client gets for the same request."""
    import sglang_core as sgl

    tools = [{"type": "function", "function": {"name": LOCATE["name"], "description": LOCATE["description"],
                                               "parameters": LOCATE["input_schema"]}}]

    @sgl.function
    def ask(s):
        s += sgl.user(USER[0]["content"])
        s += sgl.assistant(sgl.gen("answer", max_tokens=32, temperature=0.0, tools=tools, tool_choice="locate"))

    state = ask.run(backend=backend, stream=stream)
    if stream:
        assert "".join(state.text_iter()) == state.text()
    ref = create(client, USER, max_tokens=32, tools=[LOCATE], tool_choice={"type": "tool", "name": "locate"})
    uses = [(b.name, b.input) for b in ref.content if b.type == "tool_use"]
    calls = state.get_meta_info("answer")["tool_calls"]
    assert [(c["id"][:6], c["name"], json.loads(c["arguments"])) for c in calls] == \
        [("toolu_", name, arguments) for name, arguments in uses] and uses
    assert state["answer"] == "" and state.get_meta_info("answer")["stop_reason"] == ref.stop_reason == "tool_use"


def test_backend_stream_stop_and_max_tokens(backend, client):
    prompt = chat_prompt(*USER)
    whole = backend.generate(prompt, GenParams(max_tokens=MAX, temperature=0))
    *pieces, final = backend.generate_stream(prompt, GenParams(max_tokens=MAX, temperature=0))
    assert len(pieces) >= 2 and all(isinstance(p, str) for p in pieces) and isinstance(final, GenResult)
    assert "".join(pieces) == final.text == whole.text

    stop = whole.text[len(whole.text) // 2:][:3]
    stopped = backend.generate(prompt, GenParams(max_tokens=MAX, temperature=0, stop=(stop,)))
    assert stopped.text == whole.text[: whole.text.index(stop)]
    assert stopped.meta_info["finish_reason"] == {"type": "stop", "matched": stop}

    short = backend.generate(Prompt(text="", messages=tuple(COUNTING)), GenParams(max_tokens=5, temperature=0))
    assert short.meta_info["finish_reason"]["type"] == "length" and short.meta_info["completion_tokens"] == 5


def test_backend_prefill_with_trailing_space(backend, client):
    """The API refuses a prefill ending in whitespace: the backend sends it stripped and drops the
    space the model writes again, streamed or not."""
    question = {"role": "user", "content": "What is the capital of France?"}
    ref = text_of(create(client, [question, {"role": "assistant", "content": "The capital of France is"}]))
    assert ref.startswith(" ")
    prompt = Prompt(text="", messages=(question, {"role": "assistant", "content": "The capital of France is "}),
                    open_role="assistant")
    params = GenParams(max_tokens=MAX, temperature=0)
    assert backend.generate(prompt, params).text == ref[1:]
    *pieces, final = backend.generate_stream(prompt, params)
    assert "".join(pieces) == final.text == ref[1:]


def test_backend_sends_images_as_base64_blocks(backend):
    """Our text-only server names the image block it was sent (messages.0.content.1)."""
    prompt = chat_prompt({"role": "user", "content": [
        {"type": "text", "text": "What is this?"}, {"type": "image", "image": Image(b"\x89PNG\r\n", "image/png")}]})
    with pytest.raises(anthropic.BadRequestError, match=r"messages\.0\.content\.1: image content is not supported"):
        backend.generate(prompt, GenParams(max_tokens=4))


@pytest.fixture(scope="module")
def plain_backend(server):
    """As on Anthropic's own API: no SGLang extensions."""
    from sglang_core.lang.backends import load_backend

    backend = load_backend("anthropic", "any", base_url=server.url, api_key="unused", max_retries=0,
                           sglang_extensions=False)
    yield backend
    backend.shutdown()


def test_backend_extensions_switch(backend, plain_backend):
    from sglang_plugins.backends.anthropic.backend import AnthropicBackend

    assert backend.sglang_extensions and not plain_backend.sglang_extensions  # None: on for our base_url
    assert not AnthropicBackend("any", api_key="x").sglang_extensions
    assert not AnthropicBackend("any", base_url="https://api.anthropic.com", api_key="x").sglang_extensions
    assert AnthropicBackend("any", base_url="https://api.anthropic.com", api_key="x",
                            sglang_extensions=True).sglang_extensions
    with pytest.raises(ValueError, match="^sglang_extensions: "):
        AnthropicBackend("any", api_key="x", sglang_extensions="yes")


def test_backend_regex_and_json_schema(backend, client):
    prompt, params = chat_prompt(*USER), GenParams(max_tokens=16, temperature=0, regex=PHONE)
    out = backend.generate(prompt, params)
    assert re.fullmatch(PHONE, out.text), out.text
    assert out.text == text_of(create(client, USER, max_tokens=16, extra={"regex": PHONE}))
    *pieces, final = backend.generate_stream(prompt, params)
    assert "".join(pieces) == final.text == out.text
    out = backend.generate(chat_prompt(*CITY), GenParams(max_tokens=60, temperature=0, json_schema=json.dumps(SCHEMA)))
    jsonschema.validate(json.loads(out.text), SCHEMA)
    # A program without roles is one user turn, constrained the same way.
    out = backend.generate(Prompt(text="My phone number is "), params)
    assert re.fullmatch(PHONE, out.text), out.text


def test_backend_sampling_extras_reach_the_server(backend, client):
    prompt = Prompt(text="", messages=({"role": "user", "content": "Say only: yes"},))
    short = backend.generate(prompt, GenParams(max_tokens=60, temperature=0))
    assert short.meta_info["stop_reason"] == "end_turn"
    n = short.meta_info["completion_tokens"] + 5
    long = backend.generate(prompt, GenParams(max_tokens=n, temperature=0, ignore_eos=True))
    assert long.meta_info["finish_reason"]["type"] == "length" and long.meta_info["completion_tokens"] == n
    greedy = backend.generate(chat_prompt(*USER), GenParams(max_tokens=MAX, temperature=0))
    assert backend.generate(chat_prompt(*USER), GenParams(max_tokens=MAX, temperature=1.0, min_p=1.0)).text \
        == greedy.text
    penalties = {"frequency_penalty": 1.5, "presence_penalty": 1.0}
    ref = create(client, USER, max_tokens=24, extra={**penalties})  # the route honours them (test above)
    penalised = backend.generate(chat_prompt(*USER), GenParams(max_tokens=24, temperature=0, **penalties)).text
    assert penalised == text_of(ref) != backend.generate(chat_prompt(*USER), GenParams(max_tokens=24,
                                                                                       temperature=0)).text


def test_backend_select_by_regex(backend, hf_model, hf_tokenizer):
    """Greedy under the choices' regex: the first token decides (the choices start with distinct
    characters), so the pick is the choice that starts with the most likely token, by Hugging Face,
    of those that begin some choice."""
    question = {"role": "user", "content": "What is the capital of France?"}
    choices = ["London", "Paris", "Berlin", "Rome or Paris"]
    result = backend.select(chat_prompt(question), choices, temperature=0.0)
    with torch.no_grad():
        last = hf_model(torch.tensor([template_ids(hf_tokenizer, [question])])).logits[0, -1]
    pieces = hf_tokenizer.batch_decode([[i] for i in range(len(hf_tokenizer))])
    starts = [i for i, p in enumerate(pieces) if p and any(c.startswith(p) for c in choices)]
    best = pieces[max(starts, key=lambda i: float(last[i]))]
    expected = next(c for c in choices if c.startswith(best))
    assert result.choice == expected and result.index == choices.index(expected)
    assert result.scores == [float(c == expected) for c in choices]
    assert result.meta_info["strategy"] == "constrained generation (regex)"
    with pytest.raises(UnsupportedError, match="^method: "):
        backend.select(chat_prompt(question), choices, 0.0, "greedy_token_selection")
    with pytest.raises(ValueError, match="^choices: "):
        backend.select(chat_prompt(question), [], 0.0)


@pytest.mark.parametrize("params, field", [
    (GenParams(regex="[a-z]+"), "regex"), (GenParams(json_schema='{"type": "object"}'), "json_schema"),
    (GenParams(stop_token_ids=(2,)), "stop_token_ids"), (GenParams(frequency_penalty=0.5), "frequency_penalty"),
    (GenParams(min_p=0.1), "min_p"), (GenParams(ignore_eos=True), "ignore_eos"),
    (GenParams(return_logprob=True), "return_logprob"),
])
def test_backend_without_extensions_refuses_what_the_api_cannot_do(plain_backend, params, field):
    with pytest.raises(UnsupportedError, match=f"^{field}: "):
        plain_backend.generate(chat_prompt(*USER), params)


def test_backend_refuses_logprobs_even_with_extensions(backend):
    for params, field in ((GenParams(return_logprob=True), "return_logprob"),
                          (GenParams(top_logprobs_num=2), "top_logprobs_num")):
        with pytest.raises(UnsupportedError, match=f"^{field}: .*no place for them"):
            backend.generate(chat_prompt(*USER), params)


def test_backend_select_is_unsupported_without_extensions(plain_backend):
    with pytest.raises(UnsupportedError, match="^select: .*no logprobs"):
        plain_backend.select(chat_prompt(*USER), ["yes", "no"], temperature=0.0)


def test_backend_without_the_sdk(monkeypatch):
    from sglang_plugins.backends.anthropic.backend import AnthropicBackend

    monkeypatch.setitem(sys.modules, "anthropic", None)  # `import anthropic` now raises ImportError
    with pytest.raises(MissingExtraError, match=re.escape("pip install 'sglang-core[anthropic]'")):
        AnthropicBackend("any")

"""The OpenAI-compatible frontend, driven by the real ``openai`` client against a real server
running the embedded default model (SmolLM2-135M-Instruct)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time

import httpx
import openai
import pytest
import torch

from sglang_core.server.chat_templates import resolve_chat_template
from sglang_plugins.frontends.openai.generation import Choice
from sglang_plugins.frontends.openai.routes import CHAT as CHAT_SHAPE, Plan, event_stream

MAX = 12  # generated tokens per request: keeps the file fast on CPU
CHAT = [{"role": "user", "content": "Write a short poem about the sea."}]
PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def server(lang_server):
    return lang_server  # the default model's session-wide server (conftest.py)


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)


@pytest.fixture(scope="module")
def model(client) -> str:
    return client.models.list().data[0].id


def greedy_reference(hf_model, ids: list[int], steps: int) -> tuple[list[int], torch.Tensor]:
    """Greedy continuation by Hugging Face, and log_softmax at every position of the result."""
    ids, threads = list(ids), torch.get_num_threads()
    # One thread: two busy-waiting OpenMP threads on a loaded 2-core machine run ~10x slower.
    torch.set_num_threads(1)
    try:
        with torch.no_grad():
            for _ in range(steps):
                ids.append(int(hf_model(torch.tensor([ids])).logits[0, -1].argmax()))
            logprobs = torch.log_softmax(hf_model(torch.tensor([ids])).logits[0].double(), dim=-1)
    finally:
        torch.set_num_threads(threads)
    return ids, logprobs


def chat_prompt_ids(hf_tokenizer, messages) -> list[int]:
    text = hf_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return hf_tokenizer(text, add_special_tokens=False)["input_ids"]


def running_requests(server) -> float:
    for line in httpx.get(server.url + "/metrics").text.splitlines():
        if line.startswith("sglang_num_running_reqs "):
            return float(line.split()[1])
    raise AssertionError("no running-requests gauge in /metrics")


def sse_payloads(server, path: str, body: dict) -> list[str]:
    """A streamed response read off the wire (httpx, no OpenAI client): each event's data, in order.
    Every event must be exactly one ``data: `` line, as OpenAI sends them."""
    with httpx.stream("POST", server.url + path, json=body, timeout=120) as resp:
        assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
        raw = resp.read().decode()
    events = raw.split("\n\n")
    assert events[-1] == "", raw[-200:]  # the stream ends with a whole event
    payloads = []
    for event in events[:-1]:
        assert event.startswith("data: ") and "\n" not in event, event
        payloads.append(event[len("data: "):])
    assert payloads[-1] == "[DONE]" and payloads.count("[DONE]") == 1, payloads[-3:]
    return payloads


def check_head(obj: dict, id_prefix: str, obj_type: str, model: str, since: float) -> None:
    """The fields every OpenAI response and chunk carries (id, object, created, model)."""
    assert obj["id"].startswith(id_prefix) and len(obj["id"]) > len(id_prefix)
    assert obj["object"] == obj_type and obj["model"] == model
    assert isinstance(obj["created"], int) and since - 1 <= obj["created"] <= time.time() + 1


# ---- models ---------------------------------------------------------------------------------

def test_models(client, model):
    models = client.models.list().data
    assert [m.id for m in models] == [model] and models[0].object == "model"
    assert client.models.retrieve(model).id == model
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")


# ---- chat -----------------------------------------------------------------------------------

def test_chat(client, model, hf_tokenizer):
    since = time.time()
    resp = client.chat.completions.create(model=model, messages=CHAT, max_tokens=MAX, temperature=0)
    check_head(resp.model_dump(), "chatcmpl-", "chat.completion", model, since)
    assert client.chat.completions.create(model=model, messages=CHAT, max_tokens=1).id != resp.id
    (choice,) = resp.choices
    assert choice.index == 0 and choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason in ("stop", "length") and choice.logprobs is None
    usage = resp.usage
    assert usage.prompt_tokens == len(chat_prompt_ids(hf_tokenizer, CHAT))
    assert 0 < usage.completion_tokens <= MAX
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert 0 <= usage.prompt_tokens_details.cached_tokens < usage.prompt_tokens


def test_chat_content_parts_and_roles(client, model):
    messages = [{"role": "system", "content": "You are terse."},
                {"role": "user", "content": [{"type": "text", "text": "Name a color."}]},
                {"role": "assistant", "content": "Blue."},
                {"role": "user", "content": "Another one?"}]
    resp = client.chat.completions.create(model=model, messages=messages, max_completion_tokens=4, temperature=0)
    assert resp.choices[0].message.content and resp.usage.completion_tokens <= 4


def test_chat_logprobs_match_reference(client, model, hf_tokenizer, hf_model):
    resp = client.chat.completions.create(model=model, messages=CHAT, max_tokens=8, temperature=0,
                                          logprobs=True, top_logprobs=3)
    content = resp.choices[0].logprobs.content
    assert content and "".join(t.token for t in content) == resp.choices[0].message.content
    prompt = chat_prompt_ids(hf_tokenizer, CHAT)
    ids, ref = greedy_reference(hf_model, prompt, len(content))
    for i, entry in enumerate(content):
        pos, token_id = len(prompt) + i - 1, ids[len(prompt) + i]
        assert entry.token == hf_tokenizer.decode([token_id])
        assert entry.bytes == list(entry.token.encode())
        assert entry.logprob == pytest.approx(float(ref[pos, token_id]), abs=1e-3)
        top_values, top_ids = ref[pos].topk(3)
        assert [t.token for t in entry.top_logprobs] == [hf_tokenizer.decode([t]) for t in top_ids.tolist()]
        assert [t.logprob for t in entry.top_logprobs] == pytest.approx(top_values.tolist(), abs=1e-3)


def test_chat_n_and_seed(client, model):
    """Each of n seeded choices is sampled on its own (distinct texts at temperature 1), and the
    whole response repeats for the same seed."""
    kwargs = dict(model=model, messages=CHAT, max_tokens=16, temperature=1.0, seed=1234)
    first = client.chat.completions.create(n=3, **kwargs)
    assert [c.index for c in first.choices] == [0, 1, 2]
    texts = [c.message.content for c in first.choices]
    assert len(set(texts)) == 3, texts
    assert all(c.finish_reason in ("stop", "length") and c.message.role == "assistant" for c in first.choices)
    again = client.chat.completions.create(n=3, **kwargs)
    assert [c.message.content for c in again.choices] == texts


# ---- completions ----------------------------------------------------------------------------

def test_completion(client, model, hf_tokenizer):
    since = time.time()
    resp = client.completions.create(model=model, prompt=PROMPT, max_tokens=MAX, temperature=0)
    check_head(resp.model_dump(), "cmpl-", "text_completion", model, since)
    (choice,) = resp.choices
    assert choice.index == 0 and choice.text and choice.finish_reason in ("stop", "length")
    assert resp.usage.prompt_tokens == len(hf_tokenizer(PROMPT)["input_ids"])
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + resp.usage.completion_tokens


def test_completion_default_max_tokens_is_16(client, model):
    resp = client.completions.create(model=model, prompt=PROMPT, temperature=0, extra_body={"ignore_eos": True})
    assert resp.usage.completion_tokens == 16 and resp.choices[0].finish_reason == "length"


def test_completion_prompt_forms(client, model, hf_tokenizer):
    ids = hf_tokenizer(PROMPT)["input_ids"]
    by_text = client.completions.create(model=model, prompt=PROMPT, max_tokens=6, temperature=0)
    by_ids = client.completions.create(model=model, prompt=ids, max_tokens=6, temperature=0)
    assert by_ids.choices[0].text == by_text.choices[0].text
    # A batch of prompts: each prompt's n choices in turn, each what that prompt alone gives.
    alone = [client.completions.create(model=model, prompt=p, max_tokens=4, temperature=0).choices[0].text
             for p in (ids, ids[:2])]
    batch = client.completions.create(model=model, prompt=[ids, ids[:2]], max_tokens=4, temperature=0, n=2)
    assert [c.index for c in batch.choices] == [0, 1, 2, 3]
    assert [c.text for c in batch.choices] == [alone[0], alone[0], alone[1], alone[1]]
    assert batch.usage.prompt_tokens == len(ids) + 2  # each prompt counts once, whatever n
    strings = client.completions.create(model=model, prompt=[PROMPT, "Hello"], max_tokens=4, temperature=0)
    assert [c.index for c in strings.choices] == [0, 1]
    assert strings.choices[0].text == alone[0] and strings.choices[1].text == client.completions.create(
        model=model, prompt="Hello", max_tokens=4, temperature=0).choices[0].text


def test_completion_echo_and_logprobs_match_reference(client, model, hf_tokenizer, hf_model):
    resp = client.completions.create(model=model, prompt=PROMPT, max_tokens=6, temperature=0, echo=True, logprobs=2)
    choice = resp.choices[0]
    lp = choice.logprobs
    assert choice.text.startswith(PROMPT) and "".join(lp.tokens) == choice.text
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]
    prompt = hf_tokenizer(PROMPT)["input_ids"]
    ids, ref = greedy_reference(hf_model, prompt, len(lp.tokens) - len(prompt))
    assert lp.tokens == [hf_tokenizer.decode([t]) for t in ids]
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    for i in range(1, len(ids)):
        assert lp.token_logprobs[i] == pytest.approx(float(ref[i - 1, ids[i]]), abs=1e-3)
        top_values, top_ids = ref[i - 1].topk(2)
        expected = {hf_tokenizer.decode([t]): v for t, v in zip(top_ids.tolist(), top_values.tolist())}
        expected[lp.tokens[i]] = float(ref[i - 1, ids[i]])  # the token itself is always listed
        assert lp.top_logprobs[i] == pytest.approx(expected, abs=1e-3)


def test_completion_stop(client, model):
    free = client.completions.create(model=model, prompt=PROMPT, max_tokens=MAX, temperature=0,
                                     extra_body={"ignore_eos": True}).choices[0].text
    stop = free[len(free) // 2 :][:3]
    assert stop.strip(), free
    stopped = client.completions.create(model=model, prompt=PROMPT, max_tokens=MAX, temperature=0,
                                        stop=[stop, "never-appears"]).choices[0]
    assert stopped.finish_reason == "stop" and stopped.text == free[: free.index(stop)]
    # Streamed, no piece runs past where the stop string begins (nothing is shown, then taken back).
    shown = ""
    for chunk in client.completions.create(model=model, prompt=PROMPT, max_tokens=MAX, temperature=0,
                                           stop=[stop, "never-appears"], stream=True):
        shown += chunk.choices[0].text
        assert stopped.text.startswith(shown), (shown, stopped.text)
    assert shown == stopped.text


def test_completion_seed(client, model):
    kwargs = dict(model=model, prompt=PROMPT, max_tokens=8, temperature=1.0, seed=42)
    assert client.completions.create(**kwargs).choices[0].text == client.completions.create(**kwargs).choices[0].text


@pytest.mark.parametrize("penalties", [{"frequency_penalty": 1.5, "presence_penalty": 1.0},
                                       {"repetition_penalty": 1.5}], ids=["frequency+presence", "repetition"])
def test_penalties_reach_the_engine(server, client, model, hf_tokenizer, penalties):
    """A penalised chat is what the engine itself generates from the same token ids and the same
    penalties (through the native /generate), and not the unpenalised text."""
    standard = {k: v for k, v in penalties.items() if k != "repetition_penalty"}  # OpenAI's own fields
    extension = {k: v for k, v in penalties.items() if k not in standard}  # SGLang's, in the body
    resp = client.chat.completions.create(model=model, messages=CHAT, max_tokens=24, temperature=0,
                                          extra_body=extension, **standard)
    engine = httpx.post(server.url + "/generate", timeout=120, json={
        "input_ids": chat_prompt_ids(hf_tokenizer, CHAT),
        "sampling_params": {"max_new_tokens": 24, "temperature": 0, **penalties}}).json()
    plain = client.chat.completions.create(model=model, messages=CHAT, max_tokens=24, temperature=0)
    assert resp.choices[0].message.content == engine["text"]
    assert resp.choices[0].message.content != plain.choices[0].message.content


def test_json_object_response_format_is_a_json_object(client, model):
    resp = client.chat.completions.create(
        model=model, max_tokens=64, temperature=0, response_format={"type": "json_object"},
        messages=[{"role": "user", "content": "Describe a cat as a JSON object with a name and an age."}])
    choice = resp.choices[0]
    assert choice.finish_reason == "stop"  # the object closed: the whole output must parse
    assert isinstance(json.loads(choice.message.content), dict), choice.message.content


# ---- streaming ------------------------------------------------------------------------------

def test_chat_stream_matches_non_stream(client, model):
    kwargs = dict(model=model, messages=CHAT, max_tokens=MAX, temperature=0, logprobs=True)
    since = time.time()
    whole = client.chat.completions.create(**kwargs)
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs))
    for c in chunks:
        check_head(c.model_dump(), "chatcmpl-", "chat.completion.chunk", model, since)
    assert {c.id for c in chunks} == {chunks[0].id} != {whole.id}
    assert chunks[0].choices[0].delta.role == "assistant"
    *body, last = chunks
    assert last.choices == [] and last.usage.completion_tokens == whole.usage.completion_tokens
    assert last.usage.prompt_tokens == whole.usage.prompt_tokens
    assert all(c.usage is None for c in body)
    assert "".join(c.choices[0].delta.content or "" for c in body) == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in body if c.choices[0].finish_reason] == [whole.choices[0].finish_reason]
    streamed = [t for c in body if c.choices[0].logprobs for t in c.choices[0].logprobs.content]
    expected = whole.choices[0].logprobs.content
    assert [t.token for t in streamed] == [t.token for t in expected]
    # The prompt is cached for the second request: its logprobs may differ in the last digits.
    assert [t.logprob for t in streamed] == pytest.approx([t.logprob for t in expected], abs=1e-4)


def test_chat_stream_on_the_wire(server, model, hf_tokenizer):
    """Chunks as OpenAI documents them, read without the client: one id, created and model on
    every chunk; each choice opens with the assistant role and ends with one finish_reason; with
    include_usage a last chunk of no choices carries the usage; then ``[DONE]``, once."""
    since = time.time()
    payloads = sse_payloads(server, "/v1/chat/completions", {
        "model": model, "messages": CHAT, "max_tokens": 6, "temperature": 0, "n": 2, "stream": True,
        "stream_options": {"include_usage": True}})
    chunks = [json.loads(p) for p in payloads[:-1]]
    for chunk in chunks:
        check_head(chunk, "chatcmpl-", "chat.completion.chunk", model, since)
    assert len({c["id"] for c in chunks}) == 1 and len({c["created"] for c in chunks}) == 1
    *body, last = chunks
    assert last["choices"] == [] and all(c.get("usage") is None for c in body)
    for index in (0, 1):
        mine = [choice for c in body for choice in c["choices"] if choice["index"] == index]
        assert all(set(choice) == {"index", "delta", "logprobs", "finish_reason"} for choice in mine)
        assert mine[0]["delta"] == {"role": "assistant", "content": ""}
        assert [choice["finish_reason"] for choice in mine][-1] in ("stop", "length")
        assert all(choice["finish_reason"] is None for choice in mine[:-1])
    usage = last["usage"]
    assert usage["prompt_tokens"] == len(chat_prompt_ids(hf_tokenizer, CHAT))  # once, however many choices
    assert 0 < usage["completion_tokens"] <= 12
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


def test_completion_stream_on_the_wire(server, model):
    since = time.time()
    payloads = sse_payloads(server, "/v1/completions", {"model": model, "prompt": PROMPT, "max_tokens": 4,
                                                        "temperature": 0, "stream": True})
    chunks = [json.loads(p) for p in payloads[:-1]]
    for chunk in chunks:
        check_head(chunk, "cmpl-", "text_completion", model, since)
        (choice,) = chunk["choices"]
        assert set(choice) == {"index", "text", "logprobs", "finish_reason"} and choice["index"] == 0
        assert "usage" not in chunk or chunk["usage"] is None  # no include_usage: no usage
    assert len({c["id"] for c in chunks}) == 1
    reasons = [c["choices"][0]["finish_reason"] for c in chunks]
    assert reasons[-1] == "length" and reasons[:-1] == [None] * (len(chunks) - 1)


def test_error_envelope_on_the_wire(server, model):
    """OpenAI's error object, whole or asked to stream: a 400 (no stream is begun) whose body is
    exactly ``{"error": {"message", "type", "param", "code"}}``."""
    for stream in (False, True):
        resp = httpx.post(server.url + "/v1/chat/completions", timeout=60, json={
            "model": model, "messages": CHAT, "max_tokens": 4, "temperature": -1, "stream": stream})
        assert resp.status_code == 400 and resp.headers["content-type"].startswith("application/json")
        error = resp.json()["error"]
        assert set(resp.json()) == {"error"} and set(error) == {"message", "type", "param", "code"}
        assert error["type"] == "invalid_request_error" and error["param"] == "temperature"
        assert error["message"].startswith("temperature: ") and error["code"] in (None, "400")


def test_completion_stream_matches_non_stream(client, model):
    kwargs = dict(model=model, prompt=PROMPT, max_tokens=MAX, temperature=0, echo=True)
    whole = client.completions.create(**kwargs)
    chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs))
    *body, last = chunks
    assert last.choices == [] and last.usage.total_tokens == whole.usage.total_tokens
    assert "".join(c.choices[0].text for c in body) == whole.choices[0].text
    assert body[-1].choices[0].finish_reason == whole.choices[0].finish_reason


def test_stream_n_interleaves_indices(client, model):
    stream = client.completions.create(model=model, prompt=PROMPT, max_tokens=6, temperature=1.0, n=3, seed=3,
                                       stream=True)
    texts, finished = {}, []
    for chunk in stream:
        (c,) = chunk.choices
        texts[c.index] = texts.get(c.index, "") + c.text
        if c.finish_reason:
            finished.append(c.index)
    assert sorted(texts) == sorted(finished) == [0, 1, 2]


def test_async_client_concurrent(server, model):
    async def run() -> None:
        async with openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0) as aclient:
            chats = [aclient.chat.completions.create(model=model, messages=CHAT, max_tokens=6, temperature=0)
                     for _ in range(3)]
            completion = aclient.completions.create(model=model, prompt=PROMPT, max_tokens=6, temperature=0)
            results = await asyncio.gather(*chats, completion)
            assert all(r.choices[0].message.content for r in results[:3]) and results[3].choices[0].text
            stream = await aclient.chat.completions.create(model=model, messages=CHAT, max_tokens=6, temperature=0,
                                                           stream=True)
            text = "".join([c.choices[0].delta.content or "" async for c in stream])
            assert text == results[0].choices[0].message.content  # same greedy text, batched or not

    asyncio.run(run())


def test_client_disconnect_aborts(server, client, model):
    """A client that leaves mid-stream or mid-request frees its engine request at once."""
    stream = client.completions.create(model=model, prompt=PROMPT, max_tokens=4000, temperature=0, stream=True,
                                       extra_body={"ignore_eos": True})
    for _, _ in zip(stream, range(3)):
        pass
    stream.close()
    with pytest.raises(httpx.TimeoutException):
        httpx.post(server.url + "/v1/completions", timeout=1.0,
                   json={"model": model, "prompt": PROMPT, "max_tokens": 4000, "ignore_eos": True})
    deadline = time.monotonic() + 15
    while running_requests(server) != 0:
        assert time.monotonic() < deadline, "the abandoned requests are still running"
        time.sleep(0.2)


# ---- errors ---------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, param", [
    ({"temperature": -1}, "temperature"),
    ({"temperature": "hot"}, "temperature"),
    ({"max_tokens": 100_000}, "max_tokens"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     "messages.0.content.0"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "array"}}}]},
     "tools.0.function.parameters"),  # more bad tools: tests/test_tool_calling.py
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format.json_schema.schema"),
    ({"response_format": {"type": "yaml"}}, "response_format.type"),
    ({"response_format": {"type": "json_object"}, "extra_body": {"regex": "a+"}}, "response_format"),
    ({"top_logprobs": 30, "logprobs": True}, "top_logprobs"),
    ({"extra_body": {"regex": "(a"}}, "regex"),
    ({"extra_body": {"json_schema": {"type": "nonsense"}}}, "json_schema"),
    ({"extra_body": {"ebnf": "root ::= 'a'"}}, "ebnf"),
])
def test_chat_errors(client, model, kwargs, param):
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(**{"model": model, "messages": CHAT, "max_tokens": 4, **kwargs})
    assert err.value.param == param and err.value.body["type"] == "invalid_request_error"
    assert err.value.body["message"].startswith(param)


@pytest.mark.parametrize("kwargs, param", [
    ({"prompt": ""}, "prompt"),
    ({"prompt": [1, 10**9]}, "prompt"),
    ({"prompt": "hi " * 9000}, "prompt"),
    ({"suffix": "the end"}, "suffix"),
    ({"best_of": 3}, "best_of"),
    ({"n": 0}, "n"),
])
def test_completion_errors(client, model, kwargs, param):
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(**{"model": model, "prompt": PROMPT, "max_tokens": 4, **kwargs})
    assert err.value.param == param


def test_malformed_json_then_server_still_works(server, client, model):
    resp = httpx.post(server.url + "/v1/chat/completions", content=b'{"messages": [', timeout=10,
                      headers={"content-type": "application/json"})
    assert resp.status_code == 400 and "malformed JSON" in resp.json()["error"]["message"]
    resp = client.chat.completions.create(model=model, messages=CHAT, max_tokens=4, temperature=0)
    assert resp.choices[0].message.content


# ---- without a server ---------------------------------------------------------------------

def test_chat_templates(hf_tokenizer, tmp_path):
    hi = [{"role": "user", "content": "hi"}]

    def render(name: str) -> str:
        return hf_tokenizer.apply_chat_template(hi, chat_template=resolve_chat_template(name), tokenize=False,
                                             add_generation_prompt=True)

    assert render("chatml") == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert render("llama-3").endswith("<|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>"
                                      "<|start_header_id|>assistant<|end_header_id|>\n\n")
    (tmp_path / "t.jinja").write_text("{{ messages[0]['content'] }}!")
    assert render(str(tmp_path / "t.jinja")) == "hi!"
    assert resolve_chat_template(None) is None
    with pytest.raises(ValueError, match="chat_template: 'nope' is neither a file nor a built-in.*chatml"):
        resolve_chat_template("nope")


class _AbortingContext:
    """Just enough of ServerContext: one engine request that streams a token, then is aborted."""

    model_name = "m"
    closed = False

    def admission(self):
        return contextlib.nullcontext()

    async def stream(self, **kwargs):
        meta = {"prompt_tokens": 3, "completion_tokens": 1, "cached_tokens": 0, "finish_reason": None}
        try:
            yield {"text": "Hi", "output_ids": [7], "meta_info": meta}
            reason = {"type": "abort", "message": "the KV cache cannot hold this request"}
            yield {"text": "", "output_ids": [7], "meta_info": {**meta, "finish_reason": reason}}
        finally:
            self.closed = True


def test_stream_reports_abort_as_error_event_then_done():
    ctx = _AbortingContext()

    async def run() -> list[str]:
        head = {"id": "chatcmpl-1", "object": "chat.completion", "created": 0, "model": "m"}
        return [e async for e in event_stream(ctx, CHAT_SHAPE, head, Plan([Choice(0)], [{}], 1), False)]

    events = [e for e in asyncio.run(run()) if e]
    assert [json.loads(e[6:])["choices"][0]["delta"] for e in events[:2]] == [
        {"role": "assistant", "content": ""}, {"content": "Hi"}]
    error = json.loads(events[2][6:])["error"]
    assert error["code"] == "500" and "KV cache" in error["message"]
    assert events[3] == "data: [DONE]\n\n" and ctx.closed

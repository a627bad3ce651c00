"""The native /generate API and server routes over raw HTTP, wire-compatible with SGLang 0.2.10."""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest
import torch

GREEDY = {"temperature": 0, "ignore_eos": True}
PROMPT = "The quick brown fox jumps over the lazy dog because"
LONG_PROMPT = " ".join(["Rivers carry stones from the mountains down to the wide green sea."] * 12)


@pytest.fixture(scope="module")
def client(lang_server):
    """On the default model's session-wide server (conftest.py); that an API key guards these
    routes and never shows in them is tested on keyed servers (test_api_hardening,
    test_server_robustness)."""
    with httpx.Client(base_url=lang_server.url, timeout=120) as client:
        yield client


def generate(client: httpx.Client, **body) -> dict | list:
    resp = client.post("/generate", json=body)
    assert resp.status_code == 200, resp.text
    return resp.json()


def stream_events(client: httpx.Client, **body) -> list[dict]:
    """The SSE events of a streamed /generate, checking the framing; ends with [DONE]."""
    with client.stream("POST", "/generate", json={**body, "stream": True}) as resp:
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("text/event-stream")
        raw = resp.read().decode()
    assert raw.endswith("data: [DONE]\n\n")
    frames = raw.split("\n\n")[:-1]
    assert all(f.startswith("data: ") and "\n" not in f for f in frames)
    return [json.loads(f[len("data: "):]) for f in frames[:-1]]


def wait_until(client: httpx.Client, idle: bool, wait_s: float = 20) -> dict:
    """Poll the memory report until no request is (idle) or some request is (not idle) in the engine."""
    deadline = time.monotonic() + wait_s
    while True:
        mem = client.get("/get_server_info").json()["memory"]
        if (mem["running"] + mem["waiting"] == 0) == idle:
            return mem
        assert time.monotonic() < deadline, f"engine never became {'idle' if idle else 'busy'}: {mem}"
        time.sleep(0.05)


# ---- /generate ----------------------------------------------------------------------------------

def test_single_and_batch_text_and_input_ids(client):
    params = {**GREEDY, "max_new_tokens": 6}
    one = generate(client, text=PROMPT, sampling_params=params)
    assert set(one) == {"text", "meta_info"} and one["text"]
    meta = one["meta_info"]
    assert meta["completion_tokens"] == 6 and meta["prompt_tokens"] > 5 and meta["id"]
    assert meta["finish_reason"] == {"type": "length", "length": 6}

    batch = generate(client, text=[PROMPT, "Hello"], sampling_params=params)
    assert isinstance(batch, list) and len(batch) == 2 and batch[0]["text"] == one["text"]
    from_ids = generate(client, input_ids=[[1, 2, 3, 4], [9, 8]], sampling_params=params, rid=["ids-a", "ids-b"])
    assert [r["meta_info"]["prompt_tokens"] for r in from_ids] == [4, 2]
    assert [r["meta_info"]["id"] for r in from_ids] == ["ids-a", "ids-b"]
    single_ids = generate(client, input_ids=[1, 2, 3, 4], sampling_params=params)
    assert isinstance(single_ids, dict) and single_ids["text"] == from_ids[0]["text"]


def test_per_item_sampling_params_and_n(client):
    out = generate(client, input_ids=[[5, 6, 7], [5, 6, 7]],
                   sampling_params=[{**GREEDY, "max_new_tokens": 3}, {**GREEDY, "max_new_tokens": 5}])
    assert [r["meta_info"]["completion_tokens"] for r in out] == [3, 5]
    copies = generate(client, text="Once upon a time", sampling_params={"max_new_tokens": 4, "n": 2, "seed": 7})
    assert isinstance(copies, list) and len(copies) == 2  # SGLang answers n > 1 with a list


def test_stream_framing_and_equals_non_stream(client):
    params = {**GREEDY, "max_new_tokens": 8}
    events = stream_events(client, text=PROMPT, sampling_params=params)
    texts = [e["text"] for e in events]
    assert all(b.startswith(a) for a, b in zip(texts, texts[1:]))  # the whole text so far, growing
    assert all(e["meta_info"]["finish_reason"] is None for e in events[:-1])
    assert events[-1]["meta_info"]["finish_reason"] == {"type": "length", "length": 8}
    assert texts[-1] == generate(client, text=PROMPT, sampling_params=params)["text"]


def test_batch_stream_tags_each_event_with_its_index(client):
    params = {**GREEDY, "max_new_tokens": 5}
    prompts = [PROMPT, "Hello there"]
    events = stream_events(client, text=prompts, sampling_params=params)
    final = {e["index"]: e["text"] for e in events if e["meta_info"]["finish_reason"] is not None}
    assert final == {i: r["text"] for i, r in enumerate(generate(client, text=prompts, sampling_params=params))}


def test_logprobs_match_hf(client, hf_model):
    prompt_ids = [504, 2365, 6354, 16438, 18401, 690, 260, 23790, 2767]
    out = generate(client, input_ids=prompt_ids, sampling_params={**GREEDY, "max_new_tokens": 8},
                   return_logprob=True, logprob_start_len=0, top_logprobs_num=3)
    meta = out["meta_info"]
    output_ids = [t[1] for t in meta["output_token_logprobs"]]
    assert len(output_ids) == 8
    with torch.no_grad():
        logits = hf_model(torch.tensor([prompt_ids + output_ids])).logits[0]
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    p = len(prompt_ids)

    first, *rest = meta["input_token_logprobs"]
    assert first == [None, prompt_ids[0], None]
    assert [t[1] for t in rest] == prompt_ids[1:]
    expected_in = [logprobs[k - 1, prompt_ids[k]].item() for k in range(1, p)]
    assert [t[0] for t in rest] == pytest.approx(expected_in, abs=1e-3)
    expected_out = [logprobs[p - 1 + t, tok].item() for t, tok in enumerate(output_ids)]
    assert [t[0] for t in meta["output_token_logprobs"]] == pytest.approx(expected_out, abs=1e-3)
    assert output_ids == [int(logprobs[p - 1 + t].argmax()) for t in range(8)]  # greedy
    for top, chosen in zip(meta["output_top_logprobs"], meta["output_token_logprobs"]):
        assert len(top) == 3 and top[0][:2] == chosen[:2]
    assert len(meta["input_top_logprobs"]) == p
    assert meta["normalized_prompt_logprob"] == pytest.approx(sum(expected_in) / len(expected_in), abs=1e-3)


def test_return_text_in_logprobs_and_logprob_start_len(client):
    out = generate(client, text=PROMPT, sampling_params={**GREEDY, "max_new_tokens": 3}, return_logprob=True,
                   logprob_start_len=2, return_text_in_logprobs=True)
    meta = out["meta_info"]
    assert len(meta["input_token_logprobs"]) == meta["prompt_tokens"] - 2
    assert "".join(t[2] for t in meta["output_token_logprobs"]) == out["text"]
    assert all(isinstance(t[2], str) for t in meta["input_token_logprobs"])


def test_max_new_tokens_zero_caches_the_prompt(client, hf_model):
    text = LONG_PROMPT + " prefill only"
    out = generate(client, text=text, sampling_params={"max_new_tokens": 0})
    meta = out["meta_info"]
    assert out["text"] == "" and meta["completion_tokens"] == 0
    assert meta["finish_reason"] == {"type": "length", "length": 0}
    again = generate(client, text=text, sampling_params={**GREEDY, "max_new_tokens": 2})["meta_info"]
    assert again["cached_tokens"] >= again["prompt_tokens"] - 1 > 0
    # SGLang's `select`: a batch of prefill-only requests scored by their prompt logprobs.
    scored = generate(client, text=[text + " yes", text + " no"], sampling_params={"max_new_tokens": 0},
                      return_logprob=True, logprob_start_len=5)
    for item, suffix in zip(scored, [" yes", " no"]):
        meta = item["meta_info"]
        assert item["text"] == "" and meta["output_token_logprobs"] == []
        # Each prompt token's logprob from position 5 on, as HF transformers (float32) computes it.
        ids = client.post("/tokenize", json={"text": text + suffix}).json()["input_ids"]
        assert meta["prompt_tokens"] == len(ids)
        with torch.no_grad():
            reference = torch.log_softmax(hf_model(torch.tensor([ids])).logits[0].double(), dim=-1)
        expected = [float(reference[i - 1, ids[i]]) for i in range(5, len(ids))]
        assert [tid for _, tid, _ in meta["input_token_logprobs"]] == ids[5:]
        assert [lp for lp, _, _ in meta["input_token_logprobs"]] == pytest.approx(expected, abs=1e-3)
        assert meta["normalized_prompt_logprob"] == pytest.approx(sum(expected) / len(expected), abs=1e-3)


def test_repeated_long_prompt_hits_the_cache(client):
    params = {**GREEDY, "max_new_tokens": 2}
    generate(client, text=LONG_PROMPT, sampling_params=params)
    meta = generate(client, text=LONG_PROMPT, sampling_params=params)["meta_info"]
    assert meta["prompt_tokens"] > 100 and meta["cached_tokens"] > 0


def test_stop_string_reports_the_matched_string(client):
    plain = generate(client, text=PROMPT, sampling_params={**GREEDY, "max_new_tokens": 16})["text"]
    stop = plain[len(plain) // 2: len(plain) // 2 + 2]
    assert stop.strip(), plain
    out = generate(client, text=PROMPT, sampling_params={**GREEDY, "max_new_tokens": 16, "stop": [stop]})
    assert out["meta_info"]["finish_reason"] == {"type": "stop", "matched": stop}
    assert out["text"] == plain[: plain.index(stop)]


def test_abort_request_by_rid(client):
    body = {"input_ids": [11, 12, 13], "sampling_params": {**GREEDY, "max_new_tokens": 3000}, "rid": "to-abort"}
    result: dict = {}

    def post() -> None:  # a client of its own: httpx clients are not shared across threads
        with httpx.Client(base_url=client.base_url, headers=client.headers, timeout=120) as own:
            result.update(generate(own, **body))

    worker = threading.Thread(target=post)
    worker.start()
    wait_until(client, idle=False)
    assert client.post("/abort_request", json={"rid": "to-abort"}).status_code == 200
    worker.join(timeout=60)
    assert result["meta_info"]["finish_reason"]["type"] == "abort"
    assert result["meta_info"]["id"] == "to-abort" and result["meta_info"]["completion_tokens"] < 3000
    for body in ({"rid": 5}, {"rid": ""}, {"rid": 2**70}, {}, {"rid": ["to-abort"]}):
        assert client.post("/abort_request", json=body).json()["error"]["param"] == "rid", body
    for content in (b'{"rid": "\\ud800"}', b"[" * 1000 + b"]" * 1000):
        resp = client.post("/abort_request", content=content, headers={"content-type": "application/json"})
        assert resp.status_code == 400 and resp.json()["error"]["message"].startswith("malformed JSON body")


def test_flush_cache_refused_while_busy_and_client_leaving_aborts(client):
    body = {"input_ids": [21, 22, 23], "sampling_params": {**GREEDY, "max_new_tokens": 3000}, "stream": True}
    with client.stream("POST", "/generate", json=body) as resp:
        assert resp.status_code == 200
        lines = resp.iter_lines()  # kept: dropping the iterator would close the connection
        assert next(lines).startswith("data: ")  # the first event: the request is running
        busy = client.post("/flush_cache")
        assert busy.status_code == 400 and busy.json()["error"]["code"] == "400"
    # The client left mid-stream: the request is aborted and its memory freed.
    mem = wait_until(client, idle=True)
    assert mem["request_rows_free"] == mem["request_rows"] and mem["kv_cache_locked"] == 0
    flushed = client.get("/flush_cache")
    assert flushed.status_code == 200 and "flushed" in flushed.text.lower()
    assert client.post("/flush_cache").status_code == 200
    mem = client.get("/get_server_info").json()["memory"]
    assert mem["kv_cached"] == 0 and mem["kv_free"] == mem["kv_pool_size"]


# ---- server routes ------------------------------------------------------------------------------

def test_tokenize_matches_the_hf_tokenizer(client, hf_tokenizer):
    texts = ["Hello world", "The capital of France is Paris.", " leading space and ünïcödé"]
    assert client.post("/tokenize", json={"text": texts[1]}).json()["input_ids"] == hf_tokenizer(texts[1])["input_ids"]
    assert client.post("/tokenize", json={"text": texts}).json()["input_ids"] == [
        hf_tokenizer(t)["input_ids"] for t in texts]
    bad_bodies = [({"text": []}, "text"), ({"text": [1]}, "text"), ({"text": None}, "text"), ({"prompt": "x"}, "text"),
                  ({"text": "x", "extra": 1}, "extra"), ([], "body"), ({"text": 2**70}, "text"),
                  (b'{"text": "\\ud800"}', None), (b"[" * 1000 + b"]" * 1000, None), (b"{", None)]
    for body, param in bad_bodies:
        content = body if isinstance(body, bytes) else json.dumps(body).encode()
        resp = client.post("/tokenize", content=content, headers={"content-type": "application/json"})
        assert resp.status_code == 400, body
        assert resp.json()["error"]["param"] == param, resp.json()


def test_model_and_server_info(client):
    info = client.get("/get_model_info").json()
    assert info["is_generation"] is True and info["model_path"] and info["tokenizer_path"]
    for path in ("/get_server_args", "/get_server_info"):
        resp = client.get(path)
        assert resp.status_code == 200 and resp.json()["api_key"] is None
    server_info = client.get("/get_server_info").json()
    assert server_info["context_len"] > 0 and server_info["max_total_tokens"] > 0
    assert server_info["attention_backend"] != "auto" and server_info["device"] == "cpu"
    assert server_info["dtype"] == "float32" and server_info["memory"]["kv_pool_size"] == server_info["max_total_tokens"]


def test_the_native_frontend_serves_alone(tiny_llama):
    """Mounted without the other frontends (``--frontends native``; the tests above run with all
    of them mounted), its routes serve: they rely on nothing another frontend sets up."""
    from server_util import app_in_thread
    from sglang_core.server.app import build_app
    from sglang_core.server.settings import ServerSettings

    app = build_app(ServerSettings(model_path=str(tiny_llama), frontends="native", engine_in_subprocess=False))
    with app_in_thread(app) as url, httpx.Client(base_url=url, timeout=60) as http:
        params = {**GREEDY, "max_new_tokens": 3}
        assert generate(http, input_ids=[5, 6, 7], sampling_params=params)["meta_info"]["completion_tokens"] == 3
        events = stream_events(http, input_ids=[5, 6, 7], sampling_params=params)
        assert events[-1]["meta_info"]["completion_tokens"] == 3
        assert http.post("/tokenize", json={"text": "hi"}).json()["input_ids"]
        assert wait_until(http, idle=True)["kv_cache_locked"] == 0
        assert http.post("/v1/completions", json={"prompt": "hi"}).status_code == 404


def test_health_generate(client):
    assert client.get("/health_generate").status_code == 200


# ---- bad requests: 400 in OpenAI's envelope naming the field ------------------------------------

BAD_REQUESTS = [
    (b"{not json", None),
    (b"[1, 2]", "body"),
    ({"text": ""}, "text"),
    ({"text": []}, "text"),
    ({"text": 5}, "text"),
    ({"sampling_params": {"max_new_tokens": 2}}, "text"),  # neither text nor input_ids
    ({"text": "hi", "input_ids": [1]}, "text"),  # both
    ({"input_ids": [1, 10**9]}, "input_ids"),
    ({"input_ids": [[1], 2]}, "input_ids"),
    ({"input_ids": [[]]}, "input_ids"),
    ({"text": "hi", "sampling_params": 5}, "sampling_params"),
    ({"text": ["a", "b"], "sampling_params": [{}]}, "sampling_params"),
    ({"text": "hi", "sampling_params": {"temperature": "hot"}}, "temperature"),
    ({"text": "hi", "sampling_params": {"max_new_tokens": -1}}, "max_new_tokens"),
    ({"text": "hi", "sampling_params": {"bogus": 1}}, "bogus"),
    ({"text": "hi", "stream": "yes"}, "stream"),
    ({"text": "hi", "return_logprob": 1}, "return_logprob"),
    ({"text": "hi", "top_logprobs_num": -2}, "top_logprobs_num"),
    ({"text": ["a", "b"], "rid": ["same", "same"]}, "rid"),
    ({"text": "hi", "image_data": "x.png"}, "image_data"),
    ({"text": "hi", "unknown_field": 1}, "unknown_field"),
    ({"text": "word " * 9000, "stream": True}, "text"),  # longer than the context
    # Text no UTF-8 can hold, and nesting deeper than any request needs: refused as bad JSON.
    (b'{"text": "a\\ud800"}', None),
    (b'{"text": "hi", "sampling_params": {"stop": "\\udfff"}}', None),
    (b'{"input_ids": ' + b"[" * 1000 + b"]" * 1000 + b"}", None),
    # Integers past 64 bits, which no engine message can carry.
    ({"input_ids": [2**70]}, "input_ids"),
    ({"input_ids": [5], "top_logprobs_num": 2**70}, "top_logprobs_num"),
    ({"input_ids": [5], "return_logprob": True, "logprob_start_len": 2**64}, "logprob_start_len"),
    ({"input_ids": [5], "sampling_params": {"max_new_tokens": 2**70}}, "max_new_tokens"),
    ({"input_ids": [5], "sampling_params": {"custom_params": {"a": 2**70}}}, "custom_params"),
    (b'{"input_ids": [5], "sampling_params": {"temperature": NaN}}', "temperature"),
]


@pytest.mark.parametrize("body,param", BAD_REQUESTS, ids=[str(i) for i in range(len(BAD_REQUESTS))])
def test_bad_requests_get_400_naming_the_field(client, body, param):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    resp = client.post("/generate", content=content, headers={"content-type": "application/json"})
    assert resp.status_code == 400, resp.text
    error = resp.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error" and error["message"]


def test_server_serves_after_bad_requests(client):
    out = generate(client, text="hello", sampling_params={"max_new_tokens": 3, "ignore_eos": True})
    assert out["meta_info"]["completion_tokens"] == 3
    wait_until(client, idle=True)

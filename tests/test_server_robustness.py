"""The server under load, bad input, disconnects, signals and a dying engine."""

from __future__ import annotations

import asyncio
import json
import random
import signal
import subprocess
import time

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from server_util import running_server

TINY_ARGS = ("--chat-template", "chatml", "--context-length", "256", "--max-running-requests", "64")


@pytest.fixture(scope="module")
def tiny_server(tiny_llama):
    with running_server("--model-path", str(tiny_llama), *TINY_ARGS) as server:
        yield server


def memory_is_free(url: str, headers: dict | None = None) -> dict:
    info = httpx.get(f"{url}/get_server_info", headers=headers or {}, timeout=30).json()
    return info["memory"]


def assert_all_memory_free(url: str, headers: dict | None = None, wait_s: float = 10) -> None:
    deadline = time.monotonic() + wait_s
    while True:
        mem = memory_is_free(url, headers)
        idle = mem["running"] == 0 and mem["waiting"] == 0
        if idle and mem["request_rows_free"] == mem["request_rows"] and mem["kv_cache_locked"] == 0 \
                and mem["kv_free"] + mem["kv_cached"] == mem["kv_pool_size"]:
            return
        assert time.monotonic() < deadline, f"memory not given back: {mem}"
        time.sleep(0.2)


# ---- load: 200+ concurrent streams, a third of the clients leave ------------------------------

@pytest.mark.slow
def test_load_with_disconnects_default_model():
    rng = random.Random(0)
    words = "the a river city music light stone garden window paper engine ocean north".split()
    prompts = [" ".join(rng.choice(words) for _ in range(rng.randint(4, 40))) for _ in range(25)]
    params = {"temperature": 0, "max_new_tokens": 12}
    with running_server("--max-running-requests", "256", "--chunked-prefill-size", "512") as server:
        alone = {p: httpx.post(f"{server.url}/generate", json={"text": p, "sampling_params": params},
                               timeout=120).json()["text"] for p in prompts}

        async def client(i: int, prompt: str, leave_after: int | None, http: httpx.AsyncClient):
            body = {"text": prompt, "sampling_params": params, "stream": True}
            text, chunks = "", 0
            async with http.stream("POST", f"{server.url}/generate", json=body) as resp:
                assert resp.status_code == 200
                async for line in resp.aiter_lines():
                    if not line.startswith("data: "):
                        continue
                    if line == "data: [DONE]":
                        return ("done", prompt, text)
                    text = json.loads(line[6:])["text"]  # native chunks carry the text so far
                    chunks += 1
                    if leave_after is not None and chunks >= leave_after:
                        return ("left", prompt, text)
            return ("cut", prompt, text)

        async def load():
            async with httpx.AsyncClient(timeout=300, limits=httpx.Limits(max_connections=None)) as http:
                jobs = []
                for i in range(210):
                    leave = rng.randint(1, 6) if i % 3 == 0 else None
                    jobs.append(client(i, prompts[i % len(prompts)], leave, http))
                return await asyncio.gather(*jobs)

        outcomes = asyncio.run(load())
        done = [o for o in outcomes if o[0] == "done"]
        assert len(done) == 140 and all(o[0] in ("done", "left") for o in outcomes)
        for _, prompt, text in done:
            assert text == alone[prompt], "a response under load differs from the same request alone"
        assert httpx.get(f"{server.url}/health").status_code == 200
        assert_all_memory_free(server.url)


# ---- fuzz: hypothesis-generated bodies never cause a 5xx --------------------------------------

JSON_LEAF = st.one_of(st.none(), st.booleans(), st.integers(-10**12, 10**12),
                      st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=20))
JSON_VALUE = st.recursive(JSON_LEAF, lambda inner: st.lists(inner, max_size=4)
                          | st.dictionaries(st.text(max_size=12), inner, max_size=4), max_leaves=10)
SAMPLING_KEYS = ["max_new_tokens", "temperature", "top_p", "top_k", "min_p", "stop", "n", "seed",
                 "frequency_penalty", "presence_penalty", "repetition_penalty", "logit_bias", "ignore_eos"]
OPENAI_KEYS = ["model", "max_tokens", "temperature", "top_p", "n", "stop", "seed", "logprobs", "top_logprobs",
               "echo", "stream", "logit_bias", "presence_penalty", "frequency_penalty", "user"]


def _small(value):
    """Keep valid-looking generations short: the point is the shape, not the length."""
    return value if not isinstance(value, int) or isinstance(value, bool) else max(min(value, 8), -8)


native_bodies = st.fixed_dictionaries({}, optional={
    "text": st.one_of(st.text(max_size=30), st.lists(st.text(max_size=10), max_size=3), JSON_VALUE),
    "input_ids": st.one_of(st.lists(st.integers(-5, 300), max_size=8), JSON_VALUE),
    "sampling_params": st.one_of(st.dictionaries(st.sampled_from(SAMPLING_KEYS), JSON_VALUE.map(_small), max_size=5),
                                 JSON_VALUE),
    "stream": st.booleans(), "return_logprob": JSON_VALUE, "top_logprobs_num": JSON_VALUE.map(_small),
    "logprob_start_len": JSON_VALUE.map(_small), "rid": JSON_VALUE,
})
openai_bodies = st.fixed_dictionaries({"messages": st.one_of(
    st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", "x"]),
                                    "content": st.one_of(st.text(max_size=20), JSON_VALUE)}), max_size=3),
    JSON_VALUE)}, optional={k: JSON_VALUE.map(_small) for k in OPENAI_KEYS})
completion_bodies = st.fixed_dictionaries({"prompt": st.one_of(st.text(max_size=20), JSON_VALUE)},
                                          optional={k: JSON_VALUE.map(_small) for k in OPENAI_KEYS})
raw_bodies = st.one_of(st.binary(max_size=64), st.text(max_size=64).map(str.encode))

ENDPOINTS = [("/generate", native_bodies), ("/v1/chat/completions", openai_bodies),
             ("/v1/completions", completion_bodies)]


@settings(max_examples=1050, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(case=st.one_of(*(st.tuples(st.just(path), bodies.map(lambda b: json.dumps(b, allow_nan=True).encode()))
                        for path, bodies in ENDPOINTS),
                      st.tuples(st.sampled_from([p for p, _ in ENDPOINTS]), raw_bodies)))
def test_fuzz_never_5xx(tiny_server, case):
    path, body = case
    resp = httpx.post(f"{tiny_server.url}{path}", content=body, headers={"content-type": "application/json"},
                      timeout=60)
    assert resp.status_code < 500, f"{path} {body[:200]!r} -> {resp.status_code} {resp.text[:300]}"
    if resp.status_code >= 400:
        error = resp.json()["error"]
        assert error["message"] and isinstance(error["code"], str)


def test_after_fuzz_the_server_still_serves(tiny_server):
    resp = httpx.post(f"{tiny_server.url}/generate", json={"text": "hello", "sampling_params": {"max_new_tokens": 4}})
    assert resp.status_code == 200 and resp.json()["meta_info"]["completion_tokens"] == 4
    assert_all_memory_free(tiny_server.url)


def test_oversized_body_and_full_queue(tiny_llama):
    with running_server("--model-path", str(tiny_llama), *TINY_ARGS, "--max-request-bytes", "2000",
                        "--max-queued-requests", "2") as server:
        big = httpx.post(f"{server.url}/generate", json={"text": "x" * 5000})
        assert big.status_code == 413 and big.json()["error"]["code"] == "413"

        async def burst():
            async with httpx.AsyncClient(timeout=120) as http:
                body = {"input_ids": [5, 6, 7], "sampling_params": {"max_new_tokens": 200, "ignore_eos": True}}
                return await asyncio.gather(*(http.post(f"{server.url}/generate", json=body) for _ in range(8)))

        codes = sorted(r.status_code for r in asyncio.run(burst()))
        assert 503 in codes and 200 in codes
        assert_all_memory_free(server.url)


# ---- auth ---------------------------------------------------------------------------------------

def test_api_key_guards_every_route_but_health(tiny_llama):
    key = "s3cret-key"
    with running_server("--model-path", str(tiny_llama), *TINY_ARGS, "--api-key", key) as server:
        auth = {"Authorization": f"Bearer {key}"}
        paths = httpx.get(f"{server.url}/openapi.json", headers=auth).json()["paths"]
        assert "/generate" in paths and "/v1/chat/completions" in paths
        for path, methods in paths.items():
            concrete = path.replace("{", "").replace("}", "")
            for method in methods:
                for variant in (concrete, concrete + "/"):
                    # Redirects followed: "/health/" may redirect to "/health", nothing else may.
                    resp = httpx.request(method.upper(), f"{server.url}{variant}", json={}, follow_redirects=True)
                    if concrete == "/health" and method == "get":
                        assert resp.status_code == 200
                    else:
                        assert resp.status_code == 401, f"{method} {variant} -> {resp.status_code}"
        assert httpx.get(f"{server.url}/openapi.json").status_code == 401
        assert httpx.get(f"{server.url}/v1/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert httpx.get(f"{server.url}/v1/models", headers=auth).status_code == 200
        info = httpx.get(f"{server.url}/get_server_info", headers=auth).text
        assert key not in info


# ---- lifecycle ----------------------------------------------------------------------------------

def _children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    return [int(p) for p in out]


def test_sigterm_under_load_drains_and_exits_cleanly(tiny_llama):
    drain = 4.0
    with running_server("--model-path", str(tiny_llama), *TINY_ARGS, "--drain-timeout-s", str(drain)) as server:
        engine_pid = server.engine_pid()
        assert engine_pid is not None

        async def load_then_term():
            async with httpx.AsyncClient(timeout=60) as http:
                body = {"input_ids": [5, 6], "sampling_params": {"max_new_tokens": 40, "ignore_eos": True}}
                tasks = [asyncio.create_task(http.post(f"{server.url}/generate", json=body)) for _ in range(10)]
                await asyncio.sleep(0.3)
                server.process.send_signal(signal.SIGTERM)
                start = time.monotonic()
                results = await asyncio.gather(*tasks, return_exceptions=True)
                return results, start

        results, start = asyncio.run(load_then_term())
        code = server.process.wait(timeout=drain + 5)
        assert code == 0
        assert time.monotonic() - start <= drain + 5
        assert any(isinstance(r, httpx.Response) and r.status_code == 200 for r in results)
        time.sleep(0.5)
        assert subprocess.run(["kill", "-0", str(engine_pid)], capture_output=True).returncode != 0, \
            "the engine process outlived the server"


def test_killing_the_engine_makes_health_503_and_fails_requests(tiny_llama):
    with running_server("--model-path", str(tiny_llama), *TINY_ARGS) as server:

        async def run():
            async with httpx.AsyncClient(timeout=60) as http:
                body = {"input_ids": [5, 6], "stream": True,
                        "sampling_params": {"max_new_tokens": 100000, "ignore_eos": True}}
                events = []
                async with http.stream("POST", f"{server.url}/generate", json=body) as resp:
                    async for line in resp.aiter_lines():
                        if not line.startswith("data: "):
                            continue
                        events.append(line[6:])
                        if len(events) == 1:  # the request is running: kill its engine
                            subprocess.run(["kill", "-9", str(server.engine_pid())])
                return events

        events = asyncio.run(asyncio.wait_for(run(), 30))  # the stream ends, it does not hang
        last = json.loads(events[-2] if events[-1] == "[DONE]" else events[-1])
        assert "error" in last or last["meta_info"]["finish_reason"]["type"] == "abort", last
        deadline = time.monotonic() + 10
        while httpx.get(f"{server.url}/health").status_code != 503:
            assert time.monotonic() < deadline, "/health did not turn 503"
            time.sleep(0.2)
        after = httpx.post(f"{server.url}/generate", json={"text": "hi", "sampling_params": {"max_new_tokens": 2}})
        assert after.status_code == 503

"""``sglang-core serve --dp 2``: two engine replicas behind one server, on a tiny random Llama.
One server for the whole module (its replicas take most of the time); the test that kills a
replica runs last."""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import os
import signal
import subprocess
import time

import httpx
import openai
import pytest
from transformers import AutoTokenizer

from reference import hf_causal_lm, hf_greedy
from server_util import running_server

MAX = 6
# Two groups of prompts, each sharing a long prefix (the byte-level tokenizer: one token a byte).
PREFIXES = ["The quick brown fox jumps over the lazy dog while " * 2, "Lorem ipsum dolor sit amet, consectetur " * 2]


def prompt(group: int, member: int) -> str:
    return f"{PREFIXES[group]}question {member}:"


@pytest.fixture(scope="module")
def server(tiny_llama):
    with running_server("--model-path", str(tiny_llama), "--chat-template", "chatml", "--context-length", "1024",
                        "--dp", "2", "--router-policy", "cache_aware", "--router-balance-abs", "8") as srv:
        yield srv


def generate(server, text: str, **params) -> dict:
    body = {"text": text, "sampling_params": {"max_new_tokens": MAX, "temperature": 0, "ignore_eos": True, **params},
            "return_logprob": True, "logprob_start_len": -1}  # output logprobs only: the prompt may hit the cache
    resp = httpx.post(f"{server.url}/generate", json=body, timeout=120)
    assert resp.status_code == 200, resp.text
    return resp.json()


def output_ids(result: dict) -> list[int]:
    return [tid for _, tid, _ in result["meta_info"]["output_token_logprobs"]]


def test_greedy_outputs_match_hf_and_openai_client_agrees(server, tiny_llama):
    texts = [prompt(g, m) for m in range(3) for g in range(2)]
    with concurrent.futures.ThreadPoolExecutor(len(texts)) as pool:
        results = list(pool.map(lambda t: generate(server, t), texts))
    hf, tokenizer = hf_causal_lm(tiny_llama), AutoTokenizer.from_pretrained(str(tiny_llama))
    for text, result in zip(texts, results):
        assert output_ids(result) == hf_greedy(hf, tokenizer(text)["input_ids"], MAX), text
    assert {r["meta_info"]["replica"] for r in results} == {0, 1}  # both replicas served
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
    for text, result in zip(texts[:2], results):
        completion = client.completions.create(model="m", prompt=text, max_tokens=MAX, temperature=0,
                                               extra_body={"ignore_eos": True})
        assert completion.choices[0].text == result["text"]


def test_a_shared_prefix_stays_on_its_replica_and_hits_its_cache(server):
    homes = {}
    for member in range(3, 7):
        for group in range(2):
            meta = generate(server, prompt(group, member))["meta_info"]
            homes.setdefault(group, set()).add(meta["replica"])
            assert meta["cached_tokens"] >= len(PREFIXES[group])  # the group's prefix was cached there
    assert homes[0] != homes[1] and all(len(h) == 1 for h in homes.values()), homes


def test_server_info_metrics_and_flush_cover_every_replica(server):
    info = httpx.get(f"{server.url}/get_server_info", timeout=30).json()
    assert [r["alive"] for r in info["replicas"]] == [True, True]
    assert all(r["memory"]["kv_cached"] > 0 for r in info["replicas"])  # both served a group above
    assert info["memory"]["kv_pool_size"] == sum(r["memory"]["kv_pool_size"] for r in info["replicas"])
    metrics = httpx.get(f"{server.url}/metrics", timeout=30).text
    assert 'sglang_replica_up{replica="0"} 1.0' in metrics and 'sglang_replica_up{replica="1"} 1.0' in metrics
    assert httpx.post(f"{server.url}/flush_cache", timeout=30).status_code == 200
    info = httpx.get(f"{server.url}/get_server_info", timeout=30).json()
    for replica in info["replicas"]:
        memory = replica["memory"]
        assert memory["kv_cached"] == 0 and memory["kv_free"] == memory["kv_pool_size"]
    for group in range(2):  # neither replica holds a prefix any more
        assert generate(server, prompt(group, 0))["meta_info"]["cached_tokens"] == 0


def test_abort_reaches_the_replica_running_the_request(server):
    body = {"text": prompt(1, 99), "rid": "long-one", "stream": True,
            "sampling_params": {"max_new_tokens": 800, "temperature": 0, "ignore_eos": True}}
    with httpx.stream("POST", f"{server.url}/generate", json=body, timeout=120) as resp:
        lines = resp.iter_lines()
        first = next(line for line in lines if line.startswith("data: {"))
        assert httpx.post(f"{server.url}/abort_request", json={"rid": "long-one"}, timeout=30).status_code == 200
        rest = [line for line in lines if line.startswith("data: ")]
    assert '"replica"' in first
    assert '"type": "abort"' in rest[-2], rest[-2:]
    wait_idle(server)


def wait_idle(server, wait_s: float = 20) -> None:
    deadline = time.monotonic() + wait_s
    while True:
        replicas = httpx.get(f"{server.url}/get_server_info", timeout=30).json()["replicas"]
        live = [r["memory"] for r in replicas if r["alive"]]
        if all(m["running"] == 0 and m["waiting"] == 0 and m["kv_cache_locked"] == 0
               and m["request_rows_free"] == m["request_rows"] and m["kv_free"] + m["kv_cached"] == m["kv_pool_size"]
               for m in live):
            return
        assert time.monotonic() < deadline, f"memory not given back: {replicas}"
        time.sleep(0.2)


@pytest.fixture(scope="module")
def router(server, lang_server):
    """``sglang-core router`` in front of two serve processes: the --dp 2 server above and the
    default model's (shared with the frontend-language tests)."""
    with running_server("--workers", server.url, lang_server.url, "--policy", "cache_aware",
                        "--health-check-interval-s", "0.5", command="router") as srv:
        yield srv


def test_standalone_router_streams_what_the_worker_would_answer(router):
    """Streamed answers through the router equal the same worker's greedy answers asked directly,
    for the native and the OpenAI API; both workers take a share (one prefix group each)."""
    used = set()
    for group in range(2):
        body = {"text": prompt(group, 7), "stream": True,
                "sampling_params": {"max_new_tokens": MAX, "temperature": 0, "ignore_eos": True}}
        with httpx.stream("POST", f"{router.url}/generate", json=body, timeout=120) as resp:
            assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
            worker = resp.headers["x-sglang-worker"]
            events = [line[6:] for line in resp.iter_lines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]" and len(events) > 2  # streamed: several events, then the end
        streamed = json.loads(events[-2])["text"]
        direct = httpx.post(f"{worker}/generate", json={**body, "stream": False}, timeout=120).json()["text"]
        assert streamed == direct
        client = openai.OpenAI(base_url=router.url + "/v1", api_key="x", max_retries=0)
        chunks = client.chat.completions.create(model="m", messages=[{"role": "user", "content": prompt(group, 7)}],
                                                max_tokens=MAX, temperature=0, stream=True)
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        direct_chat = openai.OpenAI(base_url=worker + "/v1", api_key="x", max_retries=0).chat.completions.create(
            model="m", messages=[{"role": "user", "content": prompt(group, 7)}], max_tokens=MAX, temperature=0)
        assert text == direct_chat.choices[0].message.content
        used.add(worker)
    assert len(used) == 2


def test_standalone_router_covers_every_worker_and_passes_disconnects_on(router, server, lang_server):
    # Group 0 goes to the first worker; group 1 then lives on the default model's server, which
    # takes minutes for 2000 tokens on a CPU.
    warm = {"text": prompt(0, 9), "sampling_params": {"max_new_tokens": 1}}
    assert httpx.post(f"{router.url}/generate", json=warm, timeout=60).headers["x-sglang-worker"] == server.url
    body = {"text": prompt(1, 8), "stream": True, "sampling_params": {"max_new_tokens": 2000, "ignore_eos": True}}
    with httpx.stream("POST", f"{router.url}/generate", json=body, timeout=120) as resp:
        assert resp.headers["x-sglang-worker"] == lang_server.url
        next(line for line in resp.iter_lines() if line.startswith("data: {"))
    wait_idle(lang_server, wait_s=10)  # the client left after one event: the worker aborted the request
    metrics = httpx.get(f"{router.url}/metrics", timeout=30).text
    assert f'sglang_router_worker_up{{worker="{server.url}"}} 1.0' in metrics
    assert f'sglang_router_requests_total{{worker="{lang_server.url}"}}' in metrics
    info = httpx.get(f"{router.url}/get_server_info", timeout=30).json()
    assert [w["alive"] for w in info["workers"]] == [True, True]
    assert info["workers"][0]["info"]["dp_size"] == 2  # each worker's own report
    assert httpx.post(f"{router.url}/flush_cache", timeout=30).status_code == 200
    for worker in (server, lang_server):
        replicas = httpx.get(f"{worker.url}/get_server_info", timeout=30).json()["replicas"]
        assert all(r["memory"]["kv_cached"] == 0 for r in replicas)


def test_a_dead_replica_fails_its_requests_and_the_other_serves(server, router, lang_server):
    """Runs last: it kills one replica's engine process."""
    engines = subprocess.run(["pgrep", "-P", str(server.process.pid)], capture_output=True, text=True).stdout.split()
    assert len(engines) == 2
    with contextlib.ExitStack() as stack:
        streams = []
        for group in range(2):  # one long request on each replica (the groups live on different ones)
            body = {"text": prompt(group, 50), "stream": True,
                    "sampling_params": {"max_new_tokens": 800, "temperature": 0, "ignore_eos": True}}
            streams.append(stack.enter_context(httpx.stream("POST", f"{server.url}/generate", json=body, timeout=60)))
        lines = [s.iter_lines() for s in streams]
        firsts = [next(line for line in it if line.startswith("data: {")) for it in lines]
        os.kill(int(engines[0]), signal.SIGKILL)
        endings = [[line for line in it if line.startswith("data: ")][-2:] for it in lines]
    died = ["the engine process died" in " ".join(e) for e in endings]
    assert sorted(died) == [False, True], endings  # one stream failed, clearly; the other finished
    assert httpx.get(f"{server.url}/health", timeout=10).status_code == 503
    replicas = httpx.get(f"{server.url}/get_server_info", timeout=30).json()["replicas"]
    dead = [i for i, r in enumerate(replicas) if not r["alive"]]
    assert len(dead) == 1 and f'"replica":{dead[0]}' in firsts[died.index(True)].replace(" ", "")
    for group in range(2):  # new requests, whatever their prefix, go to the live replica
        meta = generate(server, prompt(group, 1))["meta_info"]
        assert meta["replica"] != dead[0] and meta["finish_reason"]["type"] == "length"
    metrics = httpx.get(f"{server.url}/metrics", timeout=30).text
    assert f'sglang_replica_up{{replica="{dead[0]}"}} 0.0' in metrics
    wait_idle(server)  # the live replica gave everything back
    # The standalone router sees a worker whose /health fails and sends its prompts elsewhere.
    assert httpx.get(f"{router.url}/health", timeout=30).status_code == 503
    resp = httpx.post(f"{router.url}/generate", json={"text": prompt(0, 2), "sampling_params": {"max_new_tokens": 2}},
                      timeout=60)
    assert resp.status_code == 200 and resp.headers["x-sglang-worker"] == lang_server.url

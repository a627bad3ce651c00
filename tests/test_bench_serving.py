"""``sglang-core bench-serving`` (issue 13.7): fresh prompts for every run unless ``--seed`` repeats
one, warm-up prompts apart from the measured ones, the server's cached prompt tokens in the
report, and a client that drops idle connections before the server closes them. Issue 23: the
latency percentiles and goodput against timelines computed by hand, and the rate sweep."""

from __future__ import annotations

import asyncio
import json
import random
import time

import numpy
import pytest

from sglang_core.bench_serving import (CLIENT_LIMITS, BenchRequest, RequestResult, _native_counts, _openai_counts,
                                      _timed, check_options, percentile, request_rates, send_native, send_openai,
                                      summarize, workload)
from sglang_core.cli import build_parser, main
from sglang_core.server.settings import ServerSettings
from sglang_core.tokenizer import load_tokenizer


SHARED_PREFIX = ("--dataset", "shared-prefix", "--sp-groups", "2", "--sp-prompts-per-group", "3",
                 "--sp-system-len", "24", "--sp-question-len", "6", "--warmup-requests", "2")
RANDOM = ("--dataset", "random", "--num-prompts", "12", "--random-input-len", "24", "--random-range-ratio", "0.5",
          "--warmup-requests", "2")


@pytest.fixture(scope="module")
def tokenizer(default_model_folder):
    return load_tokenizer(str(default_model_folder))


def args(*flags: str):
    return build_parser().parse_args(["bench-serving", *flags])


def prefixes(requests, length: int = 4) -> set[tuple[int, ...]]:
    """What a prefix cache could match across runs: the prompts' first tokens."""
    return {tuple(r.input_ids[:length]) for r in requests}


@pytest.mark.parametrize("dataset", [RANDOM, SHARED_PREFIX], ids=["random", "shared-prefix"])
def test_each_run_draws_its_own_prompts(tokenizer, dataset):
    first, second = workload(args(*dataset), tokenizer), workload(args(*dataset), tokenizer)
    assert first.seed != second.seed
    assert len(first.requests) == len(second.requests) == (12 if dataset is RANDOM else 6)
    assert not prefixes(first.requests + first.warmup) & prefixes(second.requests + second.warmup)
    for run in (first, second):  # warming up puts no measured prompt in the cache either
        assert len(run.warmup) == 2 and not prefixes(run.warmup) & prefixes(run.requests)


@pytest.mark.parametrize("dataset", [RANDOM, SHARED_PREFIX], ids=["random", "shared-prefix"])
def test_a_seed_repeats_a_run(tokenizer, dataset):
    fresh = workload(args(*dataset), tokenizer)
    again = workload(args(*dataset, "--seed", str(fresh.seed)), tokenizer)
    assert again.seed == fresh.seed
    for a, b in ((fresh.requests, again.requests), (fresh.warmup, again.warmup)):
        assert [(r.input_ids, r.output_len) for r in a] == [(r.input_ids, r.output_len) for r in b]


def test_client_drops_idle_connections_before_the_server_closes_them():
    server_timeout = ServerSettings.model_fields["timeout_keep_alive_s"].default
    assert CLIENT_LIMITS.keepalive_expiry < server_timeout
    assert CLIENT_LIMITS.keepalive_expiry < 5  # uvicorn's default: other servers bench-serving loads


# ---- against a live server ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def server(tiny_server):
    return tiny_server


def served_cached_tokens(server) -> float:
    """The server's own count of prompt tokens taken from its prefix cache (``/metrics``)."""
    import httpx

    for line in httpx.get(server.url + "/metrics").text.splitlines():
        if line.startswith("sglang_cached_prompt_tokens_total "):
            return float(line.split()[1])
    raise AssertionError("no cached prompt tokens counter in /metrics")


@pytest.mark.parametrize("backend", ["openai", "native"])
def test_the_report_counts_the_cached_prompt_tokens(server, tiny_llama, tmp_path, backend):
    result_file = tmp_path / "result.jsonl"

    def bench(seed: str) -> tuple[dict, float]:
        before = served_cached_tokens(server)
        code = main(["bench-serving", "--base-url", server.url, "--backend", backend, "--tokenizer", str(tiny_llama),
                     "--num-prompts", "4", "--random-input-len", "24", "--random-range-ratio", "0.5",
                     "--random-output-len", "2", "--warmup-requests", "0", "--seed", seed,
                     "--result-file", str(result_file)])
        assert code == 0
        report = json.loads(result_file.read_text().splitlines()[-1])
        # The server counts a request's tokens as its stream closes, a moment after the last event.
        deadline = time.monotonic() + 10
        while served_cached_tokens(server) - before != report["cached_prompt_tokens"] and time.monotonic() < deadline:
            time.sleep(0.05)
        return report, served_cached_tokens(server) - before

    seed = {"openai": "101", "native": "202"}[backend]
    first, served = bench(seed)
    assert first["seed"] == int(seed) and first["config"]["seed"] == int(seed)
    assert first["completed"] == 4 and first["cached_prompt_tokens"] == served
    repeat, served = bench(seed)  # the same prompts again: now from the cache
    assert repeat["cached_prompt_tokens"] == served
    assert repeat["cached_prompt_tokens"] >= first["cached_prompt_tokens"] + repeat["input_tokens"] // 2


# ---- the report's metrics, from synthetic timelines computed by hand --------------------------

def timelines() -> list[RequestResult]:
    """Four completed requests and a failed one, over a 2 s run."""
    return [
        RequestResult(ok=True, input_len=8, output_len=11, ttft=0.100, e2e=0.280, itl=[0.01, 0.03]),  # TPOT 18 ms
        RequestResult(ok=True, input_len=8, output_len=5, ttft=0.250, e2e=0.290, itl=[0.02]),  # TPOT 10 ms
        RequestResult(ok=True, input_len=8, output_len=3, ttft=0.050, e2e=0.150, itl=[0.05, 0.01]),  # TPOT 50 ms
        RequestResult(ok=True, input_len=8, output_len=1, ttft=0.150, e2e=0.150),  # one token: no TPOT
        RequestResult(ok=False, input_len=8, error="HTTP 500"),
    ]


def test_percentiles_interpolate_between_ranks():
    # Sorted TTFTs 50, 100, 150, 250 ms: p50 at rank 1.5, p90 at 2.7, p99 at 2.97.
    report = summarize(timelines(), 2.0)
    assert report["ttft"] == pytest.approx({"mean_ms": 137.5, "median_ms": 125.0, "p90_ms": 220.0, "p99_ms": 247.0})
    # Every gap of every stream: 10, 10, 20, 30, 50 ms; p90 at rank 3.6, p99 at 3.96.
    assert report["itl"] == pytest.approx({"mean_ms": 24.0, "median_ms": 20.0, "p90_ms": 42.0, "p99_ms": 49.2})
    # TPOT of the requests with more than one token: 10, 18, 50 ms; p90 at rank 1.8, p99 at 1.98.
    assert report["tpot"] == pytest.approx({"mean_ms": 26.0, "median_ms": 18.0, "p90_ms": 43.6, "p99_ms": 49.36})
    assert report["e2e"]["median_ms"] == pytest.approx(215.0)  # 150, 150, 280, 290
    rng = random.Random(3)
    values = [rng.random() for _ in range(37)]
    for q in (0, 37.5, 50, 90, 99, 100):
        assert percentile(values, q) == pytest.approx(float(numpy.percentile(values, q)))


def test_throughput_and_goodput():
    report = summarize(timelines(), 2.0, slo_ttft_ms=200, slo_tpot_ms=20)
    assert (report["completed"], report["failed"]) == (4, 1)
    assert report["request_throughput"] == pytest.approx(2.0) and report["output_throughput"] == pytest.approx(10.0)
    # Met both: the first (100 ms, 18 ms) and the one-token request (150 ms); the second misses
    # TTFT, the third TPOT, the fifth failed.
    assert report["goodput"] == pytest.approx(1.0) and report["slo_attainment"] == pytest.approx(0.4)
    ttft_only = summarize(timelines(), 2.0, slo_ttft_ms=200)
    assert ttft_only["goodput"] == pytest.approx(1.5) and ttft_only["slo_tpot_ms"] is None
    tpot_only = summarize(timelines(), 2.0, slo_tpot_ms=20)
    assert tpot_only["goodput"] == pytest.approx(1.5)
    assert "goodput" not in summarize(timelines(), 2.0)


def test_request_rates_are_checked():
    assert request_rates("1,8,inf") == [1.0, 8.0, float("inf")]
    for bad in ("1,fast", "0,8", ""):
        with pytest.raises(ValueError, match="request-rates"):
            request_rates(bad)


@pytest.mark.parametrize("flags", [
    ("--random-range-ratio", "1.5"), ("--random-input-len", "0"), ("--random-output-len", "0"),
    ("--dataset", "shared-prefix", "--sp-question-len", "0"), ("--dataset", "shared-prefix", "--sp-output-len", "0"),
    ("--slo-tpot-ms", "-5"), ("--slo-ttft-ms", "0"), ("--max-concurrency", "0"),
])
def test_options_out_of_range_name_themselves(flags):
    """Each of these once failed deep in a draw (``empty range for randrange()``) or ran with a
    target nothing could meet."""
    with pytest.raises(ValueError, match=f"^{flags[-2][2:]}: must be"):
        check_options(args(*flags))
    check_options(args(*flags[:-2]))  # the dataset alone, with the defaults, is fine


def test_a_sweep_runs_each_rate_with_its_own_prompts(server, tiny_llama, tmp_path):
    result_file, table_file = tmp_path / "sweep.jsonl", tmp_path / "sweep.md"
    code = main(["bench-serving", "--base-url", server.url, "--tokenizer", str(tiny_llama), "--num-prompts", "3",
                 "--random-input-len", "24", "--random-range-ratio", "0.5", "--random-output-len", "4",
                 "--warmup-requests", "0", "--request-rates", "40,inf", "--seed", "500",
                 "--slo-ttft-ms", "60000", "--slo-tpot-ms", "60000",
                 "--result-file", str(result_file), "--table-file", str(table_file)])
    assert code == 0
    rows = [json.loads(line) for line in result_file.read_text().splitlines()]
    assert [(r["request_rate"], r["seed"], r["config"]["seed"]) for r in rows] == [(40, 500, 500), (float("inf"), 501, 501)]
    for r in rows:  # targets no request misses: goodput is the request throughput
        assert r["completed"] == 3 and r["goodput"] == pytest.approx(r["request_throughput"])
        assert 0 < r["delivery_lag"]["median_ms"] < r["e2e"]["p99_ms"], "the server stamps each streamed token"
    table = table_file.read_text().splitlines()
    assert len(table) == 4 and table[2].startswith("| 40 | 3/3 |") and table[3].startswith("| inf | 3/3 |")


def test_delivery_lag_is_arrival_minus_the_engines_production_time():
    """Chunks stamped as produced 100 s and 200 s ago (as a server would in ``meta_info``)."""

    async def chunks():
        for ago, tokens in ((100.0, 1), (200.0, 2)):
            yield {"meta_info": {"completion_tokens": tokens, "cached_tokens": 0, "produced_at": time.time() - ago}}

    request = BenchRequest(prompt="", input_ids=[1, 2], output_len=2)
    result = asyncio.run(_timed(chunks(), request, _native_counts))
    assert result.ok and result.output_len == 2
    assert [round(lag) for lag in result.delivery_lag] == [100, 200]
    assert summarize([result], 1.0)["delivery_lag"]["p90_ms"] == pytest.approx(190_000, abs=100)  # rank 0.9


def _replayed(chunks: list[dict], counts) -> RequestResult:
    """``_timed`` over ``chunks``, streamed 5 ms apart."""

    async def stream():
        for chunk in chunks:
            await asyncio.sleep(0.005)
            yield chunk

    return asyncio.run(_timed(stream(), BenchRequest(prompt="", input_ids=[1, 2], output_len=3), counts))


def test_only_chunks_with_output_are_timed():
    """An OpenAI stream ends with a chunk holding only the finish reason and, with usage asked
    for, one holding only the usage: neither is a token's arrival, so the three tokens in two
    chunks make one gap, not three."""
    result = _replayed([{"choices": [{"text": "a"}]}, {"choices": [{"text": "bc"}]},
                        {"choices": [{"text": "", "finish_reason": "length"}]},
                        {"choices": [], "usage": {"completion_tokens": 3}}], _openai_counts)
    assert result.ok and result.output_len == 3 and len(result.itl) == 1


ABORT = {"type": "abort", "message": "the KV cache cannot hold this request"}


@pytest.mark.parametrize("chunks, counts, error", [
    ([{"choices": [{"text": "a"}]}, {"error": {"message": "the request was aborted"}}], _openai_counts, "aborted"),
    ([{"meta_info": {"completion_tokens": 1, "cached_tokens": 0, "finish_reason": ABORT}}], _native_counts, "KV cache"),
    ([{"choices": [], "usage": {"completion_tokens": 0}}], _openai_counts, "without output"),
], ids=["openai-error-in-stream", "native-abort", "no-output"])
def test_a_stream_that_reports_a_failure_is_a_failed_request(chunks, counts, error):
    """The status was 200, but the stream says the request failed (or gave nothing): it must not
    count as completed, let alone meet a latency target."""
    result = _replayed(chunks, counts)
    assert not result.ok and error in result.error
    assert summarize([result], 1.0, slo_ttft_ms=1e9)["goodput"] == 0


@pytest.mark.parametrize("backend", ["openai", "native"])
def test_a_streams_gaps_are_between_its_outputs(server, tiny_llama, backend, monkeypatch):
    """The server's own streams, each chunk seen as it passes: one gap per chunk carrying output
    after the first. The native stream sends each token in a chunk of its own; the OpenAI
    stream text, then a chunk with only the finish reason and one with only the usage."""
    import httpx

    from sglang_core import bench_serving

    seen: list[dict] = []
    sse = bench_serving._sse

    async def recorded(*args):
        async for chunk in sse(*args):
            seen.append(chunk)
            yield chunk

    monkeypatch.setattr(bench_serving, "_sse", recorded)
    ids = list(range(40, 52))
    request = BenchRequest(load_tokenizer(str(tiny_llama)).decode(ids), ids, 6)

    async def send() -> RequestResult:
        async with httpx.AsyncClient(timeout=None) as client:
            if backend == "native":
                return await send_native(client, server.url, request, {})
            return await send_openai(client, server.url, request, {}, "tiny")

    result = asyncio.run(send())
    assert result.ok and result.output_len == 6
    if backend == "native":
        assert len(seen) == 6 and len(result.itl) == 5
    else:
        with_text = [chunk for chunk in seen if chunk["choices"] and chunk["choices"][0]["text"]]
        assert seen[-1]["choices"] == [] and seen[-2]["choices"][0]["finish_reason"] == "length"
        assert len(result.itl) == len(with_text) - 1

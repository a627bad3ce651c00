"""``sglang-core bench-serving`` (issue 13.7): fresh prompts for every run unless ``--seed`` repeats
one, warm-up prompts apart from the measured ones, the server's cached prompt tokens in the
report, and a client that drops idle connections before the server closes them."""

from __future__ import annotations

import json
import time

import pytest

from sglang_core.bench_serving import CLIENT_LIMITS, workload
from sglang_core.cli import build_parser, main
from sglang_core.server.settings import ServerSettings
from sglang_core.tokenizer import load_tokenizer

from server_util import running_server

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
def server(tiny_llama):
    with running_server("--model-path", str(tiny_llama), "--context-length", "256") as srv:
        yield srv


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

"""``sglang-core bench-serving``: load a running server and report throughput and latencies.

Datasets: random token prompts (lengths with a range ratio), ShareGPT-format JSON from a local
file, or generated shared-prefix groups (a long system prompt shared by each group's questions).
Arrivals follow a Poisson process at ``--request-rate`` (``inf``: all at once), optionally capped
by ``--max-concurrency``. Backends: our native ``/generate`` or any OpenAI-compatible
``/v1/completions``.

Each run draws fresh prompts (and warm-up prompts apart from them) unless ``--seed`` repeats an
earlier run's, so a second run against the same server is not served from its prefix cache; the
report gives the seed and the prompt tokens the server took from its cache.

The report: throughput, the mean, p50, p90 and p99 of TTFT, ITL (the gaps between a stream's
chunks that carry output: an OpenAI stream's finish and usage chunks carry none), TPOT ((E2E - TTFT) / (output tokens - 1)), E2E and, on the native backend, each streamed
chunk's delivery lag (its arrival minus the engine's ``meta_info.produced_at``, a wall-clock
time: the server must run on this host), and, with ``--slo-ttft-ms`` and/or
``--slo-tpot-ms``, goodput: the requests per second that met every target given.
``--request-rates 1,8,inf`` sweeps: one run per rate, each with fresh prompts (``--seed S``:
S, S+1, ...), one JSON line each and a markdown table of all.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable, NamedTuple

import httpx
from tqdm import tqdm


@dataclass
class BenchRequest:
    prompt: str
    input_ids: list[int]
    output_len: int


@dataclass
class RequestResult:
    ok: bool
    input_len: int
    output_len: int = 0
    cached_tokens: int | None = None  # prompt tokens the server took from its prefix cache, if it says
    ttft: float = 0.0
    e2e: float = 0.0
    itl: list[float] = field(default_factory=list)
    # Per chunk: arrival here minus the engine's production time of its latest token (native
    # backend, server on the same host: both are wall-clock times).
    delivery_lag: list[float] = field(default_factory=list)
    error: str = ""


# ---- datasets -------------------------------------------------------------------------------

def _random_ids(rng: random.Random, vocab: int, n: int) -> list[int]:
    return [rng.randrange(vocab) for _ in range(n)]


def random_dataset(tokenizer, num: int, input_len: int, output_len: int, range_ratio: float,
                   seed: int) -> list[BenchRequest]:
    """Lengths uniform in ``[len * range_ratio, len]``; prompts are random token ids."""
    rng = random.Random(seed)
    vocab = tokenizer.vocab_size
    out = []
    for _ in range(num):
        ids = _random_ids(rng, vocab, rng.randint(max(1, int(input_len * range_ratio)), input_len))
        out.append(BenchRequest(tokenizer.decode(ids), ids, rng.randint(max(1, int(output_len * range_ratio)), output_len)))
    return out


def sharegpt_dataset(tokenizer, path: str, num: int, seed: int, max_len: int = 4096) -> list[BenchRequest]:
    """First human turn as the prompt; the following reply's token count as the output length."""
    with open(path) as f:
        conversations = json.load(f)
    rng = random.Random(seed)
    rng.shuffle(conversations)
    out = []
    for conv in conversations:
        turns = conv.get("conversations") or conv.get("conversation") or []
        if len(turns) < 2:
            continue
        ids = tokenizer(turns[0]["value"])["input_ids"]
        reply = len(tokenizer(turns[1]["value"])["input_ids"])
        if 4 <= len(ids) <= max_len and 4 <= reply <= max_len and len(ids) + reply <= max_len:
            out.append(BenchRequest(turns[0]["value"], ids, reply))
        if len(out) == num:
            break
    if not out:
        raise ValueError(f"dataset-path: no usable ShareGPT conversations in {path}")
    return out


def shared_prefix_dataset(tokenizer, groups: int, per_group: int, system_len: int, question_len: int,
                          output_len: int, seed: int) -> list[BenchRequest]:
    """``groups`` system prompts of ``system_len`` tokens, each followed by ``per_group`` questions;
    requests are shuffled so groups interleave, as real traffic does."""
    rng = random.Random(seed)
    vocab = tokenizer.vocab_size
    out = []
    for _ in range(groups):
        system = _random_ids(rng, vocab, system_len)
        for _ in range(per_group):
            ids = system + _random_ids(rng, vocab, question_len)
            out.append(BenchRequest(tokenizer.decode(ids), ids, output_len))
    rng.shuffle(out)
    return out


# ---- backends -------------------------------------------------------------------------------

async def _sse(client: httpx.AsyncClient, url: str, body: dict, headers: dict):
    async with client.stream("POST", url, json=body, headers=headers) as resp:
        if resp.status_code != 200:
            raise RuntimeError(f"HTTP {resp.status_code}: {(await resp.aread())[:200]!r}")
        async for line in resp.aiter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                yield json.loads(line[6:])


class ChunkCounts(NamedTuple):
    """What one streamed chunk tells: whether it carries output, and (each None if it does not
    say) the tokens generated so far, the prompt tokens taken from the cache and the server's
    production time of the chunk's latest token."""

    output: bool
    generated: int | None
    cached: int | None
    produced_at: float | None


async def send_native(client, base_url, req: BenchRequest, headers, ignore_eos: bool = True) -> RequestResult:
    body = {"input_ids": req.input_ids, "stream": True,
            "sampling_params": {"max_new_tokens": req.output_len, "ignore_eos": ignore_eos, "temperature": 0}}
    return await _timed(_sse(client, f"{base_url}/generate", body, headers), req, counts=_native_counts)


def _native_counts(chunk: dict) -> ChunkCounts:
    if "error" in chunk:
        raise RuntimeError(f"error in the stream: {chunk['error']}")
    meta = chunk["meta_info"]
    reason = meta.get("finish_reason") or {}
    if reason.get("type") == "abort":  # the server gave up on it: not a completed request
        raise RuntimeError(f"aborted: {reason.get('message', '')}")
    return ChunkCounts(True, meta["completion_tokens"], meta["cached_tokens"], meta.get("produced_at"))


async def send_openai(client, base_url, req: BenchRequest, headers, model: str,
                      ignore_eos: bool = True) -> RequestResult:
    body = {"model": model, "prompt": req.prompt, "max_tokens": req.output_len, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    if ignore_eos:  # an extension (ours, SGLang's, vLLM's); servers that reject unknown fields need it left out
        body["ignore_eos"] = True
    return await _timed(_sse(client, f"{base_url}/v1/completions", body, headers), req, counts=_openai_counts)


def _openai_counts(chunk: dict) -> ChunkCounts:
    if "error" in chunk:  # an error after the 200 went out
        raise RuntimeError(f"error in the stream: {chunk['error']}")
    usage = chunk.get("usage") or {}
    return ChunkCounts(any(choice.get("text") for choice in chunk.get("choices") or ()), usage.get("completion_tokens"),
                       (usage.get("prompt_tokens_details") or {}).get("cached_tokens"), None)


async def _timed(chunks, req: BenchRequest, counts: Callable[[dict], ChunkCounts]) -> RequestResult:
    """Time one streamed request: its first output and the gaps between outputs (chunks without
    output time nothing); ``counts`` reads a chunk, raising for one that reports a failure."""
    result = RequestResult(ok=False, input_len=len(req.input_ids))
    start = last = time.perf_counter()
    outputs = 0
    try:
        async for chunk in chunks:
            now, arrived = time.perf_counter(), time.time()
            seen = counts(chunk)
            if seen.output:
                if outputs == 0:
                    result.ttft = now - start
                else:
                    result.itl.append(now - last)
                last = now
                outputs += 1
            if seen.produced_at:  # 0: an ending the engine did not produce (its process died)
                result.delivery_lag.append(arrived - seen.produced_at)
            if seen.generated is not None:
                result.output_len = seen.generated
            if seen.cached is not None:
                result.cached_tokens = seen.cached
        if outputs == 0:
            raise RuntimeError("the stream ended without output")
        result.e2e = time.perf_counter() - start
        result.ok = True
    except Exception as exc:  # one failed request is reported, not fatal
        result.error = f"{type(exc).__name__}: {exc}"
    return result


# ---- the run --------------------------------------------------------------------------------

# Servers close idle keep-alive connections after a few seconds (uvicorn: 5 s by default); a client
# that keeps one as long (httpx's default is also 5 s) may send a request just as the server closes
# it, which fails. Dropping idle connections sooner avoids that race.
CLIENT_LIMITS = httpx.Limits(max_connections=None, max_keepalive_connections=None, keepalive_expiry=2.0)


@dataclass
class Workload:
    seed: int  # the seed that draws these prompts again (``--seed``)
    warmup: list[BenchRequest]  # not measured, and sharing no prompt with ``requests``
    requests: list[BenchRequest]


def check_options(args: argparse.Namespace) -> None:
    """A ValueError naming the first option out of its range (the draws' own errors name none)."""
    rules = [("num-prompts", args.num_prompts >= 1, ">= 1"),
             ("max-concurrency", args.max_concurrency is None or args.max_concurrency >= 1, ">= 1"),
             ("slo-ttft-ms", args.slo_ttft_ms is None or args.slo_ttft_ms > 0, "> 0"),
             ("slo-tpot-ms", args.slo_tpot_ms is None or args.slo_tpot_ms > 0, "> 0")]
    if args.dataset == "random":
        rules += [("random-input-len", args.random_input_len >= 1, ">= 1"),
                  ("random-output-len", args.random_output_len >= 1, ">= 1"),
                  ("random-range-ratio", 0 <= args.random_range_ratio <= 1, "between 0 and 1")]
    elif args.dataset == "shared-prefix":
        rules += [("sp-groups", args.sp_groups >= 1, ">= 1"), ("sp-prompts-per-group", args.sp_prompts_per_group >= 1, ">= 1"),
                  ("sp-system-len", args.sp_system_len >= 0, ">= 0"), ("sp-question-len", args.sp_question_len >= 1, ">= 1"),
                  ("sp-output-len", args.sp_output_len >= 1, ">= 1")]
    for option, ok, allowed in rules:
        if not ok:
            raise ValueError(f"{option}: must be {allowed}, got {getattr(args, option.replace('-', '_'))}")


def workload(args: argparse.Namespace, tokenizer) -> Workload:
    """The run's prompts: from ``--seed``, or from a fresh seed, so that no two runs send the same ones."""
    seed = random.SystemRandom().randrange(2**32) if args.seed is None else args.seed
    if args.dataset == "random":
        requests = random_dataset(tokenizer, args.num_prompts, args.random_input_len, args.random_output_len,
                                  args.random_range_ratio, seed)
    elif args.dataset == "sharegpt":
        if not args.dataset_path:
            raise ValueError("dataset-path: required for the sharegpt dataset")
        requests = sharegpt_dataset(tokenizer, args.dataset_path, args.num_prompts, seed)
    else:
        requests = shared_prefix_dataset(tokenizer, args.sp_groups, args.sp_prompts_per_group, args.sp_system_len,
                                         args.sp_question_len, args.sp_output_len, seed)
    if not requests:
        raise ValueError("num-prompts: the dataset gave no requests")
    # Random prompts as long as the first request warm the server up without putting a measured
    # prompt (or shared prefix) in its cache. A negative seed is never a measured run's (fresh
    # seeds and the usual --seed values are >= 0).
    first = requests[0]
    warmup = random_dataset(tokenizer, args.warmup_requests, len(first.input_ids), first.output_len, 1.0, -1 - seed)
    return Workload(seed, warmup, requests)


async def run(requests: list[BenchRequest], send, request_rate: float, max_concurrency: int | None,
              warmup: list[BenchRequest], seed: int, progress: bool = True) -> tuple[list[RequestResult], float]:
    async with httpx.AsyncClient(timeout=httpx.Timeout(None), limits=CLIENT_LIMITS) as client:
        for req in warmup:
            await send(client, req)
        gate = asyncio.Semaphore(max_concurrency) if max_concurrency else None
        bar = tqdm(total=len(requests), desc="requests", disable=not progress)

        async def one(req: BenchRequest) -> RequestResult:
            if gate is None:
                result = await send(client, req)
            else:
                async with gate:
                    result = await send(client, req)
            bar.update(1)
            return result

        rng = random.Random(seed)
        tasks = []
        start = time.perf_counter()
        for req in requests:
            tasks.append(asyncio.create_task(one(req)))
            if request_rate != float("inf"):
                await asyncio.sleep(rng.expovariate(request_rate))
        results = await asyncio.gather(*tasks)
        duration = time.perf_counter() - start
        bar.close()
    return results, duration


def percentile(values: list[float], q: float) -> float:
    """The ``q``-th percentile (0-100), interpolating linearly between the two nearest ranks
    (numpy's default): rank ``q / 100 * (n - 1)`` of the sorted values."""
    ordered = sorted(values)
    rank = q / 100 * (len(ordered) - 1)
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def latency_stats(values: list[float]) -> dict[str, float]:
    """Mean and percentiles of latencies given in seconds, in milliseconds (zeros for none)."""
    if not values:
        return {"mean_ms": 0.0, "median_ms": 0.0, "p90_ms": 0.0, "p99_ms": 0.0}
    return {"mean_ms": 1000 * statistics.fmean(values), "median_ms": 1000 * percentile(values, 50),
            "p90_ms": 1000 * percentile(values, 90), "p99_ms": 1000 * percentile(values, 99)}


def tpot(result: RequestResult) -> float | None:
    """Time per output token after the first, or None for a request of one token or none."""
    return (result.e2e - result.ttft) / (result.output_len - 1) if result.output_len > 1 else None


def meets_slo(result: RequestResult, ttft_ms: float | None, tpot_ms: float | None) -> bool:
    """A completed request within every target given (a one-token request has no TPOT to miss)."""
    per_token = tpot(result)
    return (result.ok and (ttft_ms is None or 1000 * result.ttft <= ttft_ms)
            and (tpot_ms is None or per_token is None or 1000 * per_token <= tpot_ms))


def summarize(results: list[RequestResult], duration: float, slo_ttft_ms: float | None = None,
              slo_tpot_ms: float | None = None) -> dict[str, Any]:
    ok = [r for r in results if r.ok]
    tpots = [t for t in map(tpot, ok) if t is not None]
    cached = [r.cached_tokens for r in ok if r.cached_tokens is not None]
    slo: dict[str, Any] = {}
    if slo_ttft_ms is not None or slo_tpot_ms is not None:
        good = sum(meets_slo(r, slo_ttft_ms, slo_tpot_ms) for r in results)
        slo = {"slo_ttft_ms": slo_ttft_ms, "slo_tpot_ms": slo_tpot_ms, "goodput": good / duration,
               "slo_attainment": good / len(results)}
    return {
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "errors": sorted({r.error for r in results if not r.ok})[:5],
        "duration_s": duration,
        "request_throughput": len(ok) / duration,
        "input_throughput": sum(r.input_len for r in ok) / duration,
        "output_throughput": sum(r.output_len for r in ok) / duration,
        "input_tokens": sum(r.input_len for r in ok),
        # A cached prompt costs the server little: a high share here means the figures above are
        # not those of fresh traffic. None: the server did not report it.
        "cached_prompt_tokens": sum(cached) if cached else None,
        "output_tokens": sum(r.output_len for r in ok),
        **slo,
        "ttft": latency_stats([r.ttft for r in ok]),
        "tpot": latency_stats(tpots),
        "itl": latency_stats([x for r in ok for x in r.itl]),
        "e2e": latency_stats([r.e2e for r in ok]),
        # How long a streamed token took from the engine to this client (zeros: not reported).
        "delivery_lag": latency_stats([x for r in ok for x in r.delivery_lag]),
    }


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """One line per run of a sweep: rate, throughput, goodput and the latency percentiles (ms),
    the last the delivery lag from engine to client."""

    def spread(stats: dict[str, float]) -> str:
        return " / ".join(f"{stats[k]:.1f}" for k in ("median_ms", "p90_ms", "p99_ms"))

    lines = ["| rate (req/s) | completed | req/s | output tok/s | goodput req/s (met) | TTFT p50 / p90 / p99 "
             "| ITL p50 / p90 / p99 | TPOT p50 / p90 / p99 | E2E p50 / p90 / p99 | delivery p50 / p90 / p99 |",
             "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        goodput = f"{r['goodput']:.2f} ({100 * r['slo_attainment']:.0f}%)" if "goodput" in r else "-"
        lines.append(f"| {r['request_rate']:g} | {r['completed']}/{r['completed'] + r['failed']} "
                     f"| {r['request_throughput']:.2f} | {r['output_throughput']:.1f} | {goodput} "
                     f"| {spread(r['ttft'])} | {spread(r['itl'])} | {spread(r['tpot'])} | {spread(r['e2e'])} "
                     f"| {spread(r['delivery_lag'])} |")
    return "\n".join(lines)


def request_rates(text: str) -> list[float]:
    """``--request-rates``: comma-separated requests/s, ``inf`` for all at once."""
    try:
        rates = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ValueError(f"request-rates: not a comma-separated list of numbers: {text!r}") from None
    if not rates or any(not rate > 0 for rate in rates):
        raise ValueError(f"request-rates: each rate must be > 0 (inf: all at once), got {text!r}")
    return rates


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base-url", default="http://127.0.0.1:30000")
    p.add_argument("--backend", choices=["native", "openai"], default="native")
    p.add_argument("--model", default=None, help="model name for the OpenAI API (default: the first of /v1/models)")
    p.add_argument("--api-key", default=None)
    p.add_argument("--tokenizer", default=None, help="tokenizer folder (default: the embedded default model's)")
    p.add_argument("--dataset", choices=["random", "sharegpt", "shared-prefix"], default="random")
    p.add_argument("--dataset-path", default=None, help="ShareGPT-format JSON file")
    p.add_argument("--num-prompts", type=int, default=100)
    p.add_argument("--random-input-len", type=int, default=256)
    p.add_argument("--random-output-len", type=int, default=64)
    p.add_argument("--random-range-ratio", type=float, default=0.0)
    p.add_argument("--sp-groups", type=int, default=8, help="shared-prefix: number of groups")
    p.add_argument("--sp-prompts-per-group", type=int, default=8)
    p.add_argument("--sp-system-len", type=int, default=512)
    p.add_argument("--sp-question-len", type=int, default=64)
    p.add_argument("--sp-output-len", type=int, default=64)
    p.add_argument("--request-rate", type=float, default=float("inf"), help="requests/s (Poisson); inf = all at once")
    p.add_argument("--request-rates", default=None,
                   help="sweep: comma-separated rates (e.g. 1,8,16,32,inf), one run each with fresh prompts; "
                        "overrides --request-rate")
    p.add_argument("--slo-ttft-ms", type=float, default=None, help="goodput: a request must have TTFT <= this")
    p.add_argument("--slo-tpot-ms", type=float, default=None, help="goodput: a request must have TPOT <= this")
    p.add_argument("--max-concurrency", type=int, default=None)
    p.add_argument("--warmup-requests", type=int, default=1)
    p.add_argument("--seed", type=int, default=None,
                   help="draw the prompts of the run with this seed, as reported by an earlier run "
                        "(default: a fresh seed, so that no prompt of an earlier run is sent again)")
    p.add_argument("--disable-ignore-eos", action="store_true",
                   help="let requests stop at EOS (for servers that reject `ignore_eos`)")
    p.add_argument("--result-file", default=None, help="append the JSON result as one line (one per rate)")
    p.add_argument("--table-file", default=None, help="write the markdown table of the runs here")


def cmd_bench_serving(args: argparse.Namespace) -> int:
    from sglang_core.tokenizer import load_tokenizer

    if args.tokenizer is None:
        from sglang_core.weights.default_model import default_model_path

        args.tokenizer = str(default_model_path())
    check_options(args)
    tokenizer = load_tokenizer(args.tokenizer)
    rates = request_rates(args.request_rates) if args.request_rates else [args.request_rate]
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    base = args.base_url.rstrip("/")
    if args.backend == "native":
        async def send(client, req):
            return await send_native(client, base, req, headers, not args.disable_ignore_eos)
    else:
        model = args.model or httpx.get(f"{base}/v1/models", headers=headers).json()["data"][0]["id"]

        async def send(client, req):
            return await send_openai(client, base, req, headers, model, not args.disable_ignore_eos)

    rows, failed = [], 0
    for i, rate in enumerate(rates):
        # Each rate its own prompts: a later run must not find an earlier one's in the prefix cache.
        run_args = argparse.Namespace(**{**vars(args), "request_rate": rate,
                                         "seed": None if args.seed is None else args.seed + i})
        work = workload(run_args, tokenizer)
        results, duration = asyncio.run(run(work.requests, send, rate, args.max_concurrency, work.warmup, work.seed))
        summary = {"seed": work.seed, "request_rate": rate,
                   **summarize(results, duration, args.slo_ttft_ms, args.slo_tpot_ms)}
        config = {k: v for k, v in vars(run_args).items() if k not in ("func", "api_key")}
        print(json.dumps(summary, indent=2), flush=True)
        if args.result_file:
            with open(args.result_file, "a") as f:
                f.write(json.dumps({"config": {**config, "seed": work.seed}, **summary}) + "\n")
        rows.append(summary)
        failed += summary["failed"]
    table = markdown_table(rows)
    print(table)
    if args.table_file:
        with open(args.table_file, "w") as f:
            f.write(table + "\n")
    return 0 if failed == 0 else 1

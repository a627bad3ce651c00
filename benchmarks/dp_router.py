"""Data-parallel routing policies on a shared-prefix load: throughput and prefix-cache hit rate.

Groups of requests share a long prefix (a system prompt, a document); each request adds a short
question of its own. The requests of all groups arrive shuffled, at most ``--concurrency`` in
flight, on ``--dp`` engine replicas behind the router (``DataParallelEngine``, the same object
``sglang-core serve --dp N`` runs, without HTTP). Per policy it reports requests/s, output and
prompt tokens/s, the cache hit rate (cached / prompt tokens, from the replicas' own counts in
each result) and how many requests each replica took. Each policy starts fresh replicas, so
every one begins with empty caches.

CPU, tiny model (a minute or two)::

    python benchmarks/dp_router.py --model-path <tiny model folder> --dp 2

The router's own cost per request, no engines (``--routing-overhead``): each policy's decision
and bookkeeping (``Router.routed``) timed per request over the same load, the cache-aware tree
filling as it goes; median and p99 microseconds::

    python benchmarks/dp_router.py --routing-overhead --dp 8 --groups 64 --per-group 32 --prefix-len 1024

GPU (one GPU per replica: ``--dp`` GPUs)::

    python benchmarks/dp_router.py --model-path meta-llama/Llama-3.1-8B-Instruct --dp 8 --groups 64 \\
        --per-group 32 --prefix-len 1024 --question-len 64 --max-new-tokens 64 --concurrency 256
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time

from sglang_core.plugins import PluginManager
from sglang_core.router.data_parallel import DataParallelEngine
from sglang_core.router.options import RouterOptions
from sglang_core.router.router import Router

from shared_prefix_prefill import shared_prefix_prompts  # this folder's: run the script from anywhere


async def drive(engine: DataParallelEngine, prompts: list[list[int]], args: argparse.Namespace) -> list[dict]:
    gate = asyncio.Semaphore(args.concurrency)
    params = {"max_new_tokens": args.max_new_tokens, "temperature": 0, "ignore_eos": True}

    async def one(ids: list[int]) -> dict:
        async with gate:
            return await engine.async_generate(input_ids=ids, sampling_params=params)

    return await asyncio.gather(*(one(ids) for ids in prompts))


def run_policy(policy: str, args: argparse.Namespace) -> dict:
    settings = {"model_path": args.model_path, "max_running_requests": args.max_running_requests}
    if args.device:
        settings["device"] = args.device
    options = RouterOptions(router_policy=policy, router_balance_abs=args.balance_abs,
                            router_balance_rel=args.balance_rel)
    with DataParallelEngine(settings, args.dp, options) as engine:
        prompts = shared_prefix_prompts(random.Random(args.seed), engine.info.vocab_size, args.groups,
                                        args.per_group, args.prefix_len, args.question_len)
        warm = [[5, 6, 7]] * args.dp  # each replica compiles / warms up once, outside the timing
        asyncio.run(drive(engine, warm, args))
        if not engine.flush_cache():
            raise RuntimeError("the warm-up left requests in flight")
        start = time.perf_counter()
        results = asyncio.run(drive(engine, prompts, args))
        elapsed = time.perf_counter() - start
    metas = [r["meta_info"] for r in results]
    prompt_tokens = sum(m["prompt_tokens"] for m in metas)
    per_replica = [sum(m["replica"] == i for m in metas) for i in range(args.dp)]
    return {
        "policy": policy, "dp": args.dp, "requests": len(results), "seconds": round(elapsed, 3),
        "requests_per_s": round(len(results) / elapsed, 3),
        "output_tokens_per_s": round(sum(m["completion_tokens"] for m in metas) / elapsed, 1),
        "prompt_tokens_per_s": round(prompt_tokens / elapsed, 1),
        "cache_hit_rate": round(sum(m["cached_tokens"] for m in metas) / prompt_tokens, 4),
        "requests_per_replica": per_replica,
    }


def routing_overhead(policy: str, args: argparse.Namespace) -> dict:
    """Per-request time of ``Router.routed`` (choose a replica, count the request in and out)."""
    options = RouterOptions(router_policy=policy, router_balance_abs=args.balance_abs,
                            router_balance_rel=args.balance_rel)
    router = Router(args.dp, options, PluginManager())
    prompts = shared_prefix_prompts(random.Random(args.seed), 128256, args.groups, args.per_group,
                                    args.prefix_len, args.question_len)
    times = []
    for ids in prompts:
        start = time.perf_counter()
        with router.routed(ids):
            pass
        times.append((time.perf_counter() - start) * 1e6)
    times.sort()
    return {"policy": policy, "dp": args.dp, "requests": len(prompts), "prompt_tokens": len(prompts[0]),
            "us_median": round(times[len(times) // 2], 1), "us_p99": round(times[int(len(times) * 0.99)], 1)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-path", default=None, help="default: the embedded model")
    parser.add_argument("--device", default=None, choices=["cpu", "cuda"], help="default: auto")
    parser.add_argument("--dp", type=int, default=2, help="engine replicas")
    parser.add_argument("--policies", default="round_robin,shortest_queue,cache_aware")
    parser.add_argument("--groups", type=int, default=8, help="distinct shared prefixes")
    parser.add_argument("--per-group", type=int, default=8, help="requests per prefix")
    parser.add_argument("--prefix-len", type=int, default=256, help="tokens of each shared prefix")
    parser.add_argument("--question-len", type=int, default=16, help="tokens each request adds")
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--concurrency", type=int, default=16, help="most requests in flight")
    parser.add_argument("--max-running-requests", type=int, default=32, help="per replica")
    parser.add_argument("--balance-abs", type=int, default=RouterOptions.model_fields["router_balance_abs"].default)
    parser.add_argument("--balance-rel", type=float, default=RouterOptions.model_fields["router_balance_rel"].default)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--routing-overhead", action="store_true",
                        help="time only the router's decision per request (no engines)")
    args = parser.parse_args()
    run = routing_overhead if args.routing_overhead else run_policy
    for policy in args.policies.split(","):
        print(json.dumps(run(policy.strip(), args)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

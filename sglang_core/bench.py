"""Benchmarks: ``bench-latency`` (one static batch: prefill latency, decode ms/step) and
``bench-offline`` (many random prompts submitted at once: throughput).

Prompts are random token ids from a seeded generator, with ``ignore_eos`` and greedy sampling,
so every request produces exactly the tokens asked for and runs are repeatable. The measuring
functions take an ``Engine`` so other scripts (``benchmarks/cpu_vs_hf.py``) reuse them.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import time
from typing import TYPE_CHECKING, Any, Callable

from tqdm import tqdm

from sglang_core.engine_args import engine_from_args

if TYPE_CHECKING:
    from sglang_core.engine import Engine


def random_prompts(vocab_size: int, lengths: list[int], seed: int) -> list[list[int]]:
    """One list of random token ids per length, the same for the same seed."""
    rng = random.Random(seed)
    return [[rng.randrange(vocab_size) for _ in range(n)] for n in lengths]


def _params(max_new_tokens: int) -> dict[str, Any]:
    return {"max_new_tokens": max_new_tokens, "temperature": 0.0, "ignore_eos": True}


def _describe(engine: Engine) -> dict[str, Any]:
    info = engine.info
    return {"device": info.device, "dtype": info.dtype, "model": info.model_path}


def _timed_generate(engine: Engine, prompts: list[list[int]], max_new_tokens: int) -> float:
    """Seconds to run ``prompts`` as one batch from an empty prefix cache."""
    if not engine.flush_cache():
        raise RuntimeError("cannot flush the prefix cache while requests are in flight")
    start = time.perf_counter()
    outs = engine.generate(input_ids=prompts, sampling_params=_params(max_new_tokens))
    elapsed = time.perf_counter() - start
    if any(o["meta_info"]["completion_tokens"] != max_new_tokens for o in outs):
        raise RuntimeError("a request stopped before max_new_tokens (is the context too short?)")
    return elapsed


def measure_latency(engine: Engine, batch_size: int, input_len: int, output_len: int, warmup: int = 1,
                    seed: int = 0) -> dict[str, Any]:
    """Prefill latency (the batch with max_new_tokens=1) and decode ms/step of one static batch.

    Decode ms/step is ``(total - prefill) / (output_len - 1)``: the first token comes out of prefill.
    """
    if output_len < 2:
        raise ValueError("output_len: must be at least 2 to measure decode steps")
    vocab = engine.info.vocab_size
    for i in range(warmup):  # other prompts than the measured ones, so nothing of them is cached
        _timed_generate(engine, random_prompts(vocab, [input_len] * batch_size, seed + 1 + i), min(output_len, 8))
    prompts = random_prompts(vocab, [input_len] * batch_size, seed)
    prefill = _timed_generate(engine, prompts, 1)
    total = _timed_generate(engine, prompts, output_len)
    return {
        "batch_size": batch_size, "input_len": input_len, "output_len": output_len,
        "prefill_s": prefill,
        "decode_ms_per_step": (total - prefill) / (output_len - 1) * 1000,
        "output_tok_per_s": batch_size * output_len / total,
        "total_s": total,
        **_describe(engine),
    }


def measure_offline(engine: Engine, prompts: list[list[int]], output_lens: list[int],
                    progress: bool = True) -> dict[str, Any]:
    """Submit every prompt at once (one request each) and time until the last one finishes."""

    async def run() -> list[dict]:
        bar = tqdm(total=len(prompts), desc="requests", unit="req", disable=not progress)

        async def one(ids: list[int], n: int) -> dict:
            out = await engine.async_generate(input_ids=ids, sampling_params=_params(n))
            bar.update(1)
            return out

        try:
            return await asyncio.gather(*(one(ids, n) for ids, n in zip(prompts, output_lens)))
        finally:
            bar.close()

    if not engine.flush_cache():
        raise RuntimeError("cannot flush the prefix cache while requests are in flight")
    before = engine.stats()
    start = time.perf_counter()
    outs = asyncio.run(run())
    elapsed = time.perf_counter() - start
    after = engine.stats()
    if [o["meta_info"]["completion_tokens"] for o in outs] != list(output_lens):
        raise RuntimeError("a request did not produce exactly its max_new_tokens")
    input_tokens, output_tokens = sum(map(len, prompts)), sum(output_lens)
    return {
        "num_prompts": len(prompts), "input_tokens": input_tokens, "output_tokens": output_tokens,
        "total_s": elapsed,
        "requests_per_s": len(prompts) / elapsed,
        "input_tok_per_s": input_tokens / elapsed,
        "output_tok_per_s": output_tokens / elapsed,
        # what the scheduler did, to explain the figure: prompt tokens taken from the prefix cache,
        # forward steps, retractions and so on during this run
        "cached_prompt_tokens": sum(o["meta_info"]["cached_tokens"] for o in outs),
        **{name: after[name] - before[name] for name in after},
        **_describe(engine),
    }


def offline_workload(vocab_size: int, num_prompts: int, input_range: tuple[int, int],
                     output_range: tuple[int, int], seed: int) -> tuple[list[list[int]], list[int]]:
    """Random prompts and output lengths, each length uniform in its inclusive range."""
    rng = random.Random(seed)
    input_lens = [rng.randint(*input_range) for _ in range(num_prompts)]
    output_lens = [rng.randint(*output_range) for _ in range(num_prompts)]
    return random_prompts(vocab_size, input_lens, seed + 1), output_lens


def _save(path: str | None, row: dict[str, Any], kind: str) -> None:
    if path:
        with open(path, "a") as f:
            f.write(json.dumps({"bench": kind, **row}) + "\n")


def _print_table(rows: list[dict[str, Any]], columns: list[str]) -> None:
    cells = [[f"{r[c]:.4g}" if isinstance(r[c], float) else str(r[c]) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    print("  ".join(c.rjust(w) for c, w in zip(columns, widths)))
    for row in cells:
        print("  ".join(v.rjust(w) for v, w in zip(row, widths)))


def cmd_bench_latency(args: argparse.Namespace) -> int:
    batch_sizes = [int(b) for b in str(args.batch_size).split(",") if b.strip()]
    if not batch_sizes or min(batch_sizes) < 1:
        raise ValueError("batch_size: give positive integers, comma-separated")
    engine = engine_from_args(args)
    try:
        rows = []
        for bs in tqdm(batch_sizes, desc="batch sizes", disable=len(batch_sizes) == 1):
            row = measure_latency(engine, bs, args.input_len, args.output_len, args.warmup, args.seed)
            _save(args.result_file, row, "latency")
            rows.append(row)
    finally:
        engine.shutdown()
    _print_table(rows, ["batch_size", "input_len", "output_len", "prefill_s", "decode_ms_per_step",
                        "output_tok_per_s"])
    return 0


def cmd_bench_offline(args: argparse.Namespace) -> int:
    engine = engine_from_args(args)
    try:
        prompts, output_lens = offline_workload(engine.info.vocab_size, args.num_prompts,
                                                (args.input_len_min, args.input_len_max),
                                                (args.output_len_min, args.output_len_max), args.seed)
        row = measure_offline(engine, prompts, output_lens)
    finally:
        engine.shutdown()
    _save(args.result_file, row, "offline")
    _print_table([row], ["num_prompts", "total_s", "requests_per_s", "input_tok_per_s", "output_tok_per_s"])
    return 0


def add_bench_commands(command: Callable[..., argparse.ArgumentParser]) -> None:
    """Register ``bench-latency`` and ``bench-offline`` through the CLI's ``command`` factory."""
    p = command("bench-latency", cmd_bench_latency, "static batch: prefill latency and decode ms/step")
    p.add_argument("--batch-size", default="1", help="batch size, or a comma list such as 1,8 (default: 1)")
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=32)
    p.add_argument("--warmup", type=int, default=1, help="warm-up runs before measuring (default: 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--result-file", default=None, help="append one JSON line per batch size")

    p = command("bench-offline", cmd_bench_offline, "throughput of random prompts all submitted at once")
    p.add_argument("--num-prompts", type=int, default=256)
    p.add_argument("--input-len-min", type=int, default=32)
    p.add_argument("--input-len-max", type=int, default=512)
    p.add_argument("--output-len-min", type=int, default=16)
    p.add_argument("--output-len-max", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--result-file", default=None, help="append the result as one JSON line")

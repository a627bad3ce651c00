"""Constrained decoding: index build time, per-token cost of a constraint, and jump-forward's
speedup, each beside its baseline in the same run, for each grammar backend named (default:
outlines, then llguidance). CPU with the embedded default model by default; any engine settings
for the GPU run (a real tokenizer is needed, since grammars are built from the token texts):

    python benchmarks/constrained.py [--grammar-backend outlines llguidance]
    python benchmarks/constrained.py --device cuda --model-path benchmarks/configs/llama-3.1-8b \
        --load-format dummy --tokenizer-path <folder with tokenizer.json>

1. Index build: a typical JSON Schema's first compile (which also reads the vocabulary, once per
   tokenizer), a variant of it compiled cold with the vocabulary ready, the first mask of that
   variant (llguidance builds its lexer lazily, so part of its work lands here), then the typical
   schema again through the engine's compile cache.
2. Per-token cost: greedy decode of 64 tokens at batch 1 and batch 32, unconstrained vs
   constrained by a regex that leaves every step a free choice (``[a-z ]*``: no jump-forward,
   every token masked). Decode ms/token = (t_64 - t_1) / 63; the two sides alternate
   (``--repeats`` times) and their medians are compared.
3. Jump-forward: a schema with long fixed keys, greedy, batch 1, output tokens/s with
   jump-forward on vs off (``--disable-jump-forward``), and the forward passes each needed.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from typing import Callable

import torch

from sglang_core.constrained.compiler import GrammarCompiler, make_grammar_backend
from sglang_core.engine import Engine

TYPICAL = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 30}, "age": {"type": "integer", "minimum": 0, "maximum": 120},
    "email": {"type": "string", "format": "email"}, "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 5},
    "address": {"type": "object", "properties": {"city": {"type": "string"}, "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                "required": ["city"]}}, "required": ["name", "age"]}
VARIANT = {**TYPICAL, "properties": {**TYPICAL["properties"], "name": {"type": "string", "maxLength": 31}}}
LONG_KEYS = {"type": "object", "properties": {
    f"the_{word}_field_of_this_fairly_long_record_type": {"type": "integer", "minimum": 0, "maximum": 9}
    for word in ("first", "second", "third", "fourth", "fifth", "sixth")}}
LONG_KEYS["required"] = list(LONG_KEYS["properties"])


def index_build(engine: Engine, backend_name: str) -> None:
    backend = make_grammar_backend(engine.plugins, backend_name, engine.tokenizer, engine.info.vocab_size)
    compiler = GrammarCompiler(backend)

    def timed(fn: Callable[[], object]) -> tuple[float, object]:
        start = time.perf_counter()
        result = fn()
        return time.perf_counter() - start, result

    first_s, _ = timed(lambda: compiler.get("json_schema", json.dumps(TYPICAL)).result())
    cold_s, grammar = timed(lambda: compiler.get("json_schema", json.dumps(VARIANT)).result())
    words = torch.zeros(-(-engine.info.vocab_size // 32), dtype=torch.int32)
    mask_s, _ = timed(lambda: grammar.new_state().fill_bitmask(words))
    cached_s, _ = timed(lambda: compiler.get("json_schema", json.dumps(TYPICAL)).result())
    compiler.shutdown()
    print(f"| index build, {backend_name} | typical schema first compile {first_s * 1000:.0f} ms (with the "
          f"vocabulary) | variant cold {cold_s * 1000:.1f} ms, its first mask {mask_s * 1000:.1f} ms | "
          f"cached {cached_s * 1e6:.0f} us |", flush=True)


def decode_ms_per_token(engine: Engine, batch: int, extra: dict) -> float:
    prompts = [f"Write some words, number {i}:" for i in range(batch)]

    def timed(n: int) -> float:
        engine.flush_cache()
        start = time.perf_counter()
        outs = engine.generate(prompts, sampling_params={"max_new_tokens": n, "temperature": 0, "ignore_eos": True,
                                                         **extra})
        assert all(o["meta_info"]["completion_tokens"] == n for o in outs)
        return time.perf_counter() - start

    timed(4)  # warm-up (and compiles the constraint)
    return (timed(64) - timed(1)) / 63 * 1000


def per_token_cost(engine: Engine, backend_name: str, repeats: int) -> None:
    """Unconstrained and constrained runs alternate, ``repeats`` times each, and the medians are
    compared: drift in the machine's speed then hits both sides alike."""
    for batch in (1, 32):
        free, constrained = [], []
        for _ in range(repeats):
            free.append(decode_ms_per_token(engine, batch, {}))
            constrained.append(decode_ms_per_token(engine, batch, {"regex": "[a-z ]*"}))
        a, b = statistics.median(free), statistics.median(constrained)
        print(f"| decode ms/step, {backend_name}, batch {batch}, median of {repeats} alternating runs | unconstrained "
              f"{a:.1f} ({min(free):.1f}-{max(free):.1f}) | constrained {b:.1f} ({min(constrained):.1f}-{max(constrained):.1f}) | "
              f"{(b / a - 1) * 100:+.1f}% |", flush=True)


def jump_forward(backend_name: str, settings: dict) -> None:
    rows = {}
    for disabled in (False, True):
        with Engine(disable_jump_forward=disabled, grammar_backend=backend_name, **settings) as engine:
            params = {"max_new_tokens": 300, "temperature": 0, "json_schema": json.dumps(LONG_KEYS)}
            engine.generate("Fill in the record:", sampling_params=params)  # warm-up, compile
            steps = engine.stats()["forward_steps"]
            start = time.perf_counter()
            out = engine.generate("Fill in the record as JSON:", sampling_params=params)
            elapsed = time.perf_counter() - start
            meta = out["meta_info"]
            rows[disabled] = (meta["completion_tokens"] / elapsed, engine.stats()["forward_steps"] - steps, meta)
            json.loads(out["text"])
    on, off = rows[False], rows[True]
    print(f"| jump-forward, {backend_name}, long fixed keys, batch 1 | on {on[0]:.1f} tok/s, {on[1]} forward passes "
          f"({on[2]['forced_tokens']} of {on[2]['completion_tokens']} tokens forced) | off {off[0]:.1f} tok/s, "
          f"{off[1]} forward passes | {on[0] / off[0]:.2f}x |", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--grammar-backend", nargs="+", default=["outlines", "llguidance"],
                        help="grammar backends to measure, one after the other")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=5, help="alternating runs per side for the per-token cost")
    for option in ("--model-path", "--tokenizer-path", "--load-format", "--dtype"):
        parser.add_argument(option, default=None)
    args = parser.parse_args()
    settings = {k: v for k, v in vars(args).items() if k not in ("grammar_backend", "repeats") and v is not None}
    print(f"settings: {settings}", flush=True)
    for name in args.grammar_backend:
        with Engine(grammar_backend=name, **settings) as engine:
            index_build(engine, name)
            per_token_cost(engine, name, args.repeats)
        jump_forward(name, settings)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Constrained decoding on CPU with the embedded default model: index build time, per-token cost
of a constraint, and jump-forward's speedup, each beside its baseline in the same run.

    python benchmarks/constrained_cpu.py

1. Index build: the vocabulary (once per tokenizer), then a typical JSON Schema's index cold,
   then the same schema again through the engine's compile cache.
2. Per-token cost: greedy decode of 64 tokens at batch 1 and batch 32, unconstrained vs
   constrained by a regex that leaves every step a free choice (``[a-z ]*``: no jump-forward,
   every token masked). Decode ms/token = (t_64 - t_1) / 63.
3. Jump-forward: a schema with long fixed keys, greedy, batch 1, output tokens/s with
   jump-forward on vs off (``--disable-jump-forward``), and the forward passes each needed.
"""

from __future__ import annotations

import json
import sys
import time

from sglang_core.constrained.compiler import GrammarCompiler, make_grammar_backend
from sglang_core.engine import Engine

TYPICAL = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 30}, "age": {"type": "integer", "minimum": 0, "maximum": 120},
    "email": {"type": "string", "format": "email"}, "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 5},
    "address": {"type": "object", "properties": {"city": {"type": "string"}, "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                "required": ["city"]}}, "required": ["name", "age"]}
LONG_KEYS = {"type": "object", "properties": {
    f"the_{word}_field_of_this_fairly_long_record_type": {"type": "integer", "minimum": 0, "maximum": 9}
    for word in ("first", "second", "third", "fourth", "fifth", "sixth")}}
LONG_KEYS["required"] = list(LONG_KEYS["properties"])


def index_build(engine: Engine) -> None:
    backend = make_grammar_backend(engine.plugins, "outlines", engine.tokenizer, engine.info.vocab_size)
    start = time.perf_counter()
    backend._vocabulary  # noqa: B018 - built on first use; timed on its own
    vocab_s = time.perf_counter() - start
    compiler = GrammarCompiler(backend)
    start = time.perf_counter()
    compiler.get("json_schema", json.dumps(TYPICAL)).result()
    cold_s = time.perf_counter() - start
    start = time.perf_counter()
    compiler.get("json_schema", json.dumps(TYPICAL)).result()
    cached_s = time.perf_counter() - start
    compiler.shutdown()
    print(f"| index build | vocabulary {vocab_s * 1000:.0f} ms (once per tokenizer) | typical schema cold "
          f"{cold_s * 1000:.0f} ms | cached {cached_s * 1e6:.0f} us |", flush=True)


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


def per_token_cost(engine: Engine) -> None:
    for batch in (1, 32):
        free = decode_ms_per_token(engine, batch, {})
        constrained = decode_ms_per_token(engine, batch, {"regex": "[a-z ]*"})
        print(f"| decode ms/step, batch {batch} | unconstrained {free:.1f} | constrained {constrained:.1f} | "
              f"{(constrained / free - 1) * 100:+.1f}% |", flush=True)


def jump_forward() -> None:
    rows = {}
    for disabled in (False, True):
        with Engine(device="cpu", disable_jump_forward=disabled) as engine:
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
    print(f"| jump-forward, long fixed keys, batch 1 | on {on[0]:.1f} tok/s, {on[1]} forward passes "
          f"({on[2]['forced_tokens']} of {on[2]['completion_tokens']} tokens forced) | off {off[0]:.1f} tok/s, "
          f"{off[1]} forward passes | {on[0] / off[0]:.2f}x |", flush=True)


def main() -> int:
    with Engine(device="cpu") as engine:
        index_build(engine)
        per_token_cost(engine)
    jump_forward()
    return 0


if __name__ == "__main__":
    sys.exit(main())

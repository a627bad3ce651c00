"""How much of a shared-prefix workload's prompts the engine computes, against the ideal (each
system prompt once, each question once): groups of requests that share a system prompt arrive
together, shuffled, more than fit the running batch at once. Counts, not timings, so any machine
gives the same figures for the same commit and settings.

    python benchmarks/shared_prefix_prefill.py [--model-path PATH] [--groups 8] [--per-group 8]
"""

from __future__ import annotations

import argparse
import random
import sys

from sglang_core.engine import Engine


def shared_prefix_prompts(rng: random.Random, vocab_size: int, groups: int, per_group: int, prefix_len: int,
                          question_len: int) -> list[list[int]]:
    """Shuffled random token prompts: ``groups`` prefixes, ``per_group`` questions after each."""
    prompts = []
    for _ in range(groups):
        prefix = [rng.randrange(3, vocab_size) for _ in range(prefix_len)]
        prompts += [prefix + [rng.randrange(3, vocab_size) for _ in range(question_len)] for _ in range(per_group)]
    rng.shuffle(prompts)
    return prompts


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-path", default=None, help="default: the embedded model")
    parser.add_argument("--groups", type=int, default=8)
    parser.add_argument("--per-group", type=int, default=8)
    parser.add_argument("--system-len", type=int, default=128)
    parser.add_argument("--question-len", type=int, default=8)
    parser.add_argument("--max-running-requests", type=int, default=32)
    args = parser.parse_args()
    with Engine(args.model_path, max_running_requests=args.max_running_requests, chunked_prefill_size=512,
                max_prefill_tokens=1024) as engine:
        prompts = shared_prefix_prompts(random.Random(0), engine.info.vocab_size, args.groups, args.per_group,
                                        args.system_len, args.question_len)
        outs = engine.generate(input_ids=prompts, sampling_params={"max_new_tokens": 16, "temperature": 0,
                                                                   "ignore_eos": True})
    total = sum(map(len, prompts))
    computed = total - sum(o["meta_info"]["cached_tokens"] for o in outs)
    ideal = args.groups * args.system_len + len(prompts) * args.question_len
    print(f"prompt tokens {total}; computed {computed}; ideal {ideal} ({computed / ideal:.2f}x ideal)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

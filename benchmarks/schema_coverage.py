"""JSON Schema coverage of each grammar backend, over the generated corpus of
``tests/schema_corpus.py`` (240 schemas in the style of OpenAI structured outputs):

    python benchmarks/schema_coverage.py [--backends outlines llguidance xgrammar] [--walks 3]

Per backend, with the embedded default model's tokenizer (no model runs: outputs are random
walks under the grammar's mask, which reach far more of a grammar than a model's likely text):

- compiled / refused: the backend's request-side check and compile both pass, or one says no;
- outputs valid: each walk's text validated by ``jsonschema`` (draft 2020-12, with the formats its
  installed checkers know), an independent reference; "unfinished": walks that did not end
  within their step budget (not counted as valid);
- compile ms p50 / p99: each schema compiled cold (the vocabulary is set up before timing);
- mask us/token: the mean time of one ``fill_bitmask`` over every walk's steps.
"""

from __future__ import annotations

import argparse
import collections
import json
import random
import statistics
import sys
import time
from pathlib import Path

import jsonschema

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from schema_corpus import TokenClasses, corpus, random_walk  # noqa: E402
from sglang_core.constrained.compiler import make_grammar_backend  # noqa: E402
from sglang_core.constrained.vocab import token_bytes  # noqa: E402
from sglang_core.plugins import PluginManager  # noqa: E402
from sglang_core.tokenizer import load_tokenizer  # noqa: E402
from sglang_core.weights.default_model import default_model_path  # noqa: E402


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def measure(name: str, schemas: list[dict], walks: int, tokenizer, tokens: TokenClasses) -> dict:
    backend = make_grammar_backend(PluginManager(), name, tokenizer, len(tokenizer))
    backend.compile("json_schema", json.dumps({"type": "boolean"}))  # vocabulary and worker set up
    refusals: collections.Counter[str] = collections.Counter()
    compile_ms, mask_s = [], []
    valid = invalid = unfinished = 0
    try:
        for i, schema in enumerate(schemas):
            spec = json.dumps(schema)
            try:
                backend.validate("json_schema", spec)
                start = time.perf_counter()
                grammar = backend.compile("json_schema", spec)
                compile_ms.append((time.perf_counter() - start) * 1e3)
            except ValueError as exc:
                refusals[str(exc)[:100]] += 1
                continue
            validator = jsonschema.Draft202012Validator(
                schema, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER)
            rng = random.Random(i)
            for _ in range(walks):
                text, seconds = random_walk(grammar, tokens, rng)
                mask_s += seconds
                if text is None:
                    unfinished += 1
                    continue
                try:
                    ok = validator.is_valid(json.loads(text))
                except ValueError:  # not JSON at all
                    ok = False
                valid += ok
                invalid += not ok
    finally:
        backend.close()
    return {"backend": name, "schemas": len(schemas), "compiled": len(compile_ms), "refused": sum(refusals.values()),
            "outputs": valid + invalid + unfinished, "valid": valid, "invalid": invalid, "unfinished": unfinished,
            "compile_ms_p50": statistics.median(compile_ms), "compile_ms_p99": percentile(compile_ms, 0.99),
            "mask_us_per_token": statistics.fmean(mask_s) * 1e6, "refusals": refusals.most_common(8)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backends", nargs="+", default=["outlines", "llguidance", "xgrammar"])
    parser.add_argument("--walks", type=int, default=3, help="random outputs drawn per compiled schema")
    parser.add_argument("--size", type=int, default=240, help="schemas taken from the corpus")
    args = parser.parse_args()
    tokenizer = load_tokenizer(default_model_path())
    tokens = TokenClasses(token_bytes(tokenizer, len(tokenizer)), tokenizer.eos_token_id)
    schemas = corpus(args.size)
    results = [measure(name, schemas, args.walks, tokenizer, tokens) for name in args.backends]
    print("| backend | compiled | refused | outputs valid | invalid | unfinished | compile ms p50 | p99 | mask us/token |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['backend']} | {r['compiled']}/{r['schemas']} | {r['refused']} | {r['valid']}/{r['outputs']} "
              f"| {r['invalid']} | {r['unfinished']} | {r['compile_ms_p50']:.1f} | {r['compile_ms_p99']:.1f} "
              f"| {r['mask_us_per_token']:.1f} |")
    for r in results:
        for reason, count in r["refusals"]:
            print(f"{r['backend']} refused {count}: {reason}")
    print(json.dumps(results))


if __name__ == "__main__":
    main()

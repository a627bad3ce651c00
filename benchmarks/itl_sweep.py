"""Inter-token latency under load (issue 23): `sglang-core serve` on a model config with dummy
weights, once per scheduling policy, each loaded by `sglang-core bench-serving` at every rate.

    bash benchmarks/gpu_run.sh python3 benchmarks/itl_sweep.py --out "$OUT"   # H200, one call, < 10 min
    python benchmarks/itl_sweep.py --dry-run --out /tmp/itl                   # CPU: proves the script

The workload of the issue: random prompts, input 1024 and output 256 tokens, each +-50%
(`--random-range-ratio 0.5`: uniform in [512, 1024] and [128, 256]), EOS ignored, Poisson
arrivals at 1, 8, 16, 32 req/s and all at once (inf), TTFT <= 200 ms and TPOT <= 20 ms for
goodput. To fit one 10-minute device call, a rate gets at most `--max-requests` (300) requests
and no more than arrive in `--window-s` (15 s): 15 at 1 req/s, 120 at 8, 240 at 16, 300 at 32
and inf. Every rate has its own prompts (seed `--seed` + the rate's index), the same for every
policy, each policy on a fresh server (nothing cached from another's run). Before the measured
rates each server takes a short warm-up load (all at once, so prefill and decode share steps and
every kernel is compiled). Runs that would pass `--deadline-s` are skipped and say so.

Policies (`--policy NAME=FLAGS`, repeatable; default: the three below): `default` (today's
schedule), `rows256` and `rows512` (`--extend-graph-max-tokens N --max-step-tokens N`: every step
carrying prefill holds at most N tokens, decodes first, and replays the decode CUDA graphs as one
row per token, so it costs about a decode step of N rows instead of an eager pass; 512 also needs
`--cuda-graph-max-bs 512`). Measured on an H100 (2026-12-07, docs/benchmarks.md): an eager step
costs ~17 ms of launches at any size against ~6.5 ms for a graph decode step, so no budget of
eager steps can hold the stall near 2.5 decode steps: `--target-step-ratio 2.3` shrank steps to
32 tokens and admitted 1.9 of 8 requests a second (since then budgets stop at the cost line's
knee), `--max-step-tokens 256` starved prefill at saturation (half the throughput), and
`--target-step-ms 12 --max-step-tokens 512` missed its target (p99 ITL 21 ms at 8 req/s).
Since the row-chunk graphs (14:51-15:07, docs/benchmarks.md) rows256 meets the ITL bar but
holds ~48 decodes at saturation against the default's ~108 (0.65x throughput): hence
`--max-queue-prefill-ms` (the budget grows while the queue cannot be prefilled in time) in
`benchmarks/plans/policy-sweep.txt`'s rows384q200 (docs/gpu.md, issue 23).
A policy whose server fails to start is reported as skipped, with its log kept.

Workloads (`--workloads`, comma-separated, for checking a policy on a shape it was not tuned
on): `issue` (the above), `chat` (prompts 64-128 tokens, outputs 256-512: decode-bound, prefill
steps small) and `wide` (prompts 204-2048 tokens, outputs 51-512, `--random-range-ratio 0.1`:
long and short prompts and answers mixed, so a step meets prompts of many chunks). Each policy's
server runs every workload's rates in turn (one start per policy: a start with graph capture is
about half of a policy's time); each workload has its own prompts. `--input-len`,
`--output-len` and `--range-ratio` override every workload's.

Writes to `--out` three files (the device tool returns at most 8 a call): `itl_sweep.jsonl`
(bench-serving's JSON line per run, with `policy`, `workload` and the server's KV pool size in tokens,
appended as each run ends),
`itl_sweep.md` (per workload, a table per policy, then the issue's checks side by side) and `details.tar.gz` (each run's result
file and each server's log).
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from serving_cpu import stop, wait_healthy

from sglang_core.bench_serving import markdown_table

CONFIG = Path(__file__).parent / "configs" / "llama-3.1-8b"
# name: (input length, output length, range ratio): lengths uniform in [len * ratio, len].
WORKLOADS = {"issue": (1024, 256, 0.5), "chat": (128, 512, 0.5), "wide": (2048, 512, 0.1)}
POLICIES = {"default": "", "rows256": "--extend-graph-max-tokens 256 --max-step-tokens 256",
            "rows512": "--extend-graph-max-tokens 512 --max-step-tokens 512 --cuda-graph-max-bs 512"}
# The tiny model of --dry-run (its tokenizer is the engine's placeholder for a bare config folder).
TINY_CONFIG = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 259, "hidden_size": 64,
               "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
               "num_key_value_heads": 2, "max_position_embeddings": 1024, "eos_token_id": 2, "bos_token_id": 1}
BENCH_SLACK_S = 25  # a run's time beyond its arrivals: process start, prompts, the last requests' decode


def server_call(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=30) as response:
        return json.loads(response.read())


def requests_at(rate: float, args: argparse.Namespace) -> int:
    return args.max_requests if math.isinf(rate) else max(1, min(args.max_requests, math.ceil(rate * args.window_s)))


def workload_lengths(name: str, args: argparse.Namespace) -> tuple[str, int, int, float]:
    """(name, input length, output length, range ratio): the workload's, unless overridden."""
    if name not in WORKLOADS:
        raise ValueError(f"--workloads: unknown workload {name!r} (known: {', '.join(WORKLOADS)})")
    preset = WORKLOADS[name]
    given = (args.input_len, args.output_len, args.range_ratio)
    return (name, *(value if value is not None else default for value, default in zip(given, preset)))


def tokenizer_folder(config: Path) -> str:
    """The stand-in tokenizer the engine itself uses for this bare config folder."""
    from sglang_core.tokenizer import placeholder_tokenizer

    cfg = json.loads((config / "config.json").read_text())
    eos = cfg.get("eos_token_id")
    return str(placeholder_tokenizer(cfg["vocab_size"], eos[0] if isinstance(eos, list) else eos))


def bench(args: argparse.Namespace, url: str, tokenizer: str, rate: float, num: int, seed: int,
          result_file: Path | None, lengths: tuple[int, int, float]) -> int:
    """One bench-serving run of prompts of (input length, output length, range ratio); returns its
    exit status (1: some request failed, reported in the row)."""
    input_len, output_len, range_ratio = lengths
    command = [sys.executable, "-m", "sglang_core.cli", "bench-serving", "--base-url", url, "--backend", "native",
               "--tokenizer", tokenizer, "--dataset", "random", "--num-prompts", str(num),
               "--random-input-len", str(input_len), "--random-output-len", str(output_len),
               "--random-range-ratio", str(range_ratio), "--request-rate", str(rate), "--seed", str(seed),
               "--warmup-requests", "1", "--slo-ttft-ms", str(args.slo_ttft_ms), "--slo-tpot-ms", str(args.slo_tpot_ms)]
    if result_file is not None:
        command += ["--result-file", str(result_file)]
    print("$", shlex.join(command[2:]), flush=True)
    return subprocess.run(command, stdout=subprocess.DEVNULL).returncode


def run_policy(args: argparse.Namespace, name: str, flags: str, config: Path, tokenizer: str, out: Path,
               start: float) -> list[dict]:
    """Serve with the policy's flags; warm up; one bench-serving run per workload and rate. Returns
    the rows."""
    url = f"http://127.0.0.1:{args.port}"
    command = [sys.executable, "-m", "sglang_core.cli", "serve", "--model-path", str(config), "--load-format", "dummy",
               "--port", str(args.port), *args.server_flags, *shlex.split(flags)]
    print(f"== {name}: {shlex.join(command[2:])}", flush=True)
    with open(out / "details" / f"server-{name}.log", "w") as log:
        server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    rows = []
    try:
        wait_healthy(f"{url}/health", server, args.server_timeout_s)
        print(f"   healthy after {time.monotonic() - start:.0f} s of the run", flush=True)
        first = args.workloads[0]
        bench(args, url, tokenizer, float("inf"), args.warmup_requests, args.seed - 1, None, (first[1], 16, first[3]))
        for (workload, *lengths), i in ((w, i) for w in args.workloads for i in range(len(args.rates))):
            rate = args.rates[i]
            # The first workload keeps the seeds it had alone; each other one has prompts of its own.
            seed = args.seed + 100 * args.workloads.index((workload, *lengths)) + i
            num = requests_at(rate, args)
            arrivals = 0 if math.isinf(rate) else num / rate
            key = {"policy": name, "workload": workload, "request_rate": rate}
            if time.monotonic() - start + arrivals + BENCH_SLACK_S > args.deadline_s:
                rows.append(key | {"skipped": "past --deadline-s"})
                print(f"   {workload} rate {rate:g}: skipped, past --deadline-s", flush=True)
                continue
            result_file = out / "details" / f"run-{name}-{workload}-{rate:g}.jsonl"
            status = bench(args, url, tokenizer, rate, num, seed, result_file, tuple(lengths))
            if not result_file.exists():
                rows.append(key | {"skipped": f"bench-serving exited with {status}"})
                print(f"   {workload} rate {rate:g}: bench-serving exited with {status}, no result", flush=True)
                continue
            # A saturated run is bounded by the KV pool, which a policy's larger graphs may shrink.
            row = key | {"flags": flags, **json.loads(result_file.read_text().splitlines()[-1]),
                         "kv_pool_tokens": server_call(f"{url}/get_server_info")["max_total_tokens"]}
            rows.append(row)
            with open(out / "itl_sweep.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")
            itl = row["itl"]
            print(f"   {workload} rate {rate:g}: {row['completed']} done, ITL p50 {itl['median_ms']:.1f} ms p99 "
                  f"{itl['p99_ms']:.1f} ms, {row['output_throughput']:.0f} out tok/s, KV pool {row['kv_pool_tokens']} "
                  f"({time.monotonic() - start:.0f} s of the run)", flush=True)
    finally:
        stop(server)
    return rows


def checks_table(rows: list[dict]) -> str:
    """The issue's checks per policy, over one workload's rows: the ITL tail over its median at 8 and 16 req/s, median TTFT
    at 1 and 16, saturated output throughput (and its ratio to the first policy's), goodput."""
    measured = {(r["policy"], r["request_rate"]): r for r in rows if "skipped" not in r}
    policies = list(dict.fromkeys(r["policy"] for r in rows))
    rates = list(dict.fromkeys(r["request_rate"] for r in rows))
    inf = float("inf")
    base = measured.get((policies[0], inf))

    def cell(policy: str, rate: float, value) -> str:
        row = measured.get((policy, rate))
        return "-" if row is None else value(row)

    lines = ["| policy | ITL p99/p50 @8 | ITL p99/p50 @16 | TTFT p50 @1 (ms) | TTFT p50 @16 (ms) | out tok/s @inf "
             "(vs first) | goodput req/s at " + ", ".join(f"{r:g}" for r in rates) + " |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    def itl_ratio(row: dict) -> str:
        return f"{row['itl']['p99_ms'] / row['itl']['median_ms']:.1f}x"

    def median_ttft(row: dict) -> str:
        return f"{row['ttft']['median_ms']:.0f}"

    def throughput(row: dict) -> str:
        versus = f" ({row['output_throughput'] / base['output_throughput']:.2f})" if base else ""
        return f"{row['output_throughput']:.0f}{versus}"

    def goodput(row: dict) -> str:
        return f"{row['goodput']:.2f}"

    for p in policies:
        lines.append(f"| {p} | {cell(p, 8.0, itl_ratio)} | {cell(p, 16.0, itl_ratio)} | {cell(p, 1.0, median_ttft)} "
                     f"| {cell(p, 16.0, median_ttft)} | {cell(p, inf, throughput)} "
                     f"| {', '.join(cell(p, r, goodput) for r in rates)} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="folder for the JSON lines, the tables and the server logs")
    parser.add_argument("--policy", action="append", default=None, metavar="NAME=FLAGS",
                        help="a server configuration to measure (repeatable; default: " + ", ".join(POLICIES) + ")")
    parser.add_argument("--rates", default="1,8,16,32,inf")
    parser.add_argument("--max-requests", type=int, default=300)
    parser.add_argument("--window-s", type=float, default=15.0, help="at most the requests arriving in this time")
    parser.add_argument("--workloads", default="issue",
                        help="comma-separated, each run on every policy's server in turn: " + "; ".join(
                            f"{name}: {i}/{o} ratio {r}" for name, (i, o, r) in WORKLOADS.items()))
    parser.add_argument("--input-len", type=int, default=None, help="longest prompt (default: the workload's)")
    parser.add_argument("--output-len", type=int, default=None, help="longest output (default: the workload's)")
    parser.add_argument("--range-ratio", type=float, default=None,
                        help="lengths uniform in [len * ratio, len] (default: the workload's)")
    parser.add_argument("--warmup-requests", type=int, default=32)
    parser.add_argument("--slo-ttft-ms", type=float, default=200.0)
    parser.add_argument("--slo-tpot-ms", type=float, default=20.0)
    parser.add_argument("--seed", type=int, default=2300)
    parser.add_argument("--port", type=int, default=30230)
    parser.add_argument("--deadline-s", type=float, default=570.0, help="skip runs that would end after this")
    parser.add_argument("--server-timeout-s", type=float, default=300.0)
    parser.add_argument("--dry-run", action="store_true",
                        help="CPU check of the script: a tiny config, 5 requests per rate, lengths 1/32 of the workload's")
    args = parser.parse_args()
    args.rates = [float(r) for r in args.rates.split(",")]
    args.workloads = [workload_lengths(name, args) for name in args.workloads.split(",")]
    policies = dict(p.split("=", 1) for p in args.policy) if args.policy else POLICIES
    out = Path(args.out)
    (out / "details").mkdir(parents=True, exist_ok=True)
    (out / "itl_sweep.jsonl").unlink(missing_ok=True)
    config = CONFIG
    args.server_flags = []
    if args.dry_run:
        config = Path(tempfile.mkdtemp(prefix="itl-sweep-tiny-"))
        (config / "config.json").write_text(json.dumps(TINY_CONFIG))
        args.server_flags = ["--device", "cpu", "--context-length", "256"]
        args.max_requests, args.warmup_requests = 5, 2
        args.workloads = [(name, max(2, i // 32), max(2, o // 32), r) for name, i, o, r in args.workloads]
    tokenizer = tokenizer_folder(config)
    start = time.monotonic()
    rows: list[dict] = []
    for name, flags in policies.items():
        unmeasured = [{"policy": name, "workload": w[0], "request_rate": rate} for w in args.workloads for rate in args.rates]
        if time.monotonic() - start + 120 > args.deadline_s:
            rows += [key | {"skipped": "past --deadline-s"} for key in unmeasured]
            print(f"== {name}: skipped, past --deadline-s", flush=True)
            continue
        try:
            rows += run_policy(args, name, flags, config, tokenizer, out, start)
        except RuntimeError as exc:  # a server that does not start: the other policies still run
            rows += [key | {"skipped": f"server failed: {exc}"} for key in unmeasured]
            print(f"== {name}: {exc} (its log is in details.tar.gz)", flush=True)
    sections = [f"{len(policies)} policies on {config.name}, {time.monotonic() - start:.0f} s; requests per rate: "
                + ", ".join(f"{r:g}: {requests_at(r, args)}" for r in args.rates)]
    for workload, input_len, output_len, range_ratio in args.workloads:
        ran = [r for r in rows if r["workload"] == workload]
        sections.append(f"## Workload {workload}: input {input_len}, output {output_len}, range ratio {range_ratio:g}")
        for name, flags in policies.items():
            measured = [r for r in ran if r["policy"] == name and "skipped" not in r]
            skipped = [f"{r['request_rate']:g}" for r in ran if r["policy"] == name and "skipped" in r]
            sections.append(f"### {name} (`{flags or 'no flags'}`)" + (f"; skipped rates: {', '.join(skipped)}" if skipped else "")
                            + ("\n\n" + markdown_table(measured) if measured else ""))
        sections.append(f"### Checks, workload {workload}\n\n" + checks_table(ran))
    report = "\n\n".join(sections) + "\n"
    (out / "itl_sweep.md").write_text(report)
    shutil.make_archive(str(out / "details"), "gztar", root_dir=out / "details")
    shutil.rmtree(out / "details")
    print("\n" + report)
    return 0 if all("skipped" not in r and r["failed"] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())

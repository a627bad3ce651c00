"""``sglang-core serve`` under ``bench-serving`` load on CPU, beside baselines measured in the same run.

    python benchmarks/serving_cpu.py                      # our server at two rates + offline engine
    python benchmarks/serving_cpu.py --hf-serve           # also HF's `transformers serve`, same load

1. Starts ``sglang-core serve`` (the embedded default model) and waits for ``/health``.
2. Runs ``sglang-core bench-serving`` (native API, random dataset, EOS ignored) at each
   ``--rates`` request rate (Poisson arrivals), then stops the server with SIGTERM.
3. Baseline A: the same requests (the same seeded token ids and output lengths) through the
   offline engine in this process, all submitted at once: the throughput ceiling with no HTTP.
4. Baseline B (``--hf-serve``): ``transformers serve <model folder>`` on another port, loaded
   with the same ``bench-serving`` command through its OpenAI ``/v1/completions`` route.
   HF's server rejects ``ignore_eos``, so requests may stop at EOS there: our server is also
   run with ``--disable-ignore-eos`` at each rate (step 2), so that pair sees the same work.

Every run's JSON lands in ``--result-dir``; the table printed at the end is what
docs/benchmarks.md records.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx


def wait_healthy(url: str, process: subprocess.Popen, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{url}: the server exited with {process.returncode}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise RuntimeError(f"{url}: not healthy after {timeout_s} s")


def stop(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()


def bench(args: argparse.Namespace, base_url: str, backend: str, rate: float, out: Path,
          extra: list[str] = ()) -> dict:
    out.unlink(missing_ok=True)
    command = [sys.executable, "-m", "sglang_core.cli", "bench-serving", "--base-url", base_url, "--backend", backend,
               "--dataset", "random", "--num-prompts", str(args.num_prompts),
               "--random-input-len", str(args.input_len), "--random-output-len", str(args.output_len),
               "--random-range-ratio", str(args.range_ratio), "--request-rate", str(rate),
               "--seed", str(args.seed), "--result-file", str(out), *extra]
    print("$", " ".join(command[2:]), flush=True)
    subprocess.run(command, check=True)
    return json.loads(out.read_text().splitlines()[-1])


def offline_baseline(args: argparse.Namespace) -> dict:
    """The same requests bench-serving sends, through the in-process engine, all at once."""
    from sglang_core.bench_serving import random_dataset
    from sglang_core.engine import Engine
    from sglang_core.tokenizer import load_tokenizer
    from sglang_core.weights.default_model import default_model_path

    tokenizer = load_tokenizer(str(default_model_path()))
    requests = random_dataset(tokenizer, args.num_prompts, args.input_len, args.output_len, args.range_ratio,
                              args.seed)
    with Engine(device="cpu") as engine:
        engine.generate(input_ids=[1, 2, 3], sampling_params={"max_new_tokens": 4})  # warm-up
        start = time.perf_counter()
        results = engine.generate(
            input_ids=[r.input_ids for r in requests],
            sampling_params=[{"max_new_tokens": r.output_len, "temperature": 0.0, "ignore_eos": True}
                             for r in requests])
        duration = time.perf_counter() - start
    output = sum(r["meta_info"]["completion_tokens"] for r in results)
    return {"duration_s": duration, "output_tokens": output, "request_throughput": len(requests) / duration,
            "input_throughput": sum(len(r.input_ids) for r in requests) / duration,
            "output_throughput": output / duration}


def row(name: str, rate: str, r: dict) -> str:
    tokens = f"{r['output_tokens']}"
    if "ttft" not in r:
        return (f"| {name} | {rate} | {r['request_throughput']:.2f} | {r['output_throughput']:.1f} | {tokens} "
                f"| - | - | - | - |")
    ttft, tpot, e2e = r["ttft"], r["tpot"], r["e2e"]
    return (f"| {name} | {rate} | {r['request_throughput']:.2f} | {r['output_throughput']:.1f} | {tokens} | "
            f"{ttft['mean_ms']:.0f} / {ttft['median_ms']:.0f} / {ttft['p99_ms']:.0f} | "
            f"{tpot['mean_ms']:.0f} / {tpot['median_ms']:.0f} | "
            f"{e2e['mean_ms'] / 1000:.1f} / {e2e['p99_ms'] / 1000:.1f} | {r['completed']}/{r['completed'] + r['failed']} |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rates", default="0.5,2", help="request rates, requests/s (default: 0.5,2)")
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--input-len", type=int, default=256)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--range-ratio", type=float, default=0.5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--port", type=int, default=30123)
    parser.add_argument("--hf-serve", action="store_true", help="also load `transformers serve` the same way")
    parser.add_argument("--result-dir", default="bench_results/serving_cpu")
    args = parser.parse_args()
    results_dir = Path(args.result_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    rates = [float(r) for r in args.rates.split(",")]
    rows = []

    url = f"http://127.0.0.1:{args.port}"
    server = subprocess.Popen([sys.executable, "-m", "sglang_core.cli", "serve", "--port", str(args.port),
                               "--device", "cpu"], env={"OMP_WAIT_POLICY": "PASSIVE", **os.environ})
    try:
        wait_healthy(f"{url}/health", server, 300)
        for rate in rates:
            rows.append(row("sglang-core serve", f"{rate:g}", bench(args, url, "native", rate,
                                                                   results_dir / f"ours_{rate:g}.jsonl")))
        if args.hf_serve:
            for rate in rates:
                rows.append(row("sglang-core serve, stop at EOS", f"{rate:g}", bench(
                    args, url, "openai", rate, results_dir / f"ours_eos_{rate:g}.jsonl", ["--disable-ignore-eos"])))
    finally:
        stop(server)
    print("server exit code", server.returncode, flush=True)

    rows.append(row("offline engine (same requests, all at once)", "all at once", offline_baseline(args)))

    if args.hf_serve:
        from sglang_core.weights.default_model import default_model_path

        folder = str(default_model_path())
        hf_port = args.port + 1
        hf = subprocess.Popen(["transformers", "serve", folder, "--port", str(hf_port), "--device", "cpu"])
        try:
            wait_healthy(f"http://127.0.0.1:{hf_port}/health", hf, 300)
            for rate in rates:
                rows.append(row("transformers serve", f"{rate:g}", bench(
                    args, f"http://127.0.0.1:{hf_port}", "openai", rate, results_dir / f"hf_{rate:g}.jsonl",
                    ["--model", folder, "--disable-ignore-eos"])))
        finally:
            stop(hf)

    print("\n| server | rate (req/s) | req/s | output tok/s | output tokens | TTFT ms mean / median / p99 | TPOT ms mean / median "
          "| E2E s mean / p99 | completed |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())

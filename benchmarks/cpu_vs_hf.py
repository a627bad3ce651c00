"""SmolLM2-135M on CPU: sglang-core against Hugging Face transformers, in one run on one machine.

    python benchmarks/cpu_vs_hf.py            # the full comparison (many minutes on 2 cores)
    python benchmarks/cpu_vs_hf.py --quick    # a smoke run: fewer prompts, shorter outputs

Both sides load the same weights (the embedded default model's converted folder) in float32 and
run greedy, with EOS ignored, on the same seeded random token ids.

(a) Batch-1 decode: one prompt of ``--input-len`` tokens. Each side runs it with
    max_new_tokens=1 (prefill) and with max_new_tokens=N; decode tok/s = (N - 1) / (t_N - t_1).
    The sides alternate for ``--repeats`` rounds and the median of each side is reported, so load
    from elsewhere on the machine hits both alike.
(b) Offline throughput: ``--num-prompts`` prompts, input lengths uniform in 32..512, output
    lengths uniform in 16..256. Ours: every prompt submitted at once, each with its own
    max_new_tokens. HF: prompts sorted by input length, cut into batches of ``--hf-batch-sizes``,
    left-padded, and each batch generated with min_new_tokens = max_new_tokens = the largest output
    length in the batch (HF's generate has no per-row length); only each request's own output
    length counts as useful tokens, so HF's extra tokens for shorter requests are paid but not
    credited. Throughput = useful output tokens / wall time, both sides. HF runs once per batch
    size given and its fastest is the HF figure (all are in the JSON).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from sglang_core.bench import measure_latency, measure_offline, offline_workload, random_prompts


def machine() -> dict[str, Any]:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return {"nproc": os.cpu_count(), "cores_usable": len(os.sched_getaffinity(0)), "cpu": cpu,
            "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version()}


def transformers_version() -> str:
    import transformers

    return transformers.__version__


class HFRunner:
    def __init__(self, folder: Path):
        from transformers import AutoModelForCausalLM

        from sglang_core.weights.gguf_convert import GGUF_LINK

        # A GGUF model's folder holds no weights of its own: transformers reads the linked GGUF.
        gguf = {"gguf_file": GGUF_LINK} if (Path(folder) / GGUF_LINK).exists() else {}
        self.model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **gguf).eval()
        config = self.model.config
        self.pad_id = config.pad_token_id if config.pad_token_id is not None else config.eos_token_id

    @torch.inference_mode()
    def generate(self, prompts: list[list[int]], new_tokens: int) -> torch.Tensor:
        """Greedy, exactly ``new_tokens`` per row (EOS suppressed until then); prompts left-padded."""
        width = max(map(len, prompts))
        ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.int64)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(prompts):
            ids[i, width - len(p):] = torch.tensor(p)
            mask[i, width - len(p):] = 1
        out = self.model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=new_tokens,
                                  min_new_tokens=new_tokens, pad_token_id=self.pad_id)
        return out[:, width:]

    def decode(self, prompt: list[int], new_tokens: int) -> dict[str, Any]:
        start = time.perf_counter()
        self.generate([prompt], 1)
        prefill = time.perf_counter() - start
        start = time.perf_counter()
        out = self.generate([prompt], new_tokens)
        total = time.perf_counter() - start
        return {"prefill_s": prefill, "total_s": total, "decode_tok_per_s": (new_tokens - 1) / (total - prefill),
                "output_ids": out[0].tolist()}

    def offline(self, prompts: list[list[int]], output_lens: list[int], batch_size: int) -> dict[str, Any]:
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
        generated = 0
        start = time.perf_counter()
        for batch in tqdm(batches, desc=f"HF batches of {batch_size}", unit="batch"):
            longest = max(output_lens[i] for i in batch)
            self.generate([prompts[i] for i in batch], longest)
            generated += longest * len(batch)
        elapsed = time.perf_counter() - start
        return {"total_s": elapsed, "output_tok_per_s": sum(output_lens) / elapsed,
                "requests_per_s": len(prompts) / elapsed, "generated_tokens": generated}


def agreeing_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke run: 32 prompts, 32 decode tokens, 1 round")
    parser.add_argument("--model-path", default=None,
                        help="a Hugging Face Llama folder (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads for both sides (default: 2)")
    parser.add_argument("--input-len", type=int, default=128, help="batch-1 prompt length (default: 128)")
    parser.add_argument("--decode-len", type=int, default=128, help="batch-1 new tokens (default: 128)")
    parser.add_argument("--repeats", type=int, default=3, help="alternating batch-1 rounds (default: 3)")
    parser.add_argument("--num-prompts", type=int, default=256)
    parser.add_argument("--hf-batch-sizes", default="16,32,64",
                        help="HF offline batch sizes to try; the fastest counts (default: 16,32,64)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--result-file", default="bench_results/cpu_vs_hf.json",
                        help="where the JSON result goes (default: bench_results/cpu_vs_hf.json)")
    args = parser.parse_args()
    if args.quick:
        args.num_prompts, args.decode_len, args.repeats, args.hf_batch_sizes = 32, 32, 1, "16"
    torch.set_num_threads(args.threads)

    from sglang_core.engine import Engine
    from sglang_core.weights.default_model import default_model_path

    folder = Path(args.model_path) if args.model_path else default_model_path()
    engine = Engine(str(folder), device="cpu", dtype="float32")
    hf = HFRunner(folder)
    vocab = engine.info.vocab_size
    result: dict[str, Any] = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": machine(), "transformers": transformers_version(), "model_folder": str(folder),
    }
    try:
        # Warm-up: both sides once, on other prompts.
        warm = random_prompts(vocab, [args.input_len], args.seed + 100)
        measure_latency(engine, 1, args.input_len, 8, warmup=0, seed=args.seed + 100)
        hf.decode(warm[0], 8)

        prompt = random_prompts(vocab, [args.input_len], args.seed)[0]
        ours_runs, hf_runs = [], []
        for _ in tqdm(range(args.repeats), desc="batch-1 rounds"):
            row = measure_latency(engine, 1, args.input_len, args.decode_len, warmup=0, seed=args.seed)
            ours_runs.append(1000 / row["decode_ms_per_step"])
            hf_runs.append(hf.decode(prompt, args.decode_len))
        ours_ids = engine.generate(input_ids=prompt, sampling_params={
            "max_new_tokens": args.decode_len, "temperature": 0.0, "ignore_eos": True})["output_ids"]
        result["decode_batch1"] = {
            "input_len": args.input_len, "new_tokens": args.decode_len, "repeats": args.repeats,
            "ours_tok_per_s": statistics.median(ours_runs), "hf_tok_per_s": statistics.median(
                r["decode_tok_per_s"] for r in hf_runs),
            "ours_runs": ours_runs, "hf_runs": [r["decode_tok_per_s"] for r in hf_runs],
            "greedy_tokens_agreeing": agreeing_prefix(ours_ids, hf_runs[-1]["output_ids"]),
        }

        prompts, output_lens = offline_workload(vocab, args.num_prompts, (32, 512), (16, 256), args.seed)
        steps_before = engine.stats()["forward_steps"]
        ours = measure_offline(engine, prompts, output_lens)
        steps = engine.stats()["forward_steps"] - steps_before
        hf_runs_offline = {bs: hf.offline(prompts, output_lens, bs)
                           for bs in (int(b) for b in args.hf_batch_sizes.split(","))}
        best_bs = max(hf_runs_offline, key=lambda bs: hf_runs_offline[bs]["output_tok_per_s"])
        theirs = hf_runs_offline[best_bs]
        result["offline"] = {
            "num_prompts": args.num_prompts, "input_tokens": sum(map(len, prompts)), "output_tokens": sum(output_lens),
            "hf_batch_size": best_bs, "hf_generated_tokens": theirs["generated_tokens"],
            "hf_by_batch_size": {str(bs): r["output_tok_per_s"] for bs, r in hf_runs_offline.items()},
            "ours_total_s": ours["total_s"], "hf_total_s": theirs["total_s"],
            "ours_output_tok_per_s": ours["output_tok_per_s"], "hf_output_tok_per_s": theirs["output_tok_per_s"],
            "ours_requests_per_s": ours["requests_per_s"], "hf_requests_per_s": theirs["requests_per_s"],
            "ours_forward_steps": steps,
        }
    finally:
        engine.shutdown()

    d, o = result["decode_batch1"], result["offline"]
    print(f"\n{result['date']}, {result['machine']['nproc']} x {result['machine']['cpu']}, "
          f"torch {result['machine']['torch']} ({args.threads} threads), transformers {result['transformers']}\n")
    print("| figure | ours | HF | ours / HF |\n| --- | ---: | ---: | ---: |")
    print(f"| batch-1 decode tok/s ({args.input_len} in, {args.decode_len} out) | {d['ours_tok_per_s']:.1f} | "
          f"{d['hf_tok_per_s']:.1f} | {d['ours_tok_per_s'] / d['hf_tok_per_s']:.2f} |")
    print(f"| offline output tok/s ({args.num_prompts} prompts, HF batch {o['hf_batch_size']}) | "
          f"{o['ours_output_tok_per_s']:.1f} | {o['hf_output_tok_per_s']:.1f} | "
          f"{o['ours_output_tok_per_s'] / o['hf_output_tok_per_s']:.2f} |")
    print(f"| offline wall time s | {o['ours_total_s']:.1f} | {o['hf_total_s']:.1f} | "
          f"{o['hf_total_s'] / o['ours_total_s']:.2f} (HF / ours) |")
    print(f"\ngreedy tokens agreeing with HF at batch 1: {d['greedy_tokens_agreeing']} of {args.decode_len}")
    if args.result_file:
        Path(args.result_file).parent.mkdir(parents=True, exist_ok=True)
        Path(args.result_file).write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.result_file}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Time the decode GEMV (``sglang_core/kernels/gemv.py``) against cuBLAS (``F.linear``) at a
model's weight shapes at batch 1 (Llama-3.1-8B's unless ``--config``), over a sweep of its launch
settings, and print the step total.

Each figure is what the product costs inside a decode step: several copies of each weight (more
bytes than the 50 MB L2 holds) are multiplied in turn inside one CUDA graph, so every weight
comes from HBM and no launch overhead is counted, as in a captured decode step. Every setting is
checked against a float32 product first.

    python benchmarks/tune_gemv.py            # the whole sweep
    python benchmarks/tune_gemv.py --quick    # GEMV_LAUNCH only
    python benchmarks/tune_gemv.py --config benchmarks/configs/qwen2-7b
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from sglang_core.kernels import gemv as gemv_module
from sglang_core.kernels import pdl

CONFIG = Path(__file__).parent / "configs" / "llama-3.1-8b"


def shapes(config_dir: Path) -> list[tuple[str, int, int, int]]:
    """(name, out features, in features, uses per decode step) of a dense decoder's products at tp 1."""
    c = json.loads((config_dir / "config.json").read_text())
    hidden, heads, layers = c["hidden_size"], c["num_attention_heads"], c["num_hidden_layers"]
    head_dim = c.get("head_dim") or hidden // heads
    kv_heads = c.get("num_key_value_heads", heads)
    return [("qkv", (heads + 2 * kv_heads) * head_dim, hidden, layers), ("o_proj", hidden, heads * head_dim, layers),
            ("gate_up", 2 * c["intermediate_size"], hidden, layers), ("down", hidden, c["intermediate_size"], layers),
            ("lm_head", c["vocab_size"], hidden, 1)]


L2_BEATING_BYTES = 400e6


def weights(n: int, k: int) -> list[torch.Tensor]:
    copies = max(2, int(L2_BEATING_BYTES // (n * k * 2)) + 1)
    return [torch.randn(n, k, dtype=torch.bfloat16, device="cuda") * 0.02 for _ in range(copies)]


def time_per_product(product, stack: list[torch.Tensor], x: torch.Tensor) -> float:
    """Microseconds per product, from replays of one graph that multiplies every copy in turn."""
    repeats = max(1, 40 // len(stack))
    for w in stack:  # compile and warm outside the capture
        product(x, w)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(repeats):
            for w in stack:
                product(x, w)
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    best = float("inf")
    for _ in range(5):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) * 1000 / (repeats * len(stack)))
    return best


def triton_product(launch: dict):
    def product(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        gemv_module.GEMV_LAUNCH.clear()
        gemv_module.GEMV_LAUNCH.update(launch)
        return gemv_module.gemv(x, w)
    return product


def cublas(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return F.linear(x, w)


def check(product, stack: list[torch.Tensor], x: torch.Tensor) -> None:
    want = x.float() @ stack[0].float().T
    got = product(x, stack[0]).float()
    torch.testing.assert_close(got, want, atol=2e-2, rtol=2e-2)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="time GEMV_LAUNCH only, no sweep")
    parser.add_argument("--config", type=Path, default=CONFIG, help="a model config folder")
    args = parser.parse_args()
    products = shapes(args.config)
    print(torch.cuda.get_device_name(), "torch", torch.__version__)
    pdl.ENABLED = False  # the products here are independent: overlapping them would flatter the kernel
    stacks = {name: weights(n, k) for name, n, k, _ in products}
    grid = ([dict(BLOCK_N=bn, BLOCK_K=bk, num_warps=w, num_stages=s)
             for bn, bk, w, s in itertools.product((2, 4, 8), (512, 1024, 2048), (2, 4, 8), (1,))]
            if not args.quick else [dict(gemv_module.GEMV_LAUNCH)])
    xs = {name: torch.randn(1, k, dtype=torch.bfloat16, device="cuda") for name, n, k, _ in products}
    base = {name: time_per_product(cublas, stacks[name], xs[name]) for name, *_ in products}
    results = []
    for launch in grid:
        product = triton_product(launch)
        try:
            for name, *_ in products:
                check(product, stacks[name], xs[name])
            results.append((launch, {name: time_per_product(product, stacks[name], xs[name]) for name, *_ in products}))
        except Exception as exc:  # a setting that fails to compile or to fit is reported and skipped
            print(f"  {launch}: {type(exc).__name__}: {str(exc)[:120]}")

    def step_ms(times: dict) -> float:
        return sum(times[name] * uses for name, _, _, uses in products) / 1000

    print(f"cuBLAS step total {step_ms(base):.3f} ms")
    for name, n, k, _ in products:
        gb = n * k * 2 / 1e9
        best_launch, best_times = min(results, key=lambda r: r[1][name])
        print(f"  {name:8s} {n:6d}x{k:5d}: cuBLAS {base[name]:7.1f} us {gb / base[name] * 1e3:4.2f} TB/s | "
              f"best Triton {best_times[name]:7.1f} us {gb / best_times[name] * 1e3:4.2f} TB/s {best_launch}")
    for launch, times in sorted(results, key=lambda r: step_ms(r[1]))[:8]:
        print(f"  step total {step_ms(times):.3f} ms with {launch}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Time the fused MoE kernel (``sglang_core/kernels/fused_moe.py``) over a grid of tile configs at
each batch size of one expert shape on this GPU, and write the fastest per batch to
``sglang_core/kernels/moe_configs/``, the file ``launch_config`` reads for that shape.

Every config is checked against the experts computed with torch matmuls before it is timed; each
batch's line also times the untuned default and a loop of per-expert torch matmuls (the baseline).

    python benchmarks/tune_fused_moe.py --experts 128 --intermediate 768 --hidden 2048 --top-k 8   # Qwen3-30B-A3B

``--stacked-shared N``: N shared experts held after the routed ones and picked by every token with
weight 1, as ``MoE(stacked_shared_experts=N)`` launches them (DeepSeek-V2: 2, of the routed
experts' intermediate size); the file is then the one for ``experts + N`` experts, ``top_k + N``
pairs a token, the shape that layer looks up. Batch sizes already in the file and not tuned by
this run are kept (``--batches`` can split the tuning over calls).
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys

import torch
import triton

from sglang_core.kernels import fused_moe as moe
from sglang_core.kernels import pdl

BATCHES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)


def candidates(tokens: int, top_k: int, experts: int) -> list[dict]:
    """The grid, without blocks much taller than an expert's share of the pairs (all padding)."""
    tallest = max(16, 2 * triton.next_power_of_2(max(1, tokens * top_k // experts)))
    return [dict(BLOCK_M=m, BLOCK_N=n, BLOCK_K=k, GROUP_M=g, num_warps=w, num_stages=s)
            for m, n, k, g, w, s in itertools.product((16, 32, 64, 128), (64, 128), (64, 128), (1, 16), (4, 8), (3, 4))
            if m <= tallest]


def torch_experts(hidden, w13, w2, topk_weights, topk_ids, dtype=torch.float32) -> torch.Tensor:
    """The routed experts with torch (cuBLAS) matmuls in ``dtype``, one expert at a time: the
    reference in float32, and in the model's dtype the baseline the fused kernel is timed against."""
    out = torch.zeros(hidden.shape, dtype=dtype, device=hidden.device)
    for expert in topk_ids.unique().tolist():
        token, choice = torch.nonzero(topk_ids == expert, as_tuple=True)
        gate, up = (hidden[token].to(dtype) @ w13[expert].to(dtype).T).chunk(2, dim=-1)
        down = (torch.nn.functional.silu(gate) * up) @ w2[expert].to(dtype).T
        out.index_add_(0, token, topk_weights[token, choice, None].to(dtype) * down)
    return out


def routing(tokens: int, experts: int, top_k: int, stacked_shared: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights and ids [tokens, top_k + stacked_shared]: distinct random routed experts per token,
    then the shared ones (ids ``experts..``), weight 1, as the router appends them."""
    weights, ids = torch.rand(tokens, experts, device="cuda").topk(top_k, dim=-1)
    shared_ids = torch.arange(experts, experts + stacked_shared, device="cuda").expand(tokens, -1)
    return (torch.cat([weights, torch.ones(tokens, stacked_shared, device="cuda")], dim=1),
            torch.cat([ids, shared_ids], dim=1))


def tune(tokens: int, args: argparse.Namespace, dtype: torch.dtype) -> dict:
    experts, pairs = args.experts + args.stacked_shared, args.top_k + args.stacked_shared
    hidden = torch.randn(tokens, args.hidden, dtype=dtype, device="cuda")
    w13 = torch.randn(experts, 2 * args.intermediate, args.hidden, dtype=dtype, device="cuda") * 0.02
    w2 = torch.randn(experts, args.hidden, args.intermediate, dtype=dtype, device="cuda") * 0.02
    topk_weights, topk_ids = routing(tokens, args.experts, args.top_k, args.stacked_shared)
    inputs = (hidden, w13, w2, topk_weights, topk_ids)
    want = torch_experts(*inputs)
    best, best_us = None, float("inf")
    for config in candidates(tokens, pairs, experts):
        try:
            got = moe.fused_moe(*inputs, config=config).float()
            torch.testing.assert_close(got, want, atol=2e-2, rtol=2e-2)
            us = triton.testing.do_bench(lambda: moe.fused_moe(*inputs, config=config)) * 1000
        except Exception as exc:  # a config that needs more shared memory than the GPU has, or is wrong
            print(f"  {config}: {type(exc).__name__}: {str(exc)[:120]}")
            continue
        if us < best_us:
            best, best_us = config, us
    if best is None:
        raise SystemExit(f"batch {tokens}: no config ran correctly")
    default = moe.default_config(tokens, pairs, experts)
    default_us = triton.testing.do_bench(lambda: moe.fused_moe(*inputs, config=default)) * 1000
    loop_us = triton.testing.do_bench(lambda: torch_experts(*inputs, dtype=dtype)) * 1000
    print(f"batch {tokens:5d}: {best_us:8.1f} us with {best} (untuned: {default_us:8.1f} us; "
          f"per-expert torch loop: {loop_us:8.1f} us)", flush=True)
    return best


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experts", type=int, required=True, help="routed experts")
    parser.add_argument("--intermediate", type=int, required=True, help="one expert's intermediate size on a rank")
    parser.add_argument("--hidden", type=int, required=True)
    parser.add_argument("--top-k", type=int, required=True, help="routed experts a token picks")
    parser.add_argument("--stacked-shared", type=int, default=0,
                        help="shared experts stacked after the routed ones, picked by every token")
    parser.add_argument("--dtype", choices=("bfloat16", "float16"), default="bfloat16")
    parser.add_argument("--batches", type=int, nargs="+", default=BATCHES)
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    device = moe.device_name(torch.device("cuda"))
    print(device, "torch", torch.__version__, "triton", triton.__version__)
    if args.stacked_shared < 0:
        parser.error("--stacked-shared: a count of experts, 0 or more")
    path = moe.CONFIG_DIR / moe.config_file_name(args.experts + args.stacked_shared, args.intermediate, dtype, device)
    pdl.ENABLED = False  # each timed call stands alone
    table = {str(tokens): tune(tokens, args, dtype) for tokens in args.batches}
    # Batch sizes tuned by an earlier run (a call too short for all of them) stay.
    earlier = json.loads(path.read_text()) if path.is_file() else {}
    table = {batch: table.get(batch, earlier.get(batch)) for batch in sorted({*earlier, *table}, key=int)}
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps(table, indent=1) + "\n")
    print("wrote", path)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Sweep the Triton attention kernels' launch settings on the GPU at Llama-3.1-8B attention
shapes (32 query heads, 8 KV heads, head_dim 128, bf16) over a shuffled KV pool, and print
effective bandwidth (decode) or throughput (extend) per setting. The best go into
``DECODE_LAUNCH`` / ``EXTEND_LAUNCH`` in plugins/attention/triton/kernels.py.

    python benchmarks/tune_triton_attention.py
"""

from __future__ import annotations

import itertools
import sys

import torch
import triton

from sglang_plugins.attention.triton import kernels
from sglang_plugins.attention.triton.backend import decode_splits

HEADS, KV_HEADS, DIM = 32, 8, 128


def pool(batch: int, context: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    slots = batch * context
    k = torch.randn(slots + 1, KV_HEADS, DIM, dtype=torch.bfloat16, device="cuda")
    v = torch.randn_like(k)
    table = (torch.randperm(slots, device="cuda") + 1).view(batch, context)  # scattered slots
    return k, v, table


def tune_decode(batch: int, context: int) -> None:
    k, v, table = pool(batch, context)
    q = torch.randn(batch, HEADS, DIM, dtype=torch.bfloat16, device="cuda")
    out = torch.empty_like(q)
    rows = torch.arange(batch, device="cuda")
    lens = torch.full((batch,), context, device="cuda")
    splits = decode_splits(batch, KV_HEADS)
    mid = (torch.empty(batch, HEADS, splits, DIM, device="cuda"), torch.empty(batch, HEADS, splits, device="cuda"))
    gbytes = 2 * batch * context * KV_HEADS * DIM * 2 / 1e9
    print(f"decode batch {batch}, context {context}, {splits} splits: {gbytes:.2f} GB of K/V per call")
    for block_n, warps, stages in itertools.product((32, 64, 128), (4, 8), (1, 2, 3)):
        kernels.DECODE_LAUNCH.update(BLOCK_N=block_n, num_warps=warps, num_stages=stages)
        try:
            ms = triton.testing.do_bench(lambda: kernels.decode_attention(
                q, k, v, out, table, rows, lens, DIM**-0.5, 0, splits, *mid))
        except Exception as exc:  # a setting that does not compile or fit is skipped
            print(f"  BLOCK_N={block_n} warps={warps} stages={stages}: {type(exc).__name__}")
            continue
        print(f"  BLOCK_N={block_n:3d} warps={warps} stages={stages}: {ms * 1000:8.1f} us  {gbytes / ms:5.2f} TB/s")


def tune_extend(prefix: int, new: int) -> None:
    k, v, table = pool(1, prefix + new)
    q = torch.randn(new, HEADS, DIM, dtype=torch.bfloat16, device="cuda")
    out = torch.empty_like(q)
    args = (table, torch.zeros(1, dtype=torch.int64, device="cuda"),
            torch.tensor([prefix + new], device="cuda"), torch.tensor([prefix], device="cuda"),
            torch.zeros(1, dtype=torch.int64, device="cuda"), new, DIM**-0.5, 0)
    flops = 4 * HEADS * DIM * new * (prefix + new / 2)
    print(f"extend: {new} new tokens after a {prefix}-token prefix")
    for block_m, block_n, warps, stages in itertools.product((64, 128), (32, 64), (4, 8), (2, 3)):
        kernels.EXTEND_LAUNCH.update(BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps, num_stages=stages)
        try:
            ms = triton.testing.do_bench(lambda: kernels.extend_attention(q, k, v, out, *args))
        except Exception as exc:
            print(f"  BLOCK_M={block_m} BLOCK_N={block_n} warps={warps} stages={stages}: {type(exc).__name__}")
            continue
        print(f"  BLOCK_M={block_m:3d} BLOCK_N={block_n:3d} warps={warps} stages={stages}: "
              f"{ms * 1000:8.1f} us  {flops / ms / 1e9:6.0f} TFLOP/s")


def main() -> int:
    print(torch.cuda.get_device_name())
    for batch, context in ((1, 2048), (64, 640), (128, 2048)):
        tune_decode(batch, context)
    tune_extend(2048, 2048)
    tune_extend(0, 2048)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Time the gguf plugin's GEMV (``plugins/quant/gguf/kernels.py``) for Q4_K and Q8_0 blocks against
cuBLAS on bf16 weights (``F.linear``) at Llama-3.1-8B's weight shapes, a few rows of ``x``, and
print the bytes each streams per second and the decode-step total.

Timed as ``tune_gemv.py`` times (several copies of each weight inside one CUDA graph: every weight
from HBM, no launch overhead). Each GEMV is first checked against cuBLAS on its own weight
dequantized by ``blocks.py`` (torch).

    python benchmarks/bench_gguf_matmul.py             # x of 1 row
    python benchmarks/bench_gguf_matmul.py --rows 4
    python benchmarks/bench_gguf_matmul.py --sweep     # the best of a few launch settings per shape
"""

from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType as T
from tune_gemv import L2_BEATING_BYTES, SHAPES, time_per_product

from sglang_plugins.quant.gguf import kernels
from sglang_plugins.quant.gguf.blocks import BLOCKS, dequantize, row_bytes

# Byte offsets of each block's f16 fields (d, dmin): random bytes elsewhere are valid quants.
SCALE_FIELDS = {T.Q4_K: (0, 2), T.Q8_0: (0,)}


def random_blocks(qtype: T, n: int, k: int) -> torch.Tensor:
    """``[n, row_bytes]`` uint8 of random quants with small scales (about 0.02-sized values)."""
    block_bytes = BLOCKS[qtype][1]
    blocks = torch.randint(0, 256, (n * row_bytes(qtype, k) // block_bytes, block_bytes), dtype=torch.uint8,
                           device="cuda")
    scale = 0.02 / 256 if qtype == T.Q4_K else 0.02 / 64  # over sub-scale x nibble / int8 quant sizes
    for offset in SCALE_FIELDS[qtype]:
        blocks[:, offset:offset + 2] = torch.full((len(blocks), 1), scale, dtype=torch.float16,
                                                  device="cuda").view(torch.uint8)
    return blocks.view(n, -1)


def copies(nbytes: int) -> int:
    return max(2, int(L2_BEATING_BYTES // nbytes) + 1)


def launch_settings(sweep: bool) -> list[dict[str, int]]:
    if not sweep:
        return [dict(GEMV_BLOCK_N=kernels.GEMV_BLOCK_N, VALUES_PER_STEP=kernels.VALUES_PER_STEP)]
    return [dict(GEMV_BLOCK_N=n, VALUES_PER_STEP=v) for n in (2, 4, 8) for v in (256, 512, 1024)]


def time_gemv(qtype: T, stack: list[torch.Tensor], x: torch.Tensor, settings: list[dict]) -> tuple[float, dict]:
    """The fastest microseconds per product over ``settings`` (module values of ``kernels``), each
    checked first, and that setting; the module's own values are restored after."""
    product = lambda x, blocks: kernels.gemv(x, blocks, qtype)  # noqa: E731
    want = F.linear(x, dequantize(stack[0], qtype).to(torch.bfloat16)).float()
    defaults, timed = launch_settings(False)[0], []
    for setting in settings:
        for name, value in setting.items():
            setattr(kernels, name, value)
        torch.testing.assert_close(product(x, stack[0]).float(), want, atol=3e-2, rtol=2e-2)
        timed.append((time_per_product(product, stack, x), setting))
    for name, value in defaults.items():
        setattr(kernels, name, value)
    return min(timed, key=lambda t: t[0])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1, help=f"rows of x, 1..{kernels.GEMV_MAX_ROWS}")
    parser.add_argument("--sweep", action="store_true", help="time several GEMV launch settings, keep the best")
    args = parser.parse_args()
    if not 1 <= args.rows <= kernels.GEMV_MAX_ROWS:
        raise ValueError(f"--rows must be 1..{kernels.GEMV_MAX_ROWS}, got {args.rows}")
    print(torch.cuda.get_device_name(), "torch", torch.__version__, "rows of x:", args.rows)
    settings = launch_settings(args.sweep)
    totals = {"bf16 cuBLAS": 0.0, **{f"{qtype.name} GEMV": 0.0 for qtype in SCALE_FIELDS}}
    for name, n, k, uses in SHAPES:
        x = torch.randn(args.rows, k, dtype=torch.bfloat16, device="cuda")
        bf16 = [torch.randn(n, k, dtype=torch.bfloat16, device="cuda") * 0.02 for _ in range(copies(n * k * 2))]
        timed = {"bf16 cuBLAS": (time_per_product(F.linear, bf16, x), n * k * 2, "")}
        del bf16
        for qtype in SCALE_FIELDS:
            stack = [random_blocks(qtype, n, k) for _ in range(copies(n * row_bytes(qtype, k)))]
            us, setting = time_gemv(qtype, stack, x, settings)
            timed[f"{qtype.name} GEMV"] = (us, stack[0].numel(), f" {setting}" if args.sweep else "")
            del stack
        line = []
        for label, (us, nbytes, setting) in timed.items():
            totals[label] += us * uses
            line.append(f"{label} {us:8.1f} us {nbytes / us / 1e6:5.2f} TB/s{setting}")
        print(f"  {name:8s} {n:6d}x{k:5d}: " + " | ".join(line))
    step = " | ".join(f"{label} {us / 1000:.3f} ms" for label, us in totals.items())
    print(f"decode-step total (weights only): {step}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

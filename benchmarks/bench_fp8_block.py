"""Time block-wise FP8 linear layers (``plugins/quant/fp8/block_gemm.py``: per-token-group
activation quantization, then the block-scaled e4m3 GEMM) against bfloat16 cuBLAS (``F.linear``)
at DeepSeek-V2-Lite's and Llama-3.1-8B's linear shapes, 128 x 128 blocks, for 1, 64 and 4096 tokens.

Each figure is one product inside a CUDA graph that multiplies several copies of the weight in
turn (more bytes than L2 holds), so weights come from HBM and no launch overhead is counted
(``tune_gemv.time_per_product``).
Printed per shape: microseconds, TFLOP/s (2 M N K per product) and GB/s of the least traffic
(the weight, scales, input and output once each) for cuBLAS, the FP8 path (quantize + GEMM) and
the GEMM alone. Every shape is first checked against the float path (``block.py``) on the GPU.

    python benchmarks/bench_fp8_block.py
    python benchmarks/bench_fp8_block.py --sweep    # also the best of a small grid of GEMM tiles
"""

from __future__ import annotations

import argparse
import itertools
import sys

import torch
import torch.nn.functional as F

from sglang_core.kernels import pdl
from sglang_plugins.quant.fp8 import block_gemm
from sglang_plugins.quant.fp8.block import dequantize_weight, quantize_dequantize_groups
from sglang_plugins.quant.fp8.e4m3 import FP8
from tune_gemv import time_per_product  # this folder is on the path when run as a script

BLOCK = (128, 128)
TOKENS = (1, 64, 4096)
# (model, layer, out features, in features) at tp 1.
SHAPES = [
    ("DeepSeek-V2-Lite", "q_proj", 3072, 2048), ("DeepSeek-V2-Lite", "kv_a_proj_with_mqa", 576, 2048),
    ("DeepSeek-V2-Lite", "kv_b_proj", 4096, 512), ("DeepSeek-V2-Lite", "o_proj", 2048, 2048),
    ("DeepSeek-V2-Lite", "dense gate_up", 21888, 2048), ("DeepSeek-V2-Lite", "dense down", 2048, 10944),
    ("Llama-3.1-8B", "qkv", 6144, 4096), ("Llama-3.1-8B", "o_proj", 4096, 4096),
    ("Llama-3.1-8B", "gate_up", 28672, 4096), ("Llama-3.1-8B", "down", 4096, 14336),
]
L2_BEATING_BYTES = 400e6
SWEEP = [dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=w, num_stages=s)
         for bm, bn, w, s in itertools.product((16, 64, 128), (64, 128), (4, 8), (3, 4))]


def fp8_weights(n: int, k: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Copies of a random e4m3 weight and its block scales, enough to fill more than L2."""
    copies = max(2, int(L2_BEATING_BYTES // (n * k)) + 1)
    scale_shape = (-(-n // BLOCK[0]), -(-k // BLOCK[1]))
    return [((torch.randn(n, k, device="cuda") * 64).clamp(-448, 448).to(FP8),
             torch.rand(scale_shape, device="cuda") * 1e-4 + 1e-4) for _ in range(copies)]


def fp8_linear(x: torch.Tensor, operand: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return block_gemm.block_fp8_linear(x, *operand, BLOCK)


def gemm_only(config: dict | None):
    def product(quantized: tuple[torch.Tensor, torch.Tensor], operand: tuple[torch.Tensor, torch.Tensor]):
        return block_gemm.block_gemm(*quantized, *operand, BLOCK, None, torch.bfloat16, config=config)
    return product


def cublas(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return F.linear(x, w)


def check(x: torch.Tensor, operand: tuple[torch.Tensor, torch.Tensor]) -> None:
    """The kernels against the float path's numbers (activations and weights dequantized to float32)."""
    want = quantize_dequantize_groups(x.float(), BLOCK[1]) @ dequantize_weight(*operand, BLOCK).T
    torch.testing.assert_close(fp8_linear(x, operand).float(), want, atol=2e-2, rtol=2e-2)


def rates(us: float, m: int, n: int, k: int, traffic: float) -> str:
    return f"{us:8.1f} us {2 * m * n * k / us / 1e6:6.1f} TFLOP/s {traffic / us / 1e3:7.1f} GB/s"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweep", action="store_true", help="also time a small grid of GEMM tile settings")
    args = parser.parse_args()
    print(torch.cuda.get_device_name(), "torch", torch.__version__, "blocks", BLOCK)
    pdl.ENABLED = False  # the products here are independent: overlapping them would flatter the kernels
    for model, layer, n, k in SHAPES:
        operands = fp8_weights(n, k)
        bf16 = [dequantize_weight(w, s, BLOCK).to(torch.bfloat16) for w, s in operands]
        for m in TOKENS:
            x = torch.randn(m, k, dtype=torch.bfloat16, device="cuda")
            check(x, operands[0])
            quantized = block_gemm.quantize_groups(x, BLOCK[1])
            scales = operands[0][1].numel() * 4 + quantized[1].numel() * 4
            bf16_traffic = (n * k + m * k + m * n) * 2
            fp8_traffic = n * k + m * k * 2 + m * n * 2 + scales
            gemm_traffic = n * k + m * k + m * n * 2 + scales
            line = (f"{model:16s} {layer:18s} M={m:4d} N={n:5d} K={k:5d} | cuBLAS bf16 "
                    f"{rates(time_per_product(cublas, bf16, x), m, n, k, bf16_traffic)} | fp8 "
                    f"{rates(time_per_product(fp8_linear, operands, x), m, n, k, fp8_traffic)} | GEMM "
                    f"{rates(time_per_product(gemm_only(None), operands, quantized), m, n, k, gemm_traffic)}")
            print(line, flush=True)
            if args.sweep:
                timed = []
                for config in SWEEP:
                    try:
                        timed.append((time_per_product(gemm_only(config), operands, quantized), config))
                    except Exception as exc:  # a setting that fails to compile or to fit is reported and skipped
                        print(f"    {config}: {type(exc).__name__}: {str(exc)[:120]}")
                best_us, best = min(timed, key=lambda t: t[0])
                print(f"    best GEMM tiles {rates(best_us, m, n, k, gemm_traffic)} {best}", flush=True)
        del operands, bf16
    return 0


if __name__ == "__main__":
    sys.exit(main())

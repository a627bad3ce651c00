"""Time the one-row GEMVs for quantized weights (``plugins/quant/fp8/gemv.py``,
``plugins/quant/int_gemv.py``) against the paths they replace at batch 1 (FP8: the per-token
scale, quantize and ``torch._scaled_mm`` kernels; packed integers: ``int_matmul``) and against the
bf16 GEMV, at Llama-3.1-8B's linear shapes (unless ``--config``), over a sweep of their launch
settings; print each product's weight-read rate beside the copy bandwidth measured in the same run,
the decode step's linear-layer total, and the ``LAUNCH_TABLE`` entries (each shape's best setting)
to paste into the kernel's module (AWQ's and GPTQ int4's share their keys: one layout after loading,
the same kernel; the two should time alike).

Timing as in tune_gemv.py: several copies of each weight (more bytes than the L2 holds) are
multiplied in turn inside one CUDA graph, programmatic dependent launch off. Every setting is
checked first against the float product of the format's dequantized weight (FP8: of the input
rounded to e4m3 as torch rounds it).

    python benchmarks/tune_quant_gemv.py                      # defaults only, every format
    python benchmarks/tune_quant_gemv.py --sweep              # + each format's sweep (~3-4 min)
    python benchmarks/tune_quant_gemv.py --formats fp8 --sweep
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path
from types import SimpleNamespace

import torch
import triton

from bench_int_matmul import FORMATS as INT_FORMATS  # benchmarks/ is the script's folder, so on its path
from bench_int_matmul import random_layer as random_int_layer
from bench_int_matmul import read_bytes
from sglang_core.kernels import gemv as bf16_gemv
from sglang_core.kernels import pdl
from sglang_plugins.quant import int_gemv, int_matmul
from sglang_plugins.quant.fp8 import gemv as fp8_gemv
from sglang_plugins.quant.fp8.e4m3 import FP8, FP8_MAX, quantize, token_scale
from sglang_plugins.quant.fp8.method import Fp8LinearMethod
from gpu_llama8b import copy_bandwidth
from tune_gemv import CONFIG, L2_BEATING_BYTES, shapes, time_per_product

# FP8: rows a program, K tile, warps, and where the row is rounded to e4m3 (QUANTIZE_ONCE: one
# kernel before the GEMV, one more launch; else in every program).
FP8_SWEEP = [dict(BLOCK_N=bn, BLOCK_K=bk, num_warps=w, num_stages=1, QUANTIZE_ONCE=once)
             for bn, bk, w, once in itertools.product((8, 16, 32), (256, 512), (4, 8), (False, True))]
# Packed integers (words along K, as every format's layer holds them after loading, AWQ's repacked):
# output features a tile (wide along the contiguous axis), input features a step (at most the
# benchmark's 128-feature groups), warps; at most 128 accumulators a thread (more spill, compiled for
# sm_90). Two fixed K splits besides the automatic one (shares enough to fill the device, whose last
# arrival sums them all).
INT_SWEEP = ([dict(BLOCK_N=bn, BLOCK_K=bk, num_warps=w, num_stages=1)
              for bn, bk, w in ((256, 16, 4), (256, 32, 4), (512, 16, 4), (512, 32, 4), (1024, 16, 4),
                                (1024, 16, 8), (1024, 32, 8), (2048, 16, 8))]
             + [dict(BLOCK_N=512, BLOCK_K=16, num_warps=4, num_stages=1, SPLIT_K=split) for split in (8, 16)])
FORMATS = ("fp8", "awq", "gptq-4bit")
# A setting that does not compile, fit, nest with the groups or give the right numbers is reported and skipped.
SETTING_FAILURES = (triton.runtime.errors.OutOfResources, triton.CompilationError, AssertionError, ValueError)


def copies(nbytes: int) -> int:
    return max(2, int(L2_BEATING_BYTES // nbytes) + 1)


def fp8_layers(n: int, k: int) -> list[SimpleNamespace]:
    """Per-channel e4m3 weights, as ``--quantization fp8`` leaves a bf16 checkpoint's."""
    def one() -> SimpleNamespace:
        weight = torch.randn(n, k, device="cuda") * 0.02
        scale = weight.abs().amax(dim=1) / FP8_MAX
        return SimpleNamespace(weight=quantize(weight, scale[:, None]), weight_scale=scale)
    return [one() for _ in range(copies(n * k))]


def fp8_products(launch: dict | None):
    """(old path, GEMV with ``launch``) for dynamic per-token activations."""
    method = Fp8LinearMethod({"quant_method": "fp8"}, "bench")
    return (lambda x, layer: method._scaled_mm(layer, x, None),
            lambda x, layer: fp8_gemv.fp8_gemv(x, layer.weight, layer.weight_scale, "dynamic", config=launch))


def fp8_check(product, layer: SimpleNamespace, x: torch.Tensor) -> None:
    scale = token_scale(x)
    want = (quantize(x, scale).float() * scale) @ (layer.weight.float() * layer.weight_scale[:, None]).T
    torch.testing.assert_close(product(x, layer).float(), want, atol=2e-2 * want.abs().max().item(), rtol=2e-2)


def int_products(fmt: str, launch: dict | None):
    method = INT_FORMATS[fmt]()
    return (lambda x, layer: int_matmul.int_matmul(x, method.int_weight(layer)),
            lambda x, layer: int_gemv.int_gemv(x, method.int_weight(layer), config=launch))


def int_check(fmt: str):
    method = INT_FORMATS[fmt]()

    def check(product, layer: SimpleNamespace, x: torch.Tensor) -> None:
        want = x.float() @ method.dequantized_weight(layer).float().T
        torch.testing.assert_close(product(x, layer).float(), want, atol=2e-2 * want.abs().max().item(), rtol=2e-2)
    return check


def rate(nbytes: int, microseconds: float, bandwidth: float) -> str:
    """The weight-read rate of a product and its share of the copy bandwidth."""
    achieved = nbytes / microseconds * 1e6
    return f"{achieved / 1e9:5.0f} GB/s ({achieved / bandwidth:4.0%})"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--formats", nargs="+", choices=FORMATS, default=list(FORMATS))
    parser.add_argument("--sweep", action="store_true", help="also time every launch setting of the format's sweep")
    parser.add_argument("--config", type=Path, default=CONFIG, help="a model config folder")
    args = parser.parse_args()
    products = [p for p in shapes(args.config) if p[0] != "lm_head"]  # the LM head stays bf16
    print(torch.cuda.get_device_name(), "torch", torch.__version__, "triton", triton.__version__)
    pdl.ENABLED = False  # the products here are independent: overlapping them would flatter the kernels
    xs = {name: torch.randn(1, k, dtype=torch.bfloat16, device="cuda") for name, _, k, _ in products}

    def step_ms(times: dict) -> float:
        return sum(times[name] * uses for name, _, _, uses in products) / 1000

    bf16 = {}
    for name, n, k, _ in products:
        stack = [torch.randn(n, k, dtype=torch.bfloat16, device="cuda") * 0.02 for _ in range(copies(n * k * 2))]
        bf16[name] = time_per_product(bf16_gemv.gemv, stack, xs[name])
        del stack
    print(f"bf16 GEMV: linear layers {step_ms(bf16):.3f} ms a step")
    bandwidth = copy_bandwidth()
    print(f"copy bandwidth {bandwidth / 1e9:.0f} GB/s (bytes read + written a second)")
    for fmt in args.formats:
        make, check = ((fp8_layers, fp8_check) if fmt == "fp8"
                       else (lambda n, k, fmt=fmt: [random_int_layer(INT_FORMATS[fmt](), n, k)], int_check(fmt)))
        sweep = FP8_SWEEP if fmt == "fp8" else INT_SWEEP
        grid = [None] + (sweep if args.sweep else [])  # None: the module's settings for the shape
        old, new, nbytes, table = {}, {}, {}, {}
        for name, n, k, _ in products:
            layers = make(n, k)
            nbytes[name] = read_bytes(layers[0])
            layers += [make(n, k)[0] for _ in range(copies(nbytes[name]) - len(layers))]
            x = xs[name]
            for launch in grid:
                old_path, gemv = fp8_products(launch) if fmt == "fp8" else int_products(fmt, launch)
                try:
                    check(gemv, layers[0], x)
                    took = time_per_product(gemv, layers, x)
                except SETTING_FAILURES as exc:
                    print(f"    {name} {launch}: {type(exc).__name__}: {str(exc)[:100]}")
                    continue
                new.setdefault(name, []).append((took, launch))
            check(old_path, layers[0], x)
            old[name] = time_per_product(old_path, layers, x)
            default, best = new[name][0], min(new[name], key=lambda pair: pair[0])
            table[(n, k)] = best[1]
            print(f"{fmt:9s} {name:8s} {n:6d}x{k:5d} ({nbytes[name] / 1e6:6.1f} MB): bf16 GEMV {bf16[name]:6.1f} us | "
                  f"old path {old[name]:6.1f} us {rate(nbytes[name], old[name], bandwidth)} | "
                  f"GEMV {default[0]:6.1f} us {rate(nbytes[name], default[0], bandwidth)} | "
                  f"best {best[0]:6.1f} us {rate(nbytes[name], best[0], bandwidth)} {best[1] or 'default'}",
                  flush=True)
            del layers
        print(f"{fmt}: linear layers a step: old path {step_ms(old):.3f} ms, GEMV default "
              f"{step_ms({name: runs[0][0] for name, runs in new.items()}):.3f} ms, best per shape "
              f"{step_ms({name: min(runs, key=lambda r: r[0])[0] for name, runs in new.items()}):.3f} ms, "
              f"floor {sum(nbytes[name] * uses for name, _, _, uses in products) / bandwidth * 1e3:.3f} ms, "
              f"bf16 GEMV {step_ms(bf16):.3f} ms")
        if args.sweep:
            common = [launch for launch in grid[1:] if all(any(l == launch for _, l in new[name]) for name in new)]
            totals = [(step_ms({name: next(t for t, l in new[name] if l == launch) for name in new}), launch)
                      for launch in common]
            for total, launch in sorted(totals, key=lambda pair: pair[0])[:5]:
                print(f"    one setting for every shape: step total {total:.3f} ms with {launch}")
            module = "plugins/quant/fp8/gemv.py" if fmt == "fp8" else "plugins/quant/int_gemv.py"
            entries = {key: launch for key, launch in table.items() if launch is not None}
            print(f"    {fmt}: LAUNCH_TABLE entries for {module} (None: the module's settings were best): {entries}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Time the packed-integer matmul (``plugins/quant/int_matmul.py``) against cuBLAS on the bfloat16
weight at Llama-3.1-8B's linear shapes, for 1, 16 and 64 rows, and print each one's weight-read
rate (bytes the product must read: packed weight, scales and zero points, or the bf16 weight).

As in tune_gemv.py (whose timing this uses), each figure is what the product costs inside a
decode step: several copies of each weight (more bytes than the L2 holds) are multiplied in turn
inside one CUDA graph, so every weight comes from HBM and no launch overhead is counted. Each format's tensors are random words
laid out as its checkpoint stores them, handed to the kernel by its method's ``int_weight``, and
every product is checked against the method's own dequantisation (its CPU path) first.

    python benchmarks/bench_int_matmul.py                  # every format
    python benchmarks/bench_int_matmul.py --formats gptq-4bit awq
    python benchmarks/bench_int_matmul.py --formats gptq-4bit --sweep   # + best of SWEEP, ~5 min a format
"""

from __future__ import annotations

import argparse
import itertools
import sys
from types import SimpleNamespace

import torch
import torch.nn.functional as F
import triton

from sglang_core.kernels import pdl
from sglang_plugins.quant import int_matmul as kernel
from sglang_plugins.quant.awq.method import AWQMethod
from sglang_plugins.quant.compressed_tensors.packed import PackedIntMethod
from sglang_plugins.quant.gptq.method import GPTQMethod
from tune_gemv import time_per_product  # benchmarks/ is the script's folder, so on its path

# (name, out features, in features) of Llama-3.1-8B's linear layers at tp 1.
SHAPES = [("qkv", 6144, 4096), ("o_proj", 4096, 4096), ("gate_up", 28672, 4096), ("down", 4096, 14336)]
ROWS = (1, 16, 64)
# Launch settings --sweep tries beside the module's (SPLIT_K follows launch_config's rule).
SWEEP = [dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=w, num_stages=st)
         for bm, bn, bk, w, st in itertools.product((16, 64), (32, 64, 128), (64, 128), (4, 8), (3,))]
GROUP = 128
L2_BEATING_BYTES = 400e6


def gptq(bits: int, desc_act: bool):
    return GPTQMethod({"bits": bits, "group_size": GROUP, "sym": False, "desc_act": desc_act,
                       "checkpoint_format": "gptq"}, "bench")


FORMATS = {
    "gptq-4bit": lambda: gptq(4, desc_act=False),
    "gptq-4bit-actorder": lambda: gptq(4, desc_act=True),
    "gptq-8bit": lambda: gptq(8, desc_act=False),
    "awq": lambda: AWQMethod({"bits": 4, "group_size": GROUP, "zero_point": True, "version": "gemm"}, "bench"),
    "ct-w4a16": lambda: PackedIntMethod({"num_bits": 4, "type": "int", "strategy": "group", "group_size": GROUP,
                                         "symmetric": True, "dynamic": False}, None, "bench"),
}


def random_words(*shape: int) -> torch.Tensor:
    return torch.randint(-2**31, 2**31, shape, dtype=torch.int32, device="cuda")


def random_layer(method, n: int, k: int) -> SimpleNamespace:
    """Random packed tensors of an ``n x k`` weight with the attributes ``method`` reads, as loading
    leaves them (AWQ's repacked along K)."""
    groups, scales = k // GROUP, lambda *shape: torch.rand(*shape, device="cuda", dtype=torch.bfloat16) * 0.01
    if isinstance(method, PackedIntMethod):
        return SimpleNamespace(weight_packed=random_words(n, k // method.pack), weight_scale=scales(n, groups))
    pack = 8 if isinstance(method, AWQMethod) else method.pack
    layer = SimpleNamespace(qzeros=random_words(groups, n // pack), scales=scales(groups, n))
    if isinstance(method, AWQMethod):
        layer.qweight = random_words(k, n // 8)
        method.process_weights_after_loading(layer)
    else:
        layer.qweight = random_words(k // method.pack, n)
        layer.g_idx = (torch.randperm(k, device="cuda") // GROUP if method.desc_act
                       else torch.arange(k, device="cuda") // GROUP).to(torch.int32)
    return layer


def read_bytes(layer: SimpleNamespace) -> int:
    return sum(t.numel() * t.element_size() for t in vars(layer).values())


def copies(nbytes: int) -> int:
    return max(2, int(L2_BEATING_BYTES // nbytes) + 1)


def check(method, layer: SimpleNamespace, x: torch.Tensor, config: dict | None = None) -> None:
    """The kernel's product against the method's own dequantisation (its CPU path)."""
    want = x.float() @ method.dequantized_weight(layer).float().T
    got = kernel.int_matmul(x, method.int_weight(layer), config=config).float()
    torch.testing.assert_close(got, want, atol=2e-2 * want.abs().max().item(), rtol=2e-2)


def sweep(method, layers: list[SimpleNamespace], x: torch.Tensor) -> tuple[float, dict]:
    """The fastest launch setting of ``SWEEP`` for these layers (with its microseconds), each checked
    first; settings that fail to compile or to fit are skipped."""
    k, n = method.int_weight(layers[0]).shape
    best = (float("inf"), {})
    for candidate in SWEEP:
        if candidate["BLOCK_M"] > max(16, x.shape[0]):
            continue
        config = kernel.launch_config(x.shape[0], n, k, x.device, candidate)
        try:
            check(method, layers[0], x, config)
            took = time_per_product(lambda x, layer: kernel.int_matmul(x, method.int_weight(layer), config=config),
                                    layers, x)
        except (triton.runtime.errors.OutOfResources, triton.CompilationError) as exc:
            print(f"      {config}: {type(exc).__name__}: {str(exc)[:100]}")
            continue
        best = min(best, (took, config), key=lambda pair: pair[0])
    return best


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--formats", nargs="+", choices=sorted(FORMATS), default=list(FORMATS))
    parser.add_argument("--sweep", action="store_true", help="also time every launch setting of SWEEP")
    args = parser.parse_args()
    print(torch.cuda.get_device_name(), "torch", torch.__version__)
    pdl.ENABLED = False  # the products here are independent: overlapping them would flatter the kernel
    for name, n, k in SHAPES:
        dense = [torch.randn(n, k, dtype=torch.bfloat16, device="cuda") * 0.02 for _ in range(copies(n * k * 2))]
        for rows in ROWS:
            x = torch.randn(rows, k, dtype=torch.bfloat16, device="cuda")
            base = time_per_product(F.linear, dense, x)
            print(f"{name:8s} {n:6d}x{k:5d} M={rows:2d}: cuBLAS bf16 {base:7.1f} us "
                  f"{n * k * 2 / base / 1e6:5.2f} TB/s", flush=True)
            for fmt in args.formats:
                method = FORMATS[fmt]()
                layers = [random_layer(method, n, k)]
                layers += [random_layer(method, n, k) for _ in range(copies(read_bytes(layers[0])) - 1)]
                check(method, layers[0], x)
                took = time_per_product(lambda x, layer: kernel.int_matmul(x, method.int_weight(layer)), layers, x)
                print(f"    {fmt:18s} {took:7.1f} us {read_bytes(layers[0]) / took / 1e6:5.2f} TB/s "
                      f"({base / took:4.2f}x cuBLAS's speed)", flush=True)
                if args.sweep:
                    best, launch = sweep(method, layers, x)
                    print(f"    {'':18s} {best:7.1f} us {read_bytes(layers[0]) / best / 1e6:5.2f} TB/s "
                          f"({base / best:4.2f}x) best swept: {launch}", flush=True)
                del layers
        del dense
    return 0


if __name__ == "__main__":
    sys.exit(main())

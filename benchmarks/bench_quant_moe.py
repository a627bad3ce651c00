"""Time quantized routed experts on this GPU three ways, per batch size, at DeepSeek-V2-Lite's and
Mixtral-8x7B's expert shapes:

- ``fused``: the fused MoE kernel on the quantized tensors (each weight tile dequantized in registers);
- ``deq+fused``: the experts the batch touches dequantized to bfloat16 with torch, then the 16-bit
  fused kernel (what a GPU without the quantized kernel would run);
- ``bf16``: the 16-bit fused kernel on bfloat16 weights already in memory (twice to four times the bytes).

Each line also gives the weight-read floor of ``fused`` and ``bf16``: the bytes of the experts the
batch touches (values, scales, zero points) over the HBM bandwidth (``--bandwidth``, default
4.26 TB/s). The quantized tensors are random, laid out as each plugin's expert method creates them,
and handed to the kernel by its ``fused_weight``; ``fused`` is checked against ``bf16`` on the
same dequantized weights first. As in tune_gemv.py, times are CUDA-graph replays over enough copies
of the weights that they come from HBM, not L2.

    python benchmarks/bench_quant_moe.py                              # every format, both shapes
    python benchmarks/bench_quant_moe.py --formats fp8-block gptq4 --shapes deepseek-v2-lite
    TRITON_INTERPRET=1 python benchmarks/bench_quant_moe.py --dry-run   # CPU: tiny shapes, no timing
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from sglang_core.kernels import fused_moe as moe
from sglang_core.kernels.moe_weight import QuantizedExperts
from sglang_core.layers.experts import ExpertWeights
from sglang_plugins.quant.awq.method import AWQMethod
from sglang_plugins.quant.compressed_tensors.method import CompressedTensorsMethod
from sglang_plugins.quant.fp8.experts import Fp8ExpertsMethod
from sglang_plugins.quant.fp8.scheme import Fp8Scheme
from sglang_plugins.quant.gptq.method import GPTQMethod

# name: (experts, top-k, hidden, intermediate of one expert at tp 1)
SHAPES = {"deepseek-v2-lite": (64, 6, 2048, 1408), "mixtral-8x7b": (8, 2, 4096, 14336)}
DRY_RUN_SHAPE = (4, 2, 256, 128)  # the smallest that holds a 128-wide group and a 128 x 128 block
BATCHES = (1, 2, 4, 8, 16, 32, 64, 128, 256)
GROUP = 128
# name: (the experts method, the scales' typical size: weights come out about 0.02 in magnitude)
FORMATS = {
    "fp8-channel": (lambda: Fp8ExpertsMethod(Fp8Scheme("channel", "dynamic"), "bench"), 2e-2),
    "fp8-block": (lambda: Fp8ExpertsMethod(Fp8Scheme("block", "dynamic", block=(128, 128)), "bench"), 2e-2),
    "gptq4": (lambda: GPTQMethod.for_experts({"bits": 4, "group_size": GROUP, "sym": False, "desc_act": False},
                                             "bench"), 2e-2 / 8),
    "gptq8": (lambda: GPTQMethod.for_experts({"bits": 8, "group_size": GROUP, "sym": False, "desc_act": False},
                                             "bench"), 2e-2 / 128),
    "awq": (lambda: AWQMethod.for_experts({"bits": 4, "group_size": GROUP, "zero_point": True}, "bench"), 2e-2 / 8),
    # llm-compressor's W4A16: symmetric int4 packed along the inputs, no zero points stored.
    "ct-w4a16": (lambda: CompressedTensorsMethod.for_experts(
        {"format": "pack-quantized", "config_groups": {"group_0": {"targets": ["Linear"], "weights": {
            "type": "int", "num_bits": 4, "strategy": "group", "group_size": GROUP, "symmetric": True}}}},
        "bench"), 2e-2 / 8),
    # llm-compressor's W8A8 (int8 per channel): the kernel reads the weights only.
    "ct-w8a8": (lambda: CompressedTensorsMethod.for_experts(
        {"format": "int-quantized", "config_groups": {"group_0": {"targets": ["Linear"], "weights": {
            "type": "int", "num_bits": 8, "strategy": "channel", "symmetric": True}, "input_activations": {
            "type": "int", "num_bits": 8, "strategy": "token", "dynamic": True, "symmetric": True}}}},
        "bench"), 2e-2 / 128),
}
L2_BEATING_BYTES = 400e6


def random_layer(method, scale: float, experts: int, hidden: int, inter: int, device: str) -> ExpertWeights:
    """The method's stacked parameters filled at random: any int32 word is a valid packed one;
    scales about ``scale``."""
    layer = ExpertWeights(experts, hidden, inter, params_dtype=torch.bfloat16, quant_method=method).to(device)
    for name, param in layer.named_parameters():
        if name.endswith("g_idx"):  # GPTQ without desc_act: groups in order
            param.data.copy_(torch.arange(param.shape[-1], device=device) // GROUP)
        elif param.dtype in (torch.int32, torch.int8):
            info = torch.iinfo(param.dtype)
            param.data.copy_(torch.randint(info.min, info.max + 1, param.shape, dtype=param.dtype, device=device))
        elif param.dtype == torch.float8_e4m3fn:
            param.data.copy_(torch.randn(param.shape, device=device).to(param.dtype))
        else:
            param.data.uniform_(scale / 2, scale * 2)
    method.process_weights_after_loading(layer)
    return layer


def dequantize(weight: QuantizedExperts, experts: torch.Tensor) -> torch.Tensor:
    """Experts ``experts`` of ``weight`` as bfloat16 ``[len(experts), N, K]``, with torch."""
    _, rows, cols = weight.shape
    data = weight.data[experts]
    if weight.format == "fp8":
        values = data.float()
    else:
        pack, low = 32 // weight.bits, (1 << weight.bits) - 1
        slots = torch.arange(pack, device=data.device)
        if weight.interleaved:  # value j of a run sits in slot (j % 2) * p / 2 + j // 2
            slots = (slots % 2) * (pack // 2) + slots // 2
        shifts = slots * weight.bits
        unpacked = (data.unsqueeze(-1) >> shifts) & low  # [e, r, c, p]
        if weight.packed_dim == 2:
            values = unpacked.reshape(len(experts), rows, cols)
        else:
            values = unpacked.permute(0, 1, 3, 2).reshape(len(experts), rows, cols)
        if weight.zeros is not None:
            zeros = (weight.zeros[experts].unsqueeze(-1) >> shifts) & low  # [e, r / p, g, p]
            zeros = zeros.permute(0, 1, 3, 2).reshape(len(experts), rows, -1)
            values = values - zeros.repeat_interleave(weight.group_cols, 2)[:, :, :cols]
        values = (values - weight.zero_offset).float()
    scales = weight.scales[experts].float().repeat_interleave(weight.scale_rows, 1)[:, :rows]
    return (values * scales.repeat_interleave(weight.group_cols, 2)[:, :, :cols]).to(torch.bfloat16)


def touched(topk_ids: torch.Tensor, experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Which experts to dequantize and the ids that route into them, without reading the routing on
    the host (CUDA graphs): every expert once the batch has as many picks, else one copy per pick."""
    if topk_ids.numel() >= experts:
        return torch.arange(experts, device=topk_ids.device), topk_ids
    return topk_ids.reshape(-1), torch.arange(topk_ids.numel(), device=topk_ids.device).view_as(topk_ids)


def touched_bytes(nbytes: int, experts: int, topk_ids: torch.Tensor) -> float:
    """Bytes of the experts this batch picks, of a stacked weight of ``nbytes``."""
    return nbytes * len(topk_ids.unique()) / experts


def time_us(product, stack: list, batch: tuple, dry_run: bool) -> float:
    if dry_run:
        start = time.perf_counter()
        product(batch, stack[0])
        return (time.perf_counter() - start) * 1e6
    from tune_gemv import time_per_product  # benchmarks/ is the script's folder, so on its path

    return time_per_product(product, stack, batch)


def bench(fmt: str, shape_name: str, shape: tuple[int, int, int, int], batches, args) -> None:
    experts, top_k, hidden, inter = shape
    make_method, scale = FORMATS[fmt]
    method = make_method()
    first = random_layer(method, scale, experts, hidden, inter, args.device)
    quant_bytes = sum(method.fused_weight(first, stem).nbytes() for stem in ("w13", "w2"))
    copies = 1 if args.dry_run else max(2, int(L2_BEATING_BYTES // quant_bytes) + 1)
    layers = [first] + [random_layer(method, scale, experts, hidden, inter, args.device)
                      for _ in range(copies - 1)]
    quantized = [tuple(method.fused_weight(layer, stem) for stem in ("w13", "w2")) for layer in layers]
    every = torch.arange(experts, device=args.device)
    dense = [tuple(dequantize(w, every) for w in pair) for pair in quantized]
    dense_bytes = sum(w.numel() * w.element_size() for w in dense[0])
    dense = dense[:max(2, int(L2_BEATING_BYTES // dense_bytes) + 1)]
    config = moe.default_config(1, top_k, experts) if args.dry_run else None

    def fused(batch, weights):
        return moe.fused_moe(batch[0], *weights, *batch[1:], config=config)

    def dequantized_then_fused(batch, weights):
        hidden_rows, topk_weights, topk_ids = batch
        picked, ids = touched(topk_ids, experts)
        return moe.fused_moe(hidden_rows, *(dequantize(w, picked) for w in weights), topk_weights, ids, config=config)

    print(f"{fmt} at {shape_name} (E={experts}, top-{top_k}, H={hidden}, I={inter}): "
          f"{quant_bytes / 1e6:.1f} MB quantized, {dense_bytes / 1e6:.1f} MB bf16", flush=True)
    print(f"{'batch':>5} {'fused us':>9} {'floor us':>9} {'deq+fused':>10} {'bf16 us':>9} {'bf16 floor':>10}")
    for tokens in batches:
        hidden_rows = torch.randn(tokens, hidden, dtype=torch.bfloat16, device=args.device)
        topk_weights, topk_ids = torch.rand(tokens, experts, device=args.device).topk(top_k, dim=-1)
        batch = (hidden_rows, topk_weights, topk_ids)
        want = moe.fused_moe(hidden_rows, *dense[0], topk_weights, topk_ids, config=config)
        torch.testing.assert_close(fused(batch, quantized[0]).float(), want.float(), atol=3e-2, rtol=3e-2)
        floor = touched_bytes(quant_bytes, experts, topk_ids) / args.bandwidth * 1e6
        dense_floor = touched_bytes(dense_bytes, experts, topk_ids) / args.bandwidth * 1e6
        print(f"{tokens:5d} {time_us(fused, quantized, batch, args.dry_run):9.1f} {floor:9.1f} "
              f"{time_us(dequantized_then_fused, quantized, batch, args.dry_run):10.1f} "
              f"{time_us(fused, dense, batch, args.dry_run):9.1f} {dense_floor:10.1f}", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--formats", nargs="+", choices=sorted(FORMATS), default=list(FORMATS))
    parser.add_argument("--shapes", nargs="+", choices=sorted(SHAPES), default=list(SHAPES))
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks splitting the intermediate size")
    parser.add_argument("--bandwidth", type=float, default=4.26e12, help="HBM bytes per second for the floor")
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, one untimed pass (interpreter)")
    args = parser.parse_args()
    args.device = "cpu" if args.dry_run else "cuda"
    if not args.dry_run and not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU (or --dry-run under TRITON_INTERPRET=1)")
    torch.manual_seed(0)
    for shape_name in ["tiny"] if args.dry_run else args.shapes:
        experts, top_k, hidden, inter = DRY_RUN_SHAPE if args.dry_run else SHAPES[shape_name]
        if inter % args.tp:
            raise SystemExit(f"--tp {args.tp} does not divide {shape_name}'s intermediate size {inter}")
        for fmt in args.formats:
            batches = (1, 5) if args.dry_run else BATCHES
            bench(fmt, shape_name, (experts, top_k, hidden, inter // args.tp), batches, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())

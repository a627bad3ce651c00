"""Block-wise FP8 (DeepSeek-V3, Qwen3-FP8): one weight scale per (rows x cols) block of the
weight, activations quantized per token and ``cols``-wide group of input features.

The float path here computes what the block-wise GPU kernels (``block_gemm.py``, taken by linear
layers on an FP8-capable GPU) compute: the weight dequantized block by block and the input
quantized to e4m3 and back group by group. It serves the CPU, older GPUs, and the experts.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from sglang_core.layers.parallel import SINGLE, RowParallelLinear
from sglang_core.layers.quant import weight_param
from sglang_plugins.quant.fp8.e4m3 import round_trip, token_scale


def create_block_scale(layer: nn.Module, prefix: str, block: tuple[int, int], input_size: int,
                       output_sizes: list[int], weight_loader: Callable[..., None], name: str) -> None:
    """``layer.<name>`` (``weight_scale_inv`` as DeepSeek-V3 names it) [ceil(out/rows), ceil(in/cols)],
    sharded with the weight.

    As DeepSeek-V3 ships them, a weight's last row and column blocks may be partial (its 576-row
    ``kv_a_proj_with_mqa``: 4.5 blocks of 128). A block may not be cut, though: a fused layer's
    parts (and column-parallel ranks) follow each other along the output rows, so every part but
    the last unsplit one must hold whole blocks; likewise a row-parallel rank's input columns."""
    rows, cols = block
    tp = getattr(layer, "tp", SINGLE).size
    row_parallel = isinstance(layer, RowParallelLinear)
    if input_size % cols and row_parallel and tp > 1:
        raise ValueError(f"quantization_config weight_block_size {list(block)}: {prefix} has {input_size} input "
                         f"features per rank, not a multiple of the block's {cols} columns")
    cut_parts = output_sizes if tp > 1 and not row_parallel else output_sizes[:-1]
    if any(size % rows for size in cut_parts):
        raise ValueError(f"quantization_config weight_block_size {list(block)}: {prefix} has output parts of "
                         f"{output_sizes} rows (per rank), not multiples of the block's {rows} rows")
    scale = torch.ones(-(-sum(output_sizes) // rows), -(-input_size // cols))
    setattr(layer, name, weight_param(scale, weight_loader, output_dim=0, input_dim=1, packed_dim=0,
                                      packed_factor=rows))


def dequantize_weight(weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """``weight`` times the scale of the block each element is in (float32)."""
    rows, cols = block
    out, inputs = weight.shape
    scale = scale_inv.repeat_interleave(rows, dim=0)[:out].repeat_interleave(cols, dim=1)[:, :inputs]
    return weight.float() * scale


def quantize_dequantize_groups(x: torch.Tensor, cols: int) -> torch.Tensor:
    """``x`` rounded to e4m3 with one scale per token and ``cols``-wide group (its largest
    magnitude over e4m3's; a partial last group scaled by its own features), and back to ``x``'s dtype."""
    features = x.shape[-1]
    padded = F.pad(x.float(), (0, -features % cols))  # zeros leave every group's largest magnitude as it is
    groups = padded.unflatten(-1, (-1, cols))
    return round_trip(groups, token_scale(groups)).flatten(-2)[..., :features].to(x.dtype)

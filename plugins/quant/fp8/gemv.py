"""``y = (x W^T) * w_scale (+ b)`` for one row ``x`` and an e4m3 weight with one scale per output
row: the batch-1 decode product of per-tensor and per-channel FP8 layers.

torch's ``_scaled_mm`` at one row costs a separate activation-scale kernel, a quantize kernel and
cuBLAS's FP8 GEMM, none of them in the core's programmatic-dependent-launch chain. Here one kernel
does it all, shaped like the core's ``gemv`` (sglang_core/kernels/gemv.py): each program owns
``BLOCK_N`` weight rows and walks them along K in ``BLOCK_K`` tiles, the next tile in flight while
one is multiplied; its first tile is read before waiting for the previous kernel (no kernel of a
step writes weights).

Activations keep the layer's semantics: with dynamic scales each program computes the row's
scale itself (the largest magnitude over 448, as ``e4m3.token_scale``: ``x`` is a few thousand
values read from cache), with a static scale it loads it; either way ``x / scale`` is rounded to
e4m3 before the float32 dot product (compiled: the conversion instruction, one per two values, as
each program rounds the whole row; interpreted: ``round_to_e4m3``'s exact arithmetic), so the
result is ``_scaled_mm``'s up to the order of the float32 sums. Weight-only layers multiply ``x``
as it is.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from sglang_core.kernels.opaque import opaque_to_compiler
from sglang_core.kernels.pdl import launch_options, pdl_launch_next, pdl_wait
from sglang_plugins.quant.fp8.block_gemm import round_to_e4m3
from sglang_plugins.quant.fp8.e4m3 import FP8, FP8_MAX, MIN_SCALE

_E4M3_MAX = tl.constexpr(FP8_MAX)
_SMALLEST_MAX = tl.constexpr(MIN_SCALE * FP8_MAX)  # as ``e4m3.token_scale`` clamps it

# Triton's interpreter converts float32 to e4m3 inexactly (block_gemm.py): there the rounding is arithmetic.
_INTERPRETED = os.environ.get("TRITON_INTERPRET", "").lower() in ("1", "true", "on")
ENABLED = True  # benchmarks switch it off to measure ``_scaled_mm`` beside it
# Untuned guesses until measured (benchmarks/tune_gemv.py --quant fp8): the bf16 GEMV's tile in
# bytes (4 rows of 2 KB), one e4m3 byte a weight.
LAUNCH = dict(BLOCK_N=4, BLOCK_K=2048, num_warps=4, num_stages=1)
ACTIVATIONS = ("none", "static", "dynamic")


@triton.jit
def _fp8_gemv_kernel(X, W, WScale, XScale, Bias, Y, N, K, stride_wn,
                     ACTIVATIONS: tl.constexpr, CONVERT: tl.constexpr, HAS_BIAS: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, USE_PDL: tl.constexpr):
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < N
    kk = tl.arange(0, BLOCK_K)
    w_ptrs = W + n[:, None].to(tl.int64) * stride_wn + kk[None, :]
    pdl_launch_next(USE_PDL)
    w = tl.load(w_ptrs, mask=n_ok[:, None] & (kk < K)[None, :], other=0.0)
    pdl_wait(USE_PDL)
    if ACTIVATIONS == "dynamic":
        largest = tl.zeros([BLOCK_K], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            x = tl.load(X + k0 + kk, mask=(k0 + kk) < K, other=0.0).to(tl.float32)
            largest = tl.maximum(largest, tl.abs(x))
        # Divisions rounded as IEEE (and torch) round them, so the e4m3 values are torch's.
        x_scale = tl.math.div_rn(tl.maximum(tl.max(largest, axis=0), _SMALLEST_MAX), _E4M3_MAX)
    elif ACTIVATIONS == "static":
        x_scale = tl.load(XScale).to(tl.float32)
    else:
        x_scale = 1.0
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        x = tl.load(X + k0 + kk, mask=(k0 + kk) < K, other=0.0).to(tl.float32)
        if ACTIVATIONS != "none":
            x = tl.minimum(tl.maximum(tl.math.div_rn(x, x_scale), -_E4M3_MAX), _E4M3_MAX)
            if CONVERT:  # the GPU's conversion instruction, to nearest even (sm_89+)
                x = x.to(tl.float8e4nv, fp_downcast_rounding="rtne").to(tl.float32)
            else:
                x = round_to_e4m3(x)
        w_next = tl.load(w_ptrs + k0 + BLOCK_K, mask=n_ok[:, None] & ((k0 + BLOCK_K + kk) < K)[None, :], other=0.0)
        acc += tl.sum(w.to(tl.float32) * x[None, :], axis=1)
        w = w_next
    acc = acc * x_scale * tl.load(WScale + n, mask=n_ok, other=0.0)
    if HAS_BIAS:
        acc += tl.load(Bias + n, mask=n_ok, other=0.0).to(tl.float32)
    tl.store(Y + n, acc.to(Y.dtype.element_ty), mask=n_ok)


def fits(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether ``fp8_gemv`` serves this product: one row (of a float dtype) against an e4m3
    weight ``[N, K]`` with contiguous K."""
    return (ENABLED and x.numel() == x.shape[-1] > 0 and x.is_floating_point() and weight.dtype == FP8
            and weight.dim() == 2 and weight.stride(1) == 1 and x.shape[-1] == weight.shape[1])


@opaque_to_compiler
def fp8_gemv(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, activations: str,
             input_scale: torch.Tensor | None = None, bias: torch.Tensor | None = None,
             config: dict | None = None) -> torch.Tensor:
    """``x`` (one row, see ``fits``) times the e4m3 ``weight`` [N, K] scaled by ``weight_scale``
    (float32, one per output row), plus ``bias``, in ``x``'s dtype. ``activations``: "dynamic"
    (``x`` rounded to e4m3 by its own scale), "static" (by the scalar ``input_scale``) or "none".
    ``config`` overrides ``LAUNCH``."""
    if activations not in ACTIVATIONS:
        raise ValueError(f"activations {activations!r}: expected one of {ACTIVATIONS}")
    if activations == "static" and input_scale is None:
        raise ValueError("input_scale: static activations need their scale")
    n, k = weight.shape
    x1 = x.reshape(k).contiguous()
    y = torch.empty(n, dtype=x.dtype, device=x.device)
    launch = dict(config or LAUNCH)
    block_n, block_k = launch.pop("BLOCK_N"), launch.pop("BLOCK_K")
    _fp8_gemv_kernel[(triton.cdiv(n, block_n),)](
        x1, weight, weight_scale, input_scale if input_scale is not None else weight_scale,
        bias if bias is not None else weight_scale, y, n, k, weight.stride(0),
        ACTIVATIONS=activations, CONVERT=not _INTERPRETED, HAS_BIAS=bias is not None, BLOCK_N=block_n,
        BLOCK_K=min(block_k, triton.next_power_of_2(k)), **launch, **launch_options(x))
    return y.view(*x.shape[:-1], n)

"""Block-wise FP8 on the GPU: ``y = x W^T (+ b)`` with e4m3 weights scaled per (rows x cols) block.

Two kernels. ``quantize_groups`` rounds each token's ``cols``-wide groups of input features to
e4m3, each by its own scale (the group's largest magnitude over e4m3's, a partial last group by
its own features). ``block_gemm`` multiplies those by the e4m3 weight in tiles ``BLOCK_K = cols``
wide, so each K step is one activation group against one column of weight blocks: the step's
e4m3 dot product, accumulated in float32, is multiplied by the group's scale times each output
row's block scale and summed in float32; the result (plus bias) is rounded once to ``x``'s dtype.
These are the numbers ``block.py``'s float path computes, without rounding the dequantized
activations and weights to ``x``'s dtype first.

Rounding to e4m3 is done here in float32 arithmetic (to nearest, ties to even, on e4m3's grid;
a scaled group's largest magnitude is 448 up to float32 rounding, which rounds back to 448), and
only the exact result is converted: the conversion then rounds nothing, so the same code is
exact both compiled and in Triton's interpreter, whose float32 to e4m3 conversion loses the carry
of a rounded-up mantissa and flushes e4m3's subnormals.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sglang_core.kernels.opaque import opaque_to_compiler
from sglang_core.kernels.pdl import launch_options, pdl_enter
from sglang_plugins.quant.fp8.e4m3 import FP8, FP8_MAX, MIN_SCALE

_E4M3_MAX = tl.constexpr(FP8_MAX)
_SMALLEST_GROUP_MAX = tl.constexpr(MIN_SCALE * FP8_MAX)  # as ``e4m3.token_scale`` clamps it


MIN_BLOCK_COLS = 32


def fits(x: torch.Tensor, block: tuple[int, int]) -> bool:
    """Whether the kernels serve this input: a CUDA device with FP8 tensor cores (compute
    capability 8.9+: Ada, Hopper and later) and block columns a power of two of at least 32
    (``tl.dot``'s K tile: compiled, an e4m3 dot needs K >= 32)."""
    cols = block[1]
    return (x.is_cuda and torch.cuda.get_device_capability(x.device) >= (8, 9)
            and cols >= MIN_BLOCK_COLS and cols & (cols - 1) == 0)


@triton.jit
def round_to_e4m3(y):
    """``y`` (float32, ``|y|`` at most 464: past it e4m3fn has no finite value to round to) rounded
    to the nearest e4m3 value, ties to even; still float32."""
    bits = y.to(tl.int32, bitcast=True)
    a = (bits & 0x7FFFFFFF).to(tl.float32, bitcast=True)
    # e4m3 keeps 3 fraction bits above 2^-6 and has a fixed step of 2^-9 below it: the step here is
    # 2^(max(exponent, -6) - 3), and a / step (a power of two: exact) is below 16.
    exponent = (bits >> 23 & 0xFF) - 127
    step_exponent = tl.maximum(exponent, -6) - 3
    step = ((step_exponent + 127) << 23).to(tl.float32, bitcast=True)
    inverse_step = ((127 - step_exponent) << 23).to(tl.float32, bitcast=True)
    units = a * inverse_step
    whole = units.to(tl.int32).to(tl.float32)  # truncation; units >= 0
    fraction = units - whole
    round_up = (fraction > 0.5) | ((fraction == 0.5) & ((whole.to(tl.int32) & 1) == 1))
    rounded = (whole + round_up.to(tl.float32)) * step
    sign = bits & -0x80000000  # y's, -0 included
    return (rounded.to(tl.int32, bitcast=True) | sign).to(tl.float32, bitcast=True)


@triton.jit
def _quantize_groups_kernel(X, Q, Scale, K, num_groups, stride_xm, stride_qm, stride_sm,
                            GROUP: tl.constexpr, GROUPS: tl.constexpr, USE_PDL: tl.constexpr):
    """One program per token and ``GROUPS`` of its groups: each group's ``scale = max(|x|) / 448``
    (at least ``MIN_SCALE``) and ``Q = e4m3(x / scale)``."""
    pdl_enter(USE_PDL)
    token = tl.program_id(0).to(tl.int64)
    groups = tl.program_id(1) * GROUPS + tl.arange(0, GROUPS)
    cols = groups[:, None] * GROUP + tl.arange(0, GROUP)[None, :]
    col_ok = cols < K
    x = tl.load(X + token * stride_xm + cols, mask=col_ok, other=0.0).to(tl.float32)
    # Divisions rounded as IEEE (and torch) round them, so the e4m3 values are the float path's.
    scale = tl.math.div_rn(tl.maximum(tl.max(tl.abs(x), axis=1), _SMALLEST_GROUP_MAX), _E4M3_MAX)
    q = round_to_e4m3(tl.math.div_rn(x, scale[:, None])).to(Q.dtype.element_ty)
    tl.store(Q + token * stride_qm + cols, q, mask=col_ok)
    tl.store(Scale + token * stride_sm + groups, scale, mask=groups < num_groups)


@opaque_to_compiler
def quantize_groups(x: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (e4m3 [M, K], float32 scales [M, ceil(K / group)]); ``group`` a power of two."""
    m, k = x.shape
    x = x if x.stride(1) == 1 else x.contiguous()
    num_groups = triton.cdiv(k, group)
    q = torch.empty(m, k, dtype=FP8, device=x.device)
    scale = torch.empty(m, num_groups, dtype=torch.float32, device=x.device)
    # About 1024 features a program: few enough programs for a long prefill, enough for one token.
    groups = min(max(1, 1024 // group), triton.next_power_of_2(num_groups))
    if m:
        _quantize_groups_kernel[(m, triton.cdiv(num_groups, groups))](
            x, q, scale, k, num_groups, x.stride(0), q.stride(0), scale.stride(0), GROUP=group, GROUPS=groups,
            **launch_options(x))
    return q, scale


@triton.jit
def _block_gemm_kernel(A, AScale, W, WScale, Bias, Y, M, N, K, block_rows,
                       stride_am, stride_asm, stride_wn, stride_wsn, stride_ym,
                       HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                       USE_PDL: tl.constexpr):
    """One ``BLOCK_M x BLOCK_N`` tile of ``Y``. Consecutive programs take the row tiles of one
    column tile, so a tile of weight rows is read from memory once and then served from L2."""
    pdl_enter(USE_PDL)  # the activations come from the quantize kernel
    tiles_m = tl.cdiv(M, BLOCK_M)
    tile_m = tl.program_id(0) % tiles_m
    tile_n = tl.program_id(0) // tiles_m
    rows = tile_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < M
    col_ok = cols < N
    rows64 = rows.to(tl.int64)
    cols64 = cols.to(tl.int64)
    kk = tl.arange(0, BLOCK_K)
    a_ptrs = A + rows64[:, None] * stride_am + kk[None, :]
    w_ptrs = W + cols64[None, :] * stride_wn + kk[:, None]
    a_scale_ptrs = AScale + rows64 * stride_asm
    w_scale_ptrs = WScale + (cols // block_rows).to(tl.int64) * stride_wsn  # each output row's block row
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k_block in range(0, tl.cdiv(K, BLOCK_K)):
        k_ok = kk < K - k_block * BLOCK_K
        a = tl.load(a_ptrs + k_block * BLOCK_K, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_ptrs + k_block * BLOCK_K, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        a_scale = tl.load(a_scale_ptrs + k_block, mask=row_ok, other=0.0)
        w_scale = tl.load(w_scale_ptrs + k_block, mask=col_ok, other=0.0)
        acc += tl.dot(a, w, out_dtype=tl.float32) * a_scale[:, None] * w_scale[None, :]
    if HAS_BIAS:
        acc += tl.load(Bias + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(Y + rows64[:, None] * stride_ym + cols64[None, :], acc.to(Y.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])


def default_config(m: int) -> dict:
    """Tiles by the number of tokens: a decode batch fills one short row tile and spreads the
    weight over many programs; a prefill takes large tiles."""
    if m <= 16:
        return dict(BLOCK_M=16, BLOCK_N=64, num_warps=4, num_stages=4)
    if m <= 64:
        return dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=4)
    return dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=3)


@opaque_to_compiler
def block_gemm(q: torch.Tensor, q_scale: torch.Tensor, weight: torch.Tensor, weight_scale_inv: torch.Tensor,
               block: tuple[int, int], bias: torch.Tensor | None, out_dtype: torch.dtype,
               config: dict | None = None) -> torch.Tensor:
    """``(q * q_scale) (weight * weight_scale_inv)^T + bias`` in ``out_dtype``.

    q [M, K] e4m3 with q_scale [M, ceil(K/cols)] (``quantize_groups``); weight [N, K] e4m3 with
    weight_scale_inv [ceil(N/rows), ceil(K/cols)]; ``block`` = (rows, cols). ``config`` overrides
    the tiles ``default_config`` chooses (its fields)."""
    m, k = q.shape
    n = weight.shape[0]
    rows, cols = block
    if cols < MIN_BLOCK_COLS or cols & (cols - 1):
        raise ValueError(f"block: columns {cols} are not a power of two of at least {MIN_BLOCK_COLS} (the K tile)")
    config = dict(config or default_config(m))
    block_m, block_n = config.pop("BLOCK_M"), config.pop("BLOCK_N")
    q, q_scale, weight, weight_scale_inv = (t if t.stride(1) == 1 else t.contiguous()  # the kernel steps K by 1
                                            for t in (q, q_scale, weight, weight_scale_inv))
    y = torch.empty(m, n, dtype=out_dtype, device=q.device)
    if m:
        _block_gemm_kernel[(triton.cdiv(m, block_m) * triton.cdiv(n, block_n),)](
            q, q_scale, weight, weight_scale_inv, bias if bias is not None else weight_scale_inv, y, m, n, k, rows,
            q.stride(0), q_scale.stride(0), weight.stride(0), weight_scale_inv.stride(0), y.stride(0),
            HAS_BIAS=bias is not None, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=cols,
            **config, **launch_options(q))
    return y


def block_fp8_linear(x: torch.Tensor, weight: torch.Tensor, weight_scale_inv: torch.Tensor,
                     block: tuple[int, int], bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x`` [..., K] quantized per token and ``cols``-wide group, times the block-scaled e4m3
    ``weight`` [N, K], plus ``bias``: [..., N] in ``x``'s dtype."""
    tokens = x.reshape(-1, x.shape[-1])
    q, q_scale = quantize_groups(tokens, block[1])
    y = block_gemm(q, q_scale, weight, weight_scale_inv, block, bias, x.dtype)
    return y.view(*x.shape[:-1], y.shape[-1])

"""``y = x @ W^T`` for a weight stored as packed 4- or 8-bit integers with a scale (and a zero
point) per group of input features, dequantised tile by tile in registers: the weight is read from
memory at its packed size, never written out in float.

The three packed-integer formats (GPTQ, AWQ, compressed-tensors ``pack-quantized``) differ only
in facts an ``IntWeight`` (int_weight.py) states: whether zero points are stored (and an offset
added to them, or the constant zero point of a symmetric scheme), the group size, and an
activation-order ``g_idx`` giving each input feature's group (AWQ's words, which run along the
outputs in an interleaved order, are repacked along the inputs at load). Slot ``i`` of a word
(bits ``bits * i`` up) holds value ``i`` of the word's run: of input features in the weight, of
output features in the zero points.

One kernel, two launch shapes. Up to ``GEMV_ROWS`` rows (decode) a program holds all the rows and
streams its columns' packed weight along K; larger batches launch a tiled GEMM. Where a layer has
too few tiles to spread over every SM, the K range is split over several programs (``SPLIT_K``,
float32 partial sums added afterwards). Weights are dequantised in float32 and rounded to ``x``'s
dtype for the tensor-core product (the dequantising CPU path rounds them so too); sums are float32.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from sglang_core.kernels.fused_moe import dot
from sglang_core.kernels.opaque import opaque_to_compiler
from sglang_core.kernels.pdl import launch_options, pdl_enter
from sglang_plugins.quant.int_weight import IntWeight

GEMV_ROWS = 16
# Launch settings by shape, not yet timed on a GPU (benchmarks/bench_int_matmul.py times them).
# Compiled for sm_90 without a GPU (Triton 3.6 and 3.9), they spill no registers for any layout
# with 16-bit inputs; with 4 warps the act-order tiles spilled. (Float32 inputs, multiplied
# exactly without tensor cores, do spill: that path serves tests, not speed.)
GEMV_LAUNCH = dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, num_warps=8, num_stages=3)
GEMM_LAUNCH = dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=3)
LAUNCH_FIELDS = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "SPLIT_K", "num_warps", "num_stages")


@triton.jit
def unpack_last(words, BITS: tl.constexpr):
    """``[R, C]`` words -> ``[R, C * p]`` values: each word's ``p = 32 / BITS`` slots in slot order."""
    PACK: tl.constexpr = 32 // BITS
    shifts = tl.arange(0, PACK) * BITS
    values = (words[:, :, None] >> shifts[None, None, :]) & ((1 << BITS) - 1)
    return tl.reshape(values, (words.shape[0], words.shape[1] * PACK))


@triton.jit
def unpack_first(words, BITS: tl.constexpr):
    """``[R, C]`` words -> ``[R * p, C]`` values: each word's ``p = 32 / BITS`` slots in slot order."""
    PACK: tl.constexpr = 32 // BITS
    shifts = tl.arange(0, PACK) * BITS
    values = (words[:, None, :] >> shifts[None, :, None]) & ((1 << BITS) - 1)
    return tl.reshape(values, (words.shape[0] * PACK, words.shape[1]))


@triton.jit
def _int_matmul_kernel(X, Q, S, Z, GIdx, Y, M, N, K, group_size, zero_offset,
                       stride_xm, stride_qk, stride_qn, stride_sg, stride_sn, stride_zg, stride_zn,
                       stride_ys, stride_ym,
                       BITS: tl.constexpr, HAS_ZEROS: tl.constexpr, HAS_G_IDX: tl.constexpr,
                       GROUP_PER_TILE: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
                       USE_PDL: tl.constexpr):
    """``Y[split] = X[:, ks] @ dequant(W)[ks, :]`` over this program's share ``ks`` of the K tiles,
    for one tile of rows and columns.

    Each packed word is loaded once and unpacked into its ``p`` values in registers.
    ``GROUP_PER_TILE``: no ``g_idx`` and groups a multiple of ``BLOCK_K``, so one row of scales and
    zero points serves the tile."""
    PACK: tl.constexpr = 32 // BITS
    rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)  # rows x features passes 2^31
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    word_cols = tl.program_id(1) * (BLOCK_N // PACK) + tl.arange(0, BLOCK_N // PACK)
    row_ok, col_ok, word_col_ok = rows < M, cols < N, word_cols < N // PACK
    k_share = tl.cdiv(tl.cdiv(K, BLOCK_K), SPLIT_K) * BLOCK_K
    k_begin = tl.program_id(2) * k_share
    k_end = tl.minimum(k_begin + k_share, K)
    kk = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    pdl_enter(USE_PDL)
    for k0 in range(k_begin, k_end, BLOCK_K):
        k = k0 + kk
        k_ok = k < K
        x = tl.load(X + rows[:, None] * stride_xm + k[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        word_rows = k0 // PACK + tl.arange(0, BLOCK_K // PACK)
        words = tl.load(Q + word_rows[:, None] * stride_qk + cols[None, :] * stride_qn,
                        mask=(word_rows < K // PACK)[:, None] & col_ok[None, :], other=0)
        q = unpack_first(words, BITS)
        # The input features whose groups this tile needs: all, or the first (one group for all).
        group_k = k0 + tl.arange(0, 1) if GROUP_PER_TILE else k
        if HAS_G_IDX:
            group = tl.load(GIdx + group_k, mask=group_k < K, other=0)
        else:
            group = group_k // group_size
        group_ok = (group_k < K)[:, None]
        scale = tl.load(S + group[:, None] * stride_sg + cols[None, :] * stride_sn, mask=group_ok & col_ok[None, :],
                        other=0.0)
        if HAS_ZEROS:
            zero_words = tl.load(Z + group[:, None] * stride_zg + word_cols[None, :] * stride_zn,
                                 mask=group_ok & word_col_ok[None, :], other=0)
            zero = unpack_last(zero_words, BITS) + zero_offset
        else:
            zero = zero_offset
        w = ((q - zero).to(tl.float32) * scale.to(tl.float32)).to(X.dtype.element_ty)
        acc = dot(x, w, acc, PRECISION, UPCAST)
    tl.store(Y + tl.program_id(2) * stride_ys + rows[:, None] * stride_ym + cols[None, :],
             acc.to(Y.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


@functools.lru_cache(maxsize=None)
def programs_to_fill(device: torch.device) -> int:
    """Programs a launch should offer to keep the device's streaming units busy (two per SM)."""
    return 2 * torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1


def launch_config(m: int, n: int, k: int, device: torch.device, launch: dict | None = None) -> dict:
    """``launch`` (tile sizes, warps, stages; by default ``GEMV_LAUNCH`` up to ``GEMV_ROWS`` rows,
    ``GEMM_LAUNCH`` beyond) with ``SPLIT_K``: K split until the tiles fill the device."""
    launch = launch or (GEMV_LAUNCH if m <= GEMV_ROWS else GEMM_LAUNCH)
    tiles = triton.cdiv(m, launch["BLOCK_M"]) * triton.cdiv(n, launch["BLOCK_N"])
    split = min(triton.cdiv(k, launch["BLOCK_K"]), max(1, triton.cdiv(programs_to_fill(device), tiles)))
    return dict(launch, SPLIT_K=split)


@opaque_to_compiler
def int_matmul(x: torch.Tensor, weight: IntWeight, bias: torch.Tensor | None = None,
               config: dict | None = None) -> torch.Tensor:
    """``F.linear(x, dequantized weight, bias)`` in ``x``'s dtype (float32, float16 or bfloat16);
    ``config`` overrides the launch settings (fields ``LAUNCH_FIELDS``) ``launch_config`` chooses."""
    k, n = weight.shape
    if x.shape[-1] != k:
        raise ValueError(f"x has {x.shape[-1]} features; the packed weight takes {k}")
    x2 = x.reshape(-1, k)
    x2 = x2 if x2.stride(1) == 1 else x2.contiguous()
    m = x2.shape[0]
    launch = dict(config or launch_config(m, n, k, x.device))
    block_m, block_n, block_k, split = (launch.pop(field) for field in LAUNCH_FIELDS[:4])
    # Split programs write float32 partial sums, added (and rounded once) afterwards.
    y = torch.empty(split, m, n, dtype=torch.float32 if split > 1 else x.dtype, device=x.device)
    if m:
        zeros = weight.zeros if weight.zeros is not None else weight.qweight
        _int_matmul_kernel[(triton.cdiv(m, block_m), triton.cdiv(n, block_n), split)](
            x2, weight.qweight, weight.scales, zeros, weight.g_idx if weight.g_idx is not None else weight.qweight,
            y, m, n, k, weight.group_size or k, weight.zero_offset,
            x2.stride(0), *weight.qweight.stride(), *weight.scales.stride(), *zeros.stride(), y.stride(0), y.stride(1),
            BITS=weight.bits, HAS_ZEROS=weight.zeros is not None, HAS_G_IDX=weight.g_idx is not None,
            GROUP_PER_TILE=weight.g_idx is None and (weight.group_size or k) % block_k == 0,
            # float32 products exactly (no TF32), as the float32 PyTorch path computes them.
            PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
            # Triton's interpreter multiplies bfloat16 tiles as their raw 16-bit integers.
            UPCAST=x.dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET", "").lower() in ("1", "true", "on"),
            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, SPLIT_K=split, **launch, **launch_options(x))
    out = y.sum(0).to(x.dtype) if split > 1 else y[0]
    if bias is not None:
        out = out + bias
    return out.view(*x.shape[:-1], n)

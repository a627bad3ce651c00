"""``y = (x W^T) * w_scale (+ b)`` for one row ``x`` and an e4m3 weight with one scale per output
row: the batch-1 decode product of per-tensor and per-channel FP8 layers.

torch's ``_scaled_mm`` at one row costs a separate activation-scale kernel, a quantize kernel and
cuBLAS's FP8 GEMM, none of them in the core's programmatic-dependent-launch chain. Here the
product is one kernel (or two, see below), shaped like the core's ``gemv``
(sglang_core/kernels/gemv.py): each program owns ``BLOCK_N`` weight rows and walks them along K in
``BLOCK_K`` tiles, the next tile in flight while one is multiplied; its first tile is read before
waiting for the previous kernel (no kernel of a step writes weights).

At batch 1 the product must be bound by reading the weight: one byte a weight, so about nine
instructions a byte are all an H100 can issue at its memory bandwidth. The loop therefore does
per weight only its conversion and one multiply-add into a ``[BLOCK_N, BLOCK_K]`` float32
accumulator, summed across K once after the loop (a sum per tile costs shuffles and shared memory
in every step). Rounding ``x`` to e4m3 costs a correctly rounded division and two conversions per
element of ``x``, which every program would repeat for its ``BLOCK_N`` rows. ``QUANTIZE_ONCE``
(a launch setting) chooses where it is done: in a one-program kernel before the GEMV, which writes
the rounded row (float32) and its scale once and costs one more launch a linear layer; or in every
program, which costs no launch but that work divided by ``BLOCK_N`` per weight byte.
``LAUNCH_TABLE`` holds the settings ``benchmarks/tune_quant_gemv.py --sweep`` measured best per
shape.

Activations keep the layer's semantics: with dynamic scales the row's scale is its largest
magnitude over 448 (``e4m3.token_scale``), with a static scale it is loaded; either way ``x /
scale`` (an IEEE division, as torch's) is rounded to e4m3 before the float32 products (compiled:
the conversion instruction; interpreted: ``round_to_e4m3``'s exact arithmetic), so the result is
``_scaled_mm``'s up to the order of the float32 sums. Weight-only layers multiply ``x`` as it is.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from sglang_core.kernels.opaque import opaque_to_compiler
from sglang_core.kernels.pdl import launch_options, pdl_enter, pdl_launch_next, pdl_wait
from sglang_plugins.quant import launch_table
from sglang_plugins.quant.fp8.block_gemm import round_to_e4m3
from sglang_plugins.quant.fp8.e4m3 import FP8, FP8_MAX, MIN_SCALE

_E4M3_MAX = tl.constexpr(FP8_MAX)
_SMALLEST_MAX = tl.constexpr(MIN_SCALE * FP8_MAX)  # as ``e4m3.token_scale`` clamps it

# Triton's interpreter converts float32 to e4m3 inexactly (block_gemm.py): there the rounding is arithmetic.
_INTERPRETED = os.environ.get("TRITON_INTERPRET", "").lower() in ("1", "true", "on")
ENABLED = True  # benchmarks switch it off to measure ``_scaled_mm`` beside it
LAUNCH_FIELDS = ("BLOCK_N", "BLOCK_K", "num_warps", "num_stages", "QUANTIZE_ONCE")
# Untimed until benchmarks/tune_quant_gemv.py --sweep runs on the GPU: 16 rows a program (each
# element of x serves 16 weights), 512-byte row tiles (64 weights a thread a step, four 16-byte loads).
LAUNCH = dict(BLOCK_N=16, BLOCK_K=512, num_warps=4, num_stages=1, QUANTIZE_ONCE=False)
# (N, K) -> settings for that shape, as the sweep prints them; other shapes take ``LAUNCH``.
# Measured 2026-12-07 on an H100 (benchmarks/tune_quant_gemv.py --sweep; docs/benchmarks.md): Llama-3.1-8B's shapes.
LAUNCH_TABLE: dict[tuple[int, int], dict] = {
    (6144, 4096): {'BLOCK_N': 16, 'BLOCK_K': 512, 'num_warps': 4, 'num_stages': 1, 'QUANTIZE_ONCE': False},
    (4096, 4096): {'BLOCK_N': 8, 'BLOCK_K': 512, 'num_warps': 8, 'num_stages': 1, 'QUANTIZE_ONCE': False},
    (28672, 4096): {'BLOCK_N': 8, 'BLOCK_K': 512, 'num_warps': 4, 'num_stages': 1, 'QUANTIZE_ONCE': True},
    (4096, 14336): {'BLOCK_N': 8, 'BLOCK_K': 512, 'num_warps': 4, 'num_stages': 1, 'QUANTIZE_ONCE': True},
}
ACTIVATIONS = ("none", "static", "dynamic")
ROW_TILE = 16384  # the one-program rounding kernel holds this much of the row at once
SCALE_TILE = 4096  # the GEMV's own pass for the dynamic scale reads the row in tiles of this much


@triton.jit
def _row_scale(X, K, BLOCK_K: tl.constexpr):
    """The row's dynamic scale: its largest magnitude over 448, floored as ``e4m3.token_scale``."""
    kk = tl.arange(0, BLOCK_K)
    largest = tl.zeros([BLOCK_K], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        x = tl.load(X + k0 + kk, mask=(k0 + kk) < K, other=0.0).to(tl.float32)
        largest = tl.maximum(largest, tl.abs(x))
    # Divisions rounded as IEEE (and torch) round them, so the e4m3 values are torch's.
    return tl.math.div_rn(tl.maximum(tl.max(largest, axis=0), _SMALLEST_MAX), _E4M3_MAX)


@triton.jit
def _round_input(x, x_scale, CONVERT: tl.constexpr):
    """``x / x_scale`` rounded to e4m3 (to nearest even, saturated), as float32."""
    x = tl.minimum(tl.maximum(tl.math.div_rn(x, x_scale), -_E4M3_MAX), _E4M3_MAX)
    if CONVERT:  # the GPU's conversion instruction, to nearest even (sm_89+)
        return x.to(tl.float8e4nv, fp_downcast_rounding="rtne").to(tl.float32)
    else:
        return round_to_e4m3(x)


@triton.jit
def _word_values(words, CONVERT: tl.constexpr):
    """The four e4m3 weights of each int32 word (lowest byte first) as four float32 tensors.
    Compiled: two pair conversions to float16 and four exact widenings a word (Triton's own
    conversion of an e4m3 tensor moves every byte through integer instructions first)."""
    if CONVERT:
        return tl.inline_asm_elementwise(
            asm="""{
            .reg .b16 lo, hi, v0, v1, v2, v3;
            .reg .b32 h01, h23;
            mov.b32 {lo, hi}, $4;
            cvt.rn.f16x2.e4m3x2 h01, lo;
            cvt.rn.f16x2.e4m3x2 h23, hi;
            mov.b32 {v0, v1}, h01;
            mov.b32 {v2, v3}, h23;
            cvt.f32.f16 $0, v0;
            cvt.f32.f16 $1, v1;
            cvt.f32.f16 $2, v2;
            cvt.f32.f16 $3, v3;
            }""",
            constraints="=r,=r,=r,=r,r", args=[words], dtype=(tl.float32, tl.float32, tl.float32, tl.float32),
            is_pure=True, pack=1)
    else:
        return (_byte_value(words, 0), _byte_value(words, 1), _byte_value(words, 2), _byte_value(words, 3))


@triton.jit
def _byte_value(words, BYTE: tl.constexpr):
    """Byte ``BYTE`` of each word read as e4m3, as float32 (Triton's conversion)."""
    return ((words >> (8 * BYTE)) & 0xFF).to(tl.uint8).to(tl.float8e4nv, bitcast=True).to(tl.float32)


@triton.jit
def _round_row_kernel(X, XRounded, XScale, K, DYNAMIC: tl.constexpr, CONVERT: tl.constexpr,
                      BLOCK_K: tl.constexpr, USE_PDL: tl.constexpr):
    """One program: the row's scale (``DYNAMIC``: computed and stored in ``XScale``; else loaded
    from it) and ``XRounded = e4m3(x / scale)`` in float32."""
    pdl_enter(USE_PDL)
    if DYNAMIC:
        x_scale = _row_scale(X, K, BLOCK_K)
        tl.store(XScale, x_scale)
    else:
        x_scale = tl.load(XScale).to(tl.float32)
    kk = tl.arange(0, BLOCK_K)
    for k0 in range(0, K, BLOCK_K):
        x = tl.load(X + k0 + kk, mask=(k0 + kk) < K, other=0.0).to(tl.float32)
        tl.store(XRounded + k0 + kk, _round_input(x, x_scale, CONVERT), mask=(k0 + kk) < K)


@triton.jit
def _fp8_gemv_kernel(X, W, WScale, XScale, Bias, Y, N, K, stride_wn,
                     ACTIVATIONS: tl.constexpr, X_ROUNDED: tl.constexpr, CONVERT: tl.constexpr,
                     HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SCALE_BLOCK: tl.constexpr,
                     USE_PDL: tl.constexpr):
    """``X_ROUNDED``: ``X`` is already ``e4m3(x / scale)`` (``_round_row_kernel``) and ``XScale`` its
    scale. ``SCALE_BLOCK``: the tile of the dynamic scale's pass over the row (a few tiles at most:
    each is a round trip every program waits for before its first product)."""
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < N
    kk = tl.arange(0, BLOCK_K)
    WORDS: tl.constexpr = BLOCK_K // 4
    ww = tl.arange(0, WORDS)
    w_ptrs = W + n[:, None].to(tl.int64) * stride_wn + ww[None, :]  # W: int32 words of four e4m3 weights
    pdl_launch_next(USE_PDL)
    w = tl.load(w_ptrs, mask=n_ok[:, None] & (ww < K // 4)[None, :], other=0)
    pdl_wait(USE_PDL)
    if X_ROUNDED or ACTIVATIONS == "static":
        x_scale = tl.load(XScale).to(tl.float32)
    elif ACTIVATIONS == "dynamic":
        x_scale = _row_scale(X, K, SCALE_BLOCK)
    else:
        x_scale = 1.0
    acc0 = tl.zeros([BLOCK_N, WORDS], dtype=tl.float32)
    acc1 = tl.zeros([BLOCK_N, WORDS], dtype=tl.float32)
    acc2 = tl.zeros([BLOCK_N, WORDS], dtype=tl.float32)
    acc3 = tl.zeros([BLOCK_N, WORDS], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        x = tl.load(X + k0 + kk, mask=(k0 + kk) < K, other=0.0).to(tl.float32)
        if ACTIVATIONS != "none" and not X_ROUNDED:
            x = _round_input(x, x_scale, CONVERT)
        # x[4w + 2p + q] split into its four strided parts, x0[w] = x[4w] ... x3[w] = x[4w + 3].
        x_even, x_odd = tl.split(tl.reshape(x, (WORDS, 2, 2)))
        x0, x2 = tl.split(x_even)
        x1, x3 = tl.split(x_odd)
        next_words = (k0 + BLOCK_K) // 4
        w_next = tl.load(w_ptrs + next_words, mask=n_ok[:, None] & ((next_words + ww) < K // 4)[None, :], other=0)
        v0, v1, v2, v3 = _word_values(w, CONVERT)
        acc0 += v0 * x0[None, :]
        acc1 += v1 * x1[None, :]
        acc2 += v2 * x2[None, :]
        acc3 += v3 * x3[None, :]
        w = w_next
    out = tl.sum(acc0 + acc1 + acc2 + acc3, axis=1) * x_scale * tl.load(WScale + n, mask=n_ok, other=0.0)
    if HAS_BIAS:
        out += tl.load(Bias + n, mask=n_ok, other=0.0).to(tl.float32)
    tl.store(Y + n, out.to(Y.dtype.element_ty), mask=n_ok)


def fits(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether ``fp8_gemv`` serves this product: one row (of a float dtype) against an e4m3
    weight ``[N, K]`` with contiguous K, read as int32 words (K and the row stride multiples of 4)."""
    return (ENABLED and x.numel() == x.shape[-1] > 0 and x.is_floating_point() and weight.dtype == FP8
            and weight.dim() == 2 and weight.stride(1) == 1 and x.shape[-1] == weight.shape[1]
            and weight.shape[1] % 4 == 0 and weight.stride(0) % 4 == 0 and weight.storage_offset() % 4 == 0)


def launch_settings(n: int, k: int, config: dict | None = None) -> dict:
    """The launch settings for an ``[n, k]`` weight: ``config``, else ``LAUNCH_TABLE``'s entry for
    the shape, else ``LAUNCH`` (fields ``LAUNCH_FIELDS``)."""
    return launch_table.launch_settings("fp8_gemv", LAUNCH, LAUNCH_TABLE, LAUNCH_FIELDS, (n, k), config)


def _rounded_row(x1: torch.Tensor, activations: str, input_scale: torch.Tensor | None,
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """``e4m3(x / scale)`` in float32 and the scale (dynamic: the row's; static: ``input_scale``)."""
    k = x1.numel()
    rounded = torch.empty(k, dtype=torch.float32, device=x1.device)
    scale = torch.empty(1, dtype=torch.float32, device=x1.device) if activations == "dynamic" else input_scale
    block_k = min(triton.next_power_of_2(k), ROW_TILE)
    _round_row_kernel[(1,)](x1, rounded, scale, k, DYNAMIC=activations == "dynamic", CONVERT=not _INTERPRETED,
                            BLOCK_K=block_k, num_warps=min(16, max(4, block_k // 1024)), **launch_options(x1))
    return rounded, scale


@opaque_to_compiler
def fp8_gemv(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, activations: str,
             input_scale: torch.Tensor | None = None, bias: torch.Tensor | None = None,
             config: dict | None = None) -> torch.Tensor:
    """``x`` (one row, see ``fits``) times the e4m3 ``weight`` [N, K] scaled by ``weight_scale``
    (float32, one per output row), plus ``bias``, in ``x``'s dtype. ``activations``: "dynamic"
    (``x`` rounded to e4m3 by its own scale), "static" (by the scalar ``input_scale``) or "none".
    ``config`` overrides the shape's launch settings (``launch_settings``)."""
    if activations not in ACTIVATIONS:
        raise ValueError(f"activations {activations!r}: expected one of {ACTIVATIONS}")
    if activations == "static" and input_scale is None:
        raise ValueError("input_scale: static activations need their scale")
    n, k = weight.shape
    x1 = x.reshape(k).contiguous()
    y = torch.empty(n, dtype=x.dtype, device=x.device)
    launch = launch_settings(n, k, config)
    block_n, block_k = launch.pop("BLOCK_N"), launch.pop("BLOCK_K")
    x_rounded = launch.pop("QUANTIZE_ONCE") and activations != "none"
    x_scale = input_scale if input_scale is not None else weight_scale  # unread for "none" and "dynamic"
    if x_rounded:
        x1, x_scale = _rounded_row(x1, activations, input_scale)
    _fp8_gemv_kernel[(triton.cdiv(n, block_n),)](
        x1, weight.view(torch.int32), weight_scale, x_scale, bias if bias is not None else weight_scale, y, n, k,
        weight.stride(0) // 4,
        ACTIVATIONS=activations, X_ROUNDED=x_rounded, CONVERT=not _INTERPRETED, HAS_BIAS=bias is not None,
        BLOCK_N=block_n, BLOCK_K=min(block_k, triton.next_power_of_2(k)),
        SCALE_BLOCK=min(SCALE_TILE, triton.next_power_of_2(k)), **launch, **launch_options(x))
    return y.view(*x.shape[:-1], n)

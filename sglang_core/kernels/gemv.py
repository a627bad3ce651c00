"""``y = x W^T (+ b)`` for a decode batch of one row.

At batch 1 a decode step is the weight-read matmuls: each reads its whole weight once to make
one output row, so its speed is the bandwidth it streams the weight at. This kernel gives each
program ``BLOCK_N`` output features and walks their weight rows along K in ``BLOCK_K`` tiles,
the next tile in flight while one is multiplied. Float32 accumulation, rounded once to the
output dtype. On an H100 at Llama-3.1-8B shapes it streams 2.4-3.1 TB/s where cuBLAS's kernels
reach 2.1-2.9, and with programmatic dependent launch its first tile is read while the previous
kernel finishes (benchmarks/tune_gemv.py, docs/gpu.md). At two rows cuBLAS was faster.

A float32 weight against a 16-bit row (a router kept in float32, as DeepSeek's) reads the row as
it is: the result is ``F.linear(x.float(), weight)`` in float32, without a launch to cast ``x``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sglang_core.kernels.opaque import opaque_to_compiler
from sglang_core.kernels.pdl import launch_options, pdl_launch_next, pdl_wait

ENABLED = True  # benchmarks switch it off to measure cuBLAS beside it
# Launch settings, from benchmarks/tune_gemv.py on an H100 at Llama-3.1-8B shapes.
GEMV_LAUNCH = dict(BLOCK_N=4, BLOCK_K=1024, num_warps=4, num_stages=1)


@triton.jit
def _gemv_kernel(X, W, Bias, Y, N, K, stride_wn,
                 HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, USE_PDL: tl.constexpr):
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < N
    kk = tl.arange(0, BLOCK_K)
    w_ptrs = W + n[:, None] * stride_wn + kk[None, :]
    pdl_launch_next(USE_PDL)
    # No kernel of the step writes weights: the first tile is read before waiting for the previous kernel.
    w = tl.load(w_ptrs, mask=n_ok[:, None] & (kk < K)[None, :], other=0.0)
    pdl_wait(USE_PDL)
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        x = tl.load(X + k0 + kk, mask=(k0 + kk) < K, other=0.0)
        w_next = tl.load(w_ptrs + k0 + BLOCK_K, mask=n_ok[:, None] & ((k0 + BLOCK_K + kk) < K)[None, :], other=0.0)
        acc += tl.sum(w.to(tl.float32) * x.to(tl.float32)[None, :], axis=1)
        w = w_next
    if HAS_BIAS:
        acc += tl.load(Bias + n, mask=n_ok, other=0.0).to(tl.float32)
    tl.store(Y + n, acc.to(Y.dtype.element_ty), mask=n_ok)


def fits(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether ``gemv`` serves this product: one 16-bit row against a weight of the same dtype or
    float32 with contiguous K (larger batches are matmuls, where cuBLAS is the right tool)."""
    return (ENABLED and x.dim() >= 1 and x.numel() == x.shape[-1] > 0 and weight.dtype in (x.dtype, torch.float32)
            and x.dtype in (torch.bfloat16, torch.float16) and weight.dim() == 2 and weight.stride(1) == 1
            and x.shape[-1] == weight.shape[1])


@opaque_to_compiler
def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` for a one-row ``x`` (see ``fits``), in float32 where the
    weight is."""
    n, k = weight.shape
    x1 = x.reshape(k).contiguous()
    y = torch.empty(n, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    launch = dict(GEMV_LAUNCH)
    block_n, block_k = launch.pop("BLOCK_N"), launch.pop("BLOCK_K")
    _gemv_kernel[(triton.cdiv(n, block_n),)](
        x1, weight, bias if bias is not None else weight, y, n, k, weight.stride(0),
        HAS_BIAS=bias is not None, BLOCK_N=block_n, BLOCK_K=min(block_k, triton.next_power_of_2(k)),
        **launch, **launch_options(x))
    return y.view(*x.shape[:-1], n)

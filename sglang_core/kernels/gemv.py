"""``y = x W^T (+ b)`` for the few rows of a small decode batch.

At batch 1 a decode step is the weight-read matmuls: each reads its whole weight once to make
one output row, so its speed is the bandwidth it streams the weight at. This kernel gives each
program ``BLOCK_N`` output features and walks their weight rows along K in ``BLOCK_K`` tiles,
applying the tile to every input row while it is in registers (``ROWS`` <= ``MAX_ROWS``).
Float32 accumulation; the result is rounded once to the output dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sglang_core.kernels.pdl import launch_options, pdl_launch_next, pdl_wait

# Up to 2 rows it beats cuBLAS on an H100; at 4 it lost at every setting tried (benchmarks/tune_gemv.py).
MAX_ROWS = 2
# Launch settings, from benchmarks/tune_gemv.py on an H100 at Llama-3.1-8B shapes.
GEMV_LAUNCH = dict(BLOCK_N=4, BLOCK_K=1024, num_warps=4, num_stages=1)


@triton.jit
def _tile_product(X, x_ptrs, w, m_ok, k_ok):
    x = tl.load(x_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
    return tl.sum(x.to(tl.float32)[:, None, :] * w.to(tl.float32)[None, :, :], axis=2)


@triton.jit
def _gemv_kernel(X, W, Bias, Y, N, K, stride_xm, stride_wn, stride_ym,
                 ROWS: tl.constexpr, ROWS_P2: tl.constexpr, HAS_BIAS: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, USE_PDL: tl.constexpr):
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < N
    m = tl.arange(0, ROWS_P2)
    m_ok = m < ROWS
    kk = tl.arange(0, BLOCK_K)
    w_ptrs = W + n[:, None] * stride_wn + kk[None, :]
    x_ptrs = X + m[:, None] * stride_xm + kk[None, :]
    pdl_launch_next(USE_PDL)
    # No kernel of the step writes weights: the first tile is read before waiting for the previous kernel.
    w = tl.load(w_ptrs, mask=n_ok[:, None] & (kk < K)[None, :], other=0.0)
    pdl_wait(USE_PDL)
    acc = _tile_product(X, x_ptrs, w, m_ok, kk < K)
    for k0 in range(BLOCK_K, K, BLOCK_K):
        k_ok = (k0 + kk) < K
        w = tl.load(w_ptrs + k0, mask=n_ok[:, None] & k_ok[None, :], other=0.0)
        acc += _tile_product(X, x_ptrs + k0, w, m_ok, k_ok)
    if HAS_BIAS:
        acc += tl.load(Bias + n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(Y + m[:, None] * stride_ym + n[None, :], acc.to(Y.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


def fits(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether ``gemv`` serves this product: a few 16-bit rows against a 16-bit weight of the
    same dtype with contiguous K (larger batches are matmuls, where cuBLAS is the right tool)."""
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    return (0 < rows <= MAX_ROWS and x.dtype == weight.dtype and x.dtype in (torch.bfloat16, torch.float16)
            and weight.dim() == 2 and weight.stride(1) == 1 and x.shape[-1] == weight.shape[1])


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` for ``x`` of at most ``MAX_ROWS`` rows (see ``fits``)."""
    n, k = weight.shape
    x2 = x.reshape(-1, k)
    if x2.stride(1) != 1:
        x2 = x2.contiguous()
    rows = x2.shape[0]
    y = torch.empty(rows, n, dtype=x.dtype, device=x.device)
    launch = dict(GEMV_LAUNCH)
    block_n, block_k = launch.pop("BLOCK_N"), launch.pop("BLOCK_K")
    block_k = min(block_k, triton.next_power_of_2(k))
    _gemv_kernel[(triton.cdiv(n, block_n),)](
        x2, weight, bias if bias is not None else weight, y, n, k, x2.stride(0), weight.stride(0), y.stride(0),
        ROWS=rows, ROWS_P2=triton.next_power_of_2(rows), HAS_BIAS=bias is not None,
        BLOCK_N=block_n, BLOCK_K=block_k, **launch, **launch_options(x))
    return y.view(*x.shape[:-1], n)

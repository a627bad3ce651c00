"""``y = x W^T (+ b)`` for one row ``x`` (batch-1 decode) and a packed 4- or 8-bit weight
(``IntWeight``: GPTQ, AWQ, compressed-tensors ``pack-quantized``) grouped along K without
activation order: the weight is read once at its packed size and dequantised in registers.

``int_matmul`` serves one row too, but through ``tl.dot`` tiles 16 rows tall, and its split K
writes float32 partial sums that a separate kernel adds. Here a program owns ``BLOCK_N`` output
features and one of ``SPLIT_K`` shares of K; it multiplies elementwise in float32 and applies each
group's scale and zero point once per group, not once per weight:
``sum_k x_k (q_k - z) s = s (sum_k x_k q_k - z sum_k x_k)`` over a group's ``k``. Split shares
meet in the kernel: each writes its partial sums, and the last share of a column tile to arrive
(a per-tile arrival counter) adds them in share order, adds the bias and writes the output, then
resets the counter for the next launch. One kernel a linear, launched in the
programmatic-dependent-launch chain, its first weight tile read before waiting for the previous
kernel (no kernel of a step writes weights).

The counters are one zeroed buffer per device, made on first use (the eager warm-up runs before
CUDA graphs are captured); it is shared by the layers, whose one-row products run one after
another in stream order.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sglang_core.kernels.opaque import opaque_to_compiler
from sglang_core.kernels.pdl import launch_options, pdl_launch_next, pdl_wait
from sglang_plugins.quant.int_matmul import programs_to_fill, unpack_first, unpack_last
from sglang_plugins.quant.int_weight import IntWeight

ENABLED = True  # benchmarks switch it off to measure ``int_matmul`` beside it
# Untuned guesses until measured (benchmarks/bench_int_matmul.py --gemv sweeps them): 128 output
# features a tile (512 contiguous bytes a row of GPTQ words), 64 input features a step.
LAUNCH = dict(BLOCK_N=128, BLOCK_K=64, num_warps=4, num_stages=1)
LAUNCH_FIELDS = ("BLOCK_N", "BLOCK_K", "num_warps", "num_stages", "SPLIT_K")  # SPLIT_K optional: chosen by size
MAX_COLUMN_TILES = 1 << 14  # arrival counters a device holds; wider layers run without splitting K

_counters: dict[tuple[str, int | None], torch.Tensor] = {}


@triton.jit
def _load_words(Q, k0, k_end, cols, word_cols, col_ok, word_col_ok, stride_qk, stride_qn,
                BITS: tl.constexpr, PACKED_K: tl.constexpr, BLOCK_K: tl.constexpr):
    """The packed words of input features ``k0...`` (zero from ``k_end`` on) for the tile's columns."""
    PACK: tl.constexpr = 32 // BITS
    # Both returns inside the constexpr if/else: compiled Triton generates only the branch taken,
    # but checks every return it generates for one shape (an early return failed to compile).
    if PACKED_K:
        word_rows = k0 // PACK + tl.arange(0, BLOCK_K // PACK)
        return tl.load(Q + word_rows[:, None] * stride_qk + cols[None, :] * stride_qn,
                       mask=(word_rows < k_end // PACK)[:, None] & col_ok[None, :], other=0)
    else:
        k = k0 + tl.arange(0, BLOCK_K)
        return tl.load(Q + k[:, None] * stride_qk + word_cols[None, :] * stride_qn,
                       mask=(k < k_end)[:, None] & word_col_ok[None, :], other=0)


@triton.jit
def _int_gemv_kernel(X, Q, S, Z, Bias, Y, Partials, Counters, N, K, group_size, zero_offset,
                     stride_qk, stride_qn, stride_sg, stride_sn, stride_zg, stride_zn,
                     BITS: tl.constexpr, PACKED_K: tl.constexpr, INTERLEAVED: tl.constexpr,
                     HAS_ZEROS: tl.constexpr, HAS_BIAS: tl.constexpr, GROUP_K: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr, USE_PDL: tl.constexpr):
    """Output features of column tile ``program_id(0)`` over K share ``program_id(1)``.

    Columns are numbered as ``int_matmul``'s kernel numbers them (AWQ's slot order inside a
    word). ``GROUP_K``: features of one group within a ``BLOCK_K`` step (the step, or the group
    where several fit in a step)."""
    PACK: tl.constexpr = 32 // BITS
    HALF: tl.constexpr = PACK // 2
    GROUPS: tl.constexpr = BLOCK_K // GROUP_K
    tile = tl.program_id(0)
    position = tl.arange(0, BLOCK_N)
    if INTERLEAVED:
        # AWQ: slots 0..p/2-1 hold the word's even features, the rest its odd ones.
        position = (position // PACK) * PACK + 2 * (position % HALF) + (position % PACK) // HALF
    cols = tile * BLOCK_N + position
    word_cols = tile * (BLOCK_N // PACK) + tl.arange(0, BLOCK_N // PACK)
    col_ok, word_col_ok = cols < N, word_cols < N // PACK
    k_share = tl.cdiv(tl.cdiv(K, BLOCK_K), SPLIT_K) * BLOCK_K
    k_begin = tl.program_id(1) * k_share
    k_end = tl.minimum(k_begin + k_share, K)
    kk = tl.arange(0, BLOCK_K)
    group_starts = tl.arange(0, GROUPS) * GROUP_K
    pdl_launch_next(USE_PDL)
    # Words, not their unpacked codes, are held across a step: a quarter (8 bits) or an eighth of the registers.
    words = _load_words(Q, k_begin, k_end, cols, word_cols, col_ok, word_col_ok, stride_qk, stride_qn, BITS,
                        PACKED_K, BLOCK_K)
    pdl_wait(USE_PDL)
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for k0 in range(k_begin, k_end, BLOCK_K):
        next_words = _load_words(Q, k0 + BLOCK_K, k_end, cols, word_cols, col_ok, word_col_ok, stride_qk,
                                 stride_qn, BITS, PACKED_K, BLOCK_K)
        q = unpack_first(words, BITS) if PACKED_K else unpack_last(words, BITS)
        x = tl.load(X + k0 + kk, mask=(k0 + kk) < k_end, other=0.0).to(tl.float32)
        group = (k0 + group_starts) // group_size
        group_ok = ((k0 + group_starts) < k_end)[:, None]
        scale = tl.load(S + group[:, None] * stride_sg + cols[None, :] * stride_sn, mask=group_ok & col_ok[None, :],
                        other=0.0).to(tl.float32)
        if HAS_ZEROS:
            zero_words = tl.load(Z + group[:, None] * stride_zg + word_cols[None, :] * stride_zn,
                                 mask=group_ok & word_col_ok[None, :], other=0)
            zero = (unpack_last(zero_words, BITS) + zero_offset).to(tl.float32)
        else:
            zero = tl.full([GROUPS, BLOCK_N], zero_offset, tl.float32)
        products = tl.sum(tl.reshape(x[:, None] * q.to(tl.float32), (GROUPS, GROUP_K, BLOCK_N)), axis=1)
        x_sums = tl.sum(tl.reshape(x, (GROUPS, GROUP_K)), axis=1)
        acc += tl.sum(scale * (products - zero * x_sums[:, None]), axis=0)
        words = next_words
    if SPLIT_K > 1:
        tl.store(Partials + tl.program_id(1) * N + cols, acc, mask=col_ok, cache_modifier=".wt")
        tl.debug_barrier()  # every thread's partial sums are written before the arrival is counted
        arrived = tl.atomic_add(Counters + tile, 1, sem="acq_rel")
        if arrived == SPLIT_K - 1:
            acc = tl.zeros([BLOCK_N], dtype=tl.float32)
            for share in range(SPLIT_K):  # in share order: the sum does not depend on arrival order
                acc += tl.load(Partials + share * N + cols, mask=col_ok, other=0.0, cache_modifier=".cv")
            if HAS_BIAS:
                acc += tl.load(Bias + cols, mask=col_ok, other=0.0).to(tl.float32)
            tl.store(Y + cols, acc.to(Y.dtype.element_ty), mask=col_ok)
            tl.store(Counters + tile, 0)
    else:
        if HAS_BIAS:
            acc += tl.load(Bias + cols, mask=col_ok, other=0.0).to(tl.float32)
        tl.store(Y + cols, acc.to(Y.dtype.element_ty), mask=col_ok)


def _group_k(weight: IntWeight, block_k: int) -> int | None:
    """Features of one group within a ``block_k`` step, or None where groups and steps do not nest
    (or features have an activation order, ``g_idx``)."""
    k = weight.shape[0]
    group = weight.group_size or k
    if weight.g_idx is not None or block_k % (32 // weight.bits):
        return None
    if group >= k or group % block_k == 0:
        return block_k
    return group if block_k % group == 0 else None


def fits(x: torch.Tensor, weight: IntWeight, config: dict | None = None) -> bool:
    """Whether ``int_gemv`` serves this product: one row of a float dtype, groups without an
    activation order that nest with the K step of ``config`` (default ``LAUNCH``)."""
    block_k = (config or LAUNCH)["BLOCK_K"]
    return (ENABLED and x.numel() == x.shape[-1] == weight.shape[0] > 0 and x.is_floating_point()
            and _group_k(weight, block_k) is not None)


def _arrival_counters(device: torch.device) -> torch.Tensor:
    index = device.index if device.index is not None or device.type != "cuda" else torch.cuda.current_device()
    key = (device.type, index)
    if key not in _counters:
        _counters[key] = torch.zeros(MAX_COLUMN_TILES, dtype=torch.int32, device=device)
    return _counters[key]


@opaque_to_compiler
def int_gemv(x: torch.Tensor, weight: IntWeight, bias: torch.Tensor | None = None,
             config: dict | None = None) -> torch.Tensor:
    """``F.linear(x, dequantized weight, bias)`` for a one-row ``x`` (see ``fits``) in ``x``'s
    dtype; ``config`` overrides ``LAUNCH`` (fields ``LAUNCH_FIELDS``; without ``SPLIT_K``, K is split
    until the column tiles fill the device)."""
    k, n = weight.shape
    launch = dict(config or LAUNCH)
    block_n, block_k = launch.pop("BLOCK_N"), launch.pop("BLOCK_K")
    group_k = _group_k(weight, block_k)
    if x.numel() != k or group_k is None:
        raise ValueError(f"int_gemv takes one row of {k} features and groups that nest with BLOCK_K {block_k}")
    tiles = triton.cdiv(n, block_n)
    split = launch.pop("SPLIT_K", None) or min(triton.cdiv(k, block_k),
                                               max(1, triton.cdiv(programs_to_fill(x.device), tiles)))
    split = split if tiles <= MAX_COLUMN_TILES else 1
    x1 = x.reshape(k).contiguous()
    y = torch.empty(n, dtype=x.dtype, device=x.device)
    partials = torch.empty(split if split > 1 else 0, n, dtype=torch.float32, device=x.device)
    zeros = weight.zeros if weight.zeros is not None else weight.qweight
    _int_gemv_kernel[(tiles, split)](
        x1, weight.qweight, weight.scales, zeros, bias if bias is not None else weight.scales, y, partials,
        _arrival_counters(x.device), n, k, weight.group_size or k, weight.zero_offset,
        *weight.qweight.stride(), *weight.scales.stride(), *zeros.stride(),
        BITS=weight.bits, PACKED_K=weight.packed_dim == 0, INTERLEAVED=weight.interleaved,
        HAS_ZEROS=weight.zeros is not None, HAS_BIAS=bias is not None, GROUP_K=group_k,
        BLOCK_N=block_n, BLOCK_K=block_k, SPLIT_K=split, **launch, **launch_options(x))
    return y.view(*x.shape[:-1], n)

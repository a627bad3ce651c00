"""``y = x W^T (+ b)`` for one row ``x`` (batch-1 decode) and a packed 4- or 8-bit weight
(``IntWeight``: GPTQ, compressed-tensors ``pack-quantized``, AWQ as repacked at load) grouped along
K without activation order: the weight is read once at its packed size and dequantised in registers.

``int_matmul`` serves one row too, but through ``tl.dot`` tiles 16 rows tall, and its split K
writes float32 partial sums that a separate kernel adds. Here a program owns ``BLOCK_N`` output
features and one of ``SPLIT_K`` shares of K, walked in ``BLOCK_K`` steps that never straddle a
group. At batch 1 the product must be bound by reading the weight, and at two values a byte an
H100 can issue only about four instructions a value at its memory bandwidth, so the loop does per
value three: one and-or that places the value's bits in the mantissa of 2^23 (``_slot_values``:
no shift per value and no integer-to-float conversion), one subtraction of 2^23 (exact), one
multiply-add into a float32 accumulator as large as the step, with no sum across threads in the
loop. A value in the upper half-word is read after one shift of its word; a value ``b`` bits up its
half-word comes out times ``2^b``, which is undone on its input feature of ``x`` (an exact power of
two). (Words packing output features, AWQ's, cost the loop partial sums moved between warps: AWQ
layers are repacked, awq/method.py.) When a group's steps are done the accumulator
is summed over K once and the group's scale and zero point applied once per output feature:
``sum_k x_k (q_k - z) s = s (sum_k x_k q_k - z sum_k x_k)``.

Split shares meet in the kernel: each writes its partial sums, and the last share of a column tile
to arrive (a per-tile arrival counter) adds them in share order, adds the bias and writes the
output, then resets the counter for the next launch. One kernel a linear, launched in the
programmatic-dependent-launch chain, its first weight tile read before waiting for the previous
kernel (no kernel of a step writes weights). ``LAUNCH_TABLE`` holds the settings
``benchmarks/tune_quant_gemv.py --sweep`` measured best per shape.

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
from sglang_plugins.quant import launch_table
from sglang_plugins.quant.int_matmul import programs_to_fill
from sglang_plugins.quant.int_weight import IntWeight

ENABLED = True  # benchmarks switch it off to measure ``int_matmul`` beside it
# Shapes the table lacks. Tiles wide enough along N (the contiguous axis) that a thread's loads are
# 8-16 bytes, 64-128 values a thread a step, no spills compiled for sm_90.
LAUNCH = dict(BLOCK_N=512, BLOCK_K=16, num_warps=4, num_stages=1)
LAUNCH_FIELDS = ("BLOCK_N", "BLOCK_K", "num_warps", "num_stages", "SPLIT_K")  # SPLIT_K optional: chosen by size
# (N, K) -> settings for that shape, as the sweep prints them; others take ``LAUNCH``. Measured 2026-12-07 on
# an H100 (benchmarks/tune_quant_gemv.py --sweep; docs/benchmarks.md): Llama-3.1-8B's shapes, GPTQ int4. The
# AWQ entries of that sweep (its words along N) are gone with that layout: AWQ layers, repacked, take these.
LAUNCH_TABLE: dict[tuple[int, int], dict] = {
    (6144, 4096): {'BLOCK_N': 512, 'BLOCK_K': 32, 'num_warps': 4, 'num_stages': 1},
    (4096, 4096): {'BLOCK_N': 512, 'BLOCK_K': 32, 'num_warps': 4, 'num_stages': 1},
    (28672, 4096): {'BLOCK_N': 1024, 'BLOCK_K': 16, 'num_warps': 4, 'num_stages': 1},
    (4096, 14336): {'BLOCK_N': 512, 'BLOCK_K': 32, 'num_warps': 4, 'num_stages': 1},
}
MAX_COLUMN_TILES = 1 << 14  # arrival counters a device holds; wider layers run without splitting K
_TWO_23 = tl.constexpr(8388608.0)  # 2^23: floats of its exponent step by 1, so the mantissa holds an integer

_counters: dict[tuple[str, int | None], torch.Tensor] = {}


@triton.jit
def _load_words(Q, k0, k_end, cols, col_ok, stride_qk, stride_qn, BITS: tl.constexpr, BLOCK_K: tl.constexpr):
    """The packed words of input features ``k0...`` (zero from ``k_end`` on) for the tile's columns."""
    PACK: tl.constexpr = 32 // BITS
    word_rows = k0 // PACK + tl.arange(0, BLOCK_K // PACK)
    return tl.load(Q + word_rows[:, None] * stride_qk + cols[None, :] * stride_qn,
                   mask=(word_rows < k_end // PACK)[:, None] & col_ok[None, :], other=0)


@triton.jit
def _slot(based, SLOT: tl.constexpr, BITS: tl.constexpr):
    """Value ``SLOT`` of each word, times ``2^(BITS * (SLOT % HALF))``, as float32 (exact):
    ``based`` is the word's half (``_based_halves``) with 2^23's exponent bits set, and the mask
    keeps those and the value's field, so the float is ``2^23 + value * 2^(...)``."""
    HALF: tl.constexpr = 16 // BITS
    field: tl.constexpr = ((1 << BITS) - 1) << (BITS * (SLOT % HALF))
    return (based & (-0x800000 | field)).to(tl.float32, bitcast=True) - _TWO_23


@triton.jit
def _based_halves(words):
    """Each word's low and high 16 bits, each with 2^23's exponent bits set above them."""
    return (words & 0xFFFF) | 0x4B000000, ((words >> 16) & 0xFFFF) | 0x4B000000


@triton.jit
def _slot_values(words, BITS: tl.constexpr):
    """``[R, C]`` words -> ``[R, C, PACK]`` float32 values in slot order, each register holding one
    word's (joined in registers, not spread over threads), slot ``s`` times ``2^(BITS * (s % HALF))``.
    A join appends an axis of two, so joining the slots ``s`` and ``s + PACK / 2`` first, then those
    pairs, lays the slots out in order."""
    lo, hi = _based_halves(words)
    if BITS == 4:
        values = tl.join(tl.join(tl.join(_slot(lo, 0, 4), _slot(hi, 4, 4)), tl.join(_slot(lo, 2, 4), _slot(hi, 6, 4))),
                         tl.join(tl.join(_slot(lo, 1, 4), _slot(hi, 5, 4)), tl.join(_slot(lo, 3, 4), _slot(hi, 7, 4))))
    else:
        values = tl.join(tl.join(_slot(lo, 0, 8), _slot(hi, 2, 8)), tl.join(_slot(lo, 1, 8), _slot(hi, 3, 8)))
    return tl.reshape(values, (words.shape[0], words.shape[1], 32 // BITS))


@triton.jit
def _slot_factor(slot, BITS: tl.constexpr):
    """``2^-(BITS * (slot % HALF))``: undoes ``_slot``'s placement (built from its bits: exact)."""
    HALF: tl.constexpr = 16 // BITS
    return ((127 - BITS * (slot % HALF)) << 23).to(tl.float32, bitcast=True)


@triton.jit
def _int_gemv_kernel(X, Q, S, Z, Bias, Y, Partials, Counters, N, K, group_size, zero_offset,
                     stride_qk, stride_qn, stride_sg, stride_sn, stride_zg, stride_zn,
                     BITS: tl.constexpr, HAS_ZEROS: tl.constexpr, HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr, USE_PDL: tl.constexpr):
    """Output features of column tile ``program_id(0)`` over K share ``program_id(1)``; a step
    (``BLOCK_K`` input features) lies within one group. A word holds ``PACK`` consecutive input
    features of one output feature; zero points pack ``PACK`` output features to a word.
    ``EVEN_K``: K is whole steps (inputs read unmasked)."""
    PACK: tl.constexpr = 32 // BITS
    tile = tl.program_id(0)
    cols = tile * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    k_share = tl.cdiv(tl.cdiv(K, BLOCK_K), SPLIT_K) * BLOCK_K
    k_begin = tl.program_id(1) * k_share
    k_end = tl.minimum(k_begin + k_share, K)
    pdl_launch_next(USE_PDL)
    # Words, not their unpacked codes, are held across a step: a quarter (8 bits) or an eighth of the registers.
    words = _load_words(Q, k_begin, k_end, cols, col_ok, stride_qk, stride_qn, BITS, BLOCK_K)
    pdl_wait(USE_PDL)
    # acc: word rows x columns x slots (in _slot_values' order), multiply-added elementwise; a word's
    # slots are PACK consecutive inputs of its row, each x times the inverse of the slot's placement.
    x_index = tl.arange(0, BLOCK_K // PACK)[:, None] * PACK + tl.arange(0, PACK)[None, :]
    x_factor = _slot_factor(tl.arange(0, PACK), BITS)[None, :]
    acc = tl.zeros([BLOCK_K // PACK, BLOCK_N, PACK], dtype=tl.float32)
    out = tl.zeros([BLOCK_N], dtype=tl.float32)
    # The share's groups (its first and last may be partial), each's steps, then its scale once.
    for group_start in range(k_begin - k_begin % group_size, k_end, group_size):
        acc = tl.zeros_like(acc)
        x_acc = tl.zeros(x_index.shape, dtype=tl.float32)
        for k0 in range(tl.maximum(group_start, k_begin), tl.minimum(group_start + group_size, k_end), BLOCK_K):
            next_words = _load_words(Q, k0 + BLOCK_K, k_end, cols, col_ok, stride_qk, stride_qn, BITS, BLOCK_K)
            if EVEN_K:
                x = tl.load(X + k0 + x_index).to(tl.float32)
            else:
                x = tl.load(X + k0 + x_index, mask=(k0 + x_index) < k_end, other=0.0).to(tl.float32)
            x_acc += x
            acc += _slot_values(words, BITS) * (x * x_factor)[:, None, :]
            words = next_words
        group = group_start // group_size
        sums = tl.sum(tl.sum(acc, axis=2), axis=0)
        scale = tl.load(S + group * stride_sg + cols * stride_sn, mask=col_ok, other=0.0).to(tl.float32)
        if HAS_ZEROS:
            zero_words = tl.load(Z + group * stride_zg + (cols // PACK) * stride_zn, mask=col_ok, other=0)
            zero = (((zero_words >> (BITS * (cols % PACK))) & ((1 << BITS) - 1)) + zero_offset).to(tl.float32)
        else:
            zero = zero_offset
        out += scale * (sums - zero * tl.sum(tl.reshape(x_acc, (BLOCK_K,)), axis=0))
    if SPLIT_K > 1:
        tl.store(Partials + tl.program_id(1) * N + cols, out, mask=col_ok, cache_modifier=".wt")
        tl.debug_barrier()  # every thread's partial sums are written before the arrival is counted
        arrived = tl.atomic_add(Counters + tile, 1, sem="acq_rel")
        if arrived == SPLIT_K - 1:
            out = tl.zeros([BLOCK_N], dtype=tl.float32)
            for share in range(SPLIT_K):  # in share order: the sum does not depend on arrival order
                out += tl.load(Partials + share * N + cols, mask=col_ok, other=0.0, cache_modifier=".cv")
            if HAS_BIAS:
                out += tl.load(Bias + cols, mask=col_ok, other=0.0).to(tl.float32)
            tl.store(Y + cols, out.to(Y.dtype.element_ty), mask=col_ok)
            tl.store(Counters + tile, 0)
    else:
        if HAS_BIAS:
            out += tl.load(Bias + cols, mask=col_ok, other=0.0).to(tl.float32)
        tl.store(Y + cols, out.to(Y.dtype.element_ty), mask=col_ok)


def launch_settings(weight: IntWeight, config: dict | None = None) -> dict:
    """The launch settings for ``weight``: ``config``, else ``LAUNCH_TABLE``'s entry for its shape,
    else ``LAUNCH`` (fields ``LAUNCH_FIELDS``)."""
    k, n = weight.shape
    return launch_table.launch_settings("int_gemv", LAUNCH, LAUNCH_TABLE, LAUNCH_FIELDS, (n, k), config)


def _split(weight: IntWeight, step: int, tiles: int, device: torch.device) -> int:
    """K shares for ``tiles`` column tiles to fill the device, each share whole groups where the
    groups are enough (a share's partial groups cost their scales twice)."""
    k = weight.shape[0]
    wanted = max(1, triton.cdiv(programs_to_fill(device), tiles))
    groups = triton.cdiv(k, weight.group_size or k)
    if groups >= 2:
        return triton.cdiv(groups, triton.cdiv(groups, wanted))
    return min(triton.cdiv(k, step), wanted)


def _step_k(weight: IntWeight, block_k: int) -> int | None:
    """The K step: ``block_k``, or the group where it is smaller; None where a group is not a whole
    number of steps, a step not a whole number of words, or features have an activation order (``g_idx``)."""
    k = weight.shape[0]
    group = weight.group_size or k
    step = block_k if group >= k else min(block_k, group)
    if weight.g_idx is not None or step % (32 // weight.bits) or (group < k and group % step):
        return None
    return step


def fits(x: torch.Tensor, weight: IntWeight, config: dict | None = None) -> bool:
    """Whether ``int_gemv`` serves this product: one row of a float dtype, groups without an
    activation order that nest with the K step of the launch settings (``launch_settings``)."""
    block_k = launch_settings(weight, config)["BLOCK_K"]
    return (ENABLED and x.numel() == x.shape[-1] == weight.shape[0] > 0 and x.is_floating_point()
            and _step_k(weight, block_k) is not None)


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
    dtype; ``config`` overrides the shape's launch settings (``launch_settings``; without
    ``SPLIT_K``, K is split until the column tiles fill the device, ``_split``)."""
    k, n = weight.shape
    launch = launch_settings(weight, config)
    block_n, block_k = launch.pop("BLOCK_N"), launch.pop("BLOCK_K")
    step = _step_k(weight, block_k)
    if x.numel() != k or step is None:
        raise ValueError(f"int_gemv takes one row of {k} features and groups that nest with BLOCK_K {block_k}")
    tiles = triton.cdiv(n, block_n)
    split = launch.pop("SPLIT_K", None) or _split(weight, step, tiles, x.device)
    split = split if tiles <= MAX_COLUMN_TILES else 1
    x1 = x.reshape(k).contiguous()
    y = torch.empty(n, dtype=x.dtype, device=x.device)
    partials = torch.empty(split if split > 1 else 0, n, dtype=torch.float32, device=x.device)
    zeros = weight.zeros if weight.zeros is not None else weight.qweight
    _int_gemv_kernel[(tiles, split)](
        x1, weight.qweight, weight.scales, zeros, bias if bias is not None else weight.scales, y, partials,
        _arrival_counters(x.device), n, k, weight.group_size or k, weight.zero_offset,
        *weight.qweight.stride(), *weight.scales.stride(), *zeros.stride(),
        BITS=weight.bits, HAS_ZEROS=weight.zeros is not None, HAS_BIAS=bias is not None, EVEN_K=k % step == 0,
        BLOCK_N=block_n, BLOCK_K=step, SPLIT_K=split, **launch, **launch_options(x))
    return y.view(*x.shape[:-1], n)

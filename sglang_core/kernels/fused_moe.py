"""The routed experts of a mixture-of-experts block as two grouped GEMMs over tokens sorted by expert.

Each token picks ``k`` experts; each (token, choice) pair needs ``down(act(gate) * up)`` of its
expert. ``align_by_expert`` sorts the pairs by expert and pads each expert's run to a multiple
of ``BLOCK_M``, so that every block of ``BLOCK_M`` sorted pairs belongs to one expert. The first
kernel multiplies each block's hidden rows by its expert's gate and up rows (one tile of ``N``
each) and applies the activation in its epilogue; the second multiplies those by the expert's
down weight and scales each row by its routing weight. A third sums each token's rows over its
``k`` choices in float32 and rounds once. No atomics: each pair has its own output row.

Expert parallelism: a pair whose id is ``-1`` (another rank holds its expert) is sorted into
blocks of expert ``-1`` after the experts' runs; the first kernel skips them and the second
writes their rows as 0, so they add nothing and no weight is read for them.

Quantized experts (``moe_weight.QuantizedExperts``: e4m3 with per-tensor, per-row or block
scales; 4- or 8-bit packed integers with group scales and zero points) run through the same two
kernels: constexpr switches make each weight tile's load dequantize it in registers to the
activations' dtype before the 16-bit product, so the weight is read at its stored size (decode is
bound by that read) and the activations are not quantized (no fp8 product: this works on any GPU
Triton supports and in the interpreter, and at decode sizes the product is not the bottleneck).

Nothing here reads a value back to the host, so a launch fits in a CUDA graph: the number of
blocks is bounded from the shapes, and blocks past the last expert's run exit at once.

Launch tile sizes come from ``moe_configs/*.json`` (written by ``benchmarks/tune_fused_moe.py``),
one file per (experts, intermediate size, dtype, GPU), one entry per batch size; a shape without
a file gets ``default_config``.
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path

import torch
import triton
import triton.language as tl

from sglang_core.kernels.fused import _gelu
from sglang_core.kernels.moe_weight import QuantizedExperts
from sglang_core.kernels.opaque import opaque_to_compiler
from sglang_core.kernels.pdl import launch_options, pdl_enter

CONFIG_DIR = Path(__file__).parent / "moe_configs"
CONFIG_FIELDS = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M", "num_warps", "num_stages")
ACTIVATIONS = ("silu", "gelu", "gelu_tanh")


def align_by_expert(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pairs (flat index ``token * k + choice``) sorted by expert, each expert's run padded to a
    multiple of ``block_m`` with the index ``T * k`` (no pair); and each block's expert, ``-1``
    for the blocks past the last run. Pairs of id ``-1`` (not this rank's) form the last run, its
    blocks' expert ``-1`` too. The sizes depend on the shapes only, not on the routing."""
    flat = topk_ids.reshape(-1)
    pairs = flat.numel()
    # Run ``num_experts`` holds the -1 pairs. Each run that has pairs pads at most block_m - 1 of
    # them, and at most min(pairs, runs) have any.
    runs = num_experts + 1
    run = torch.where(flat < 0, num_experts, flat).long()
    max_blocks = (pairs + min(pairs, runs) * (block_m - 1)) // block_m
    counts = torch.zeros(runs, dtype=torch.int64, device=flat.device)
    counts.scatter_add_(0, run, torch.ones(pairs, dtype=torch.int64, device=flat.device))
    blocks = (counts + block_m - 1) // block_m
    block_ends = torch.cumsum(blocks, 0)
    order = torch.sort(run, stable=True).indices
    run_of_sorted = run[order]
    rank_in_run = torch.arange(pairs, device=flat.device) - (torch.cumsum(counts, 0) - counts)[run_of_sorted]
    slot = (block_ends - blocks)[run_of_sorted] * block_m + rank_in_run
    sorted_pairs = torch.full((max_blocks * block_m,), pairs, dtype=torch.int32, device=flat.device)
    sorted_pairs[slot] = order.to(torch.int32)
    block_expert = torch.searchsorted(block_ends, torch.arange(max_blocks, device=flat.device), right=True)
    block_expert = torch.where(block_expert < num_experts, block_expert, -1).to(torch.int32)
    return sorted_pairs, block_expert


@triton.jit
def _block_tile(SortedPairs, BlockExpert, num_pairs, num_blocks, N,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr, PAIR_PER_BLOCK: tl.constexpr,
                SLOT_ORDER: tl.constexpr):
    """This program's block of sorted pairs and tile of ``N`` columns: its expert (int64, -1 for an
    unused block), pair rows and columns with their masks. Programs walk ``GROUP_M`` blocks down
    before moving to the next tile of columns, so neighbours share weight tiles in L2.
    ``PAIR_PER_BLOCK``: block ``b`` is pair ``b`` alone and ``BlockExpert`` is the flat top-k ids.
    ``SLOT_ORDER``: the tile's columns are numbered in AWQ's slot order (position ``8w + s`` is column
    ``8w + (0, 2, 4, 6, 1, 3, 5, 7)[s]``), as its words unpack."""
    pid = tl.program_id(0)
    tiles_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * tiles_n
    first_block = (pid // per_group) * GROUP_M
    group_blocks = tl.minimum(num_blocks - first_block, GROUP_M)
    block = first_block + (pid % per_group) % group_blocks
    tile_n = (pid % per_group) // group_blocks
    expert = tl.load(BlockExpert + block).to(tl.int64)
    if PAIR_PER_BLOCK:
        rows = tl.where(tl.arange(0, BLOCK_M) == 0, block, num_pairs).to(tl.int64)
    else:
        rows = tl.load(SortedPairs + block * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    position = tl.arange(0, BLOCK_N)
    if SLOT_ORDER:
        position = (position // 8) * 8 + 2 * (position % 4) + (position % 8) // 4
    cols = tile_n * BLOCK_N + position
    return expert, rows, rows < num_pairs, cols, cols < N


@triton.jit
def dot(a, b, acc, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """``acc + a @ b``; with ``UPCAST`` of the operands in float32 (exact for 16-bit values).
    Public: kernels in plugins (the packed-integer matmul) accumulate the same way."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def _slot(j, PACK: tl.constexpr, INTERLEAVED: tl.constexpr):
    """The slot of a word that holds value ``j % PACK`` of its run (AWQ: even values first)."""
    if INTERLEAVED:
        return (j % 2) * (PACK // 2) + (j % PACK) // 2
    return j % PACK


@triton.jit
def _weight_tile(W, S, Z, expert, k0, k_left, cols, col_ok, stride_w, stride_s, stride_z, scale_rows, scale_cols,
                 zero_offset, DTYPE: tl.constexpr, FORMAT: tl.constexpr, BITS: tl.constexpr,
                 PACKED_DIM: tl.constexpr, INTERLEAVED: tl.constexpr, HAS_ZEROS: tl.constexpr,
                 GROUP_PER_TILE: tl.constexpr, BLOCK_K: tl.constexpr):
    """Expert ``expert``'s weight at inputs ``k0 + [0, BLOCK_K)`` (``k_left`` of them left) x outputs
    ``cols`` as a ``[BLOCK_K, BLOCK_N]`` tile of ``DTYPE``: loaded as it is (``FORMAT`` "float"), or
    dequantized in registers from e4m3 or packed integers (``moe_weight.QuantizedExperts`` states the
    layouts; ``stride_*`` are (expert, row, col) strides). Dequantized in float32, rounded to ``DTYPE``
    as the dequantizing path rounds. ``GROUP_PER_TILE``: the tile's inputs share one scale group,
    so one row of scales and zero points serves it."""
    kk = tl.arange(0, BLOCK_K)
    n = cols[None, :]
    k = (k0 + kk)[:, None]
    mask = (kk < k_left)[:, None] & col_ok[None, :]
    base = W + expert * stride_w[0]
    if FORMAT == "float":
        tile = tl.load(base + n * stride_w[1] + k * stride_w[2], mask=mask, other=0.0)
    else:
        group_k = k0 + tl.arange(0, 1)[:, None] if GROUP_PER_TILE else k
        group_mask = col_ok[None, :] if GROUP_PER_TILE else mask
        if FORMAT == "fp8":
            value = tl.load(base + n * stride_w[1] + k * stride_w[2], mask=mask, other=0.0).to(tl.float32)
        else:
            PACK: tl.constexpr = 32 // BITS
            LOW: tl.constexpr = (1 << BITS) - 1
            # Each word loaded once, its PACK values unpacked along a new axis: consecutive inputs,
            # or consecutive outputs in slot order (the order ``cols`` then come in: SLOT_ORDER).
            shifts = tl.arange(0, PACK) * BITS
            if PACKED_DIM == 1:
                word_cols = tl.reshape(cols, (cols.shape[0] // PACK, PACK))
                word_ok = tl.max(tl.reshape(col_ok.to(tl.int32), (cols.shape[0] // PACK, PACK)), axis=1) > 0
                words = tl.load(base + (tl.max(word_cols, axis=1) // PACK)[None, :] * stride_w[1] + k * stride_w[2],
                                mask=(kk < k_left)[:, None] & word_ok[None, :], other=0)
                value = tl.reshape((words[:, :, None] >> shifts[None, None, :]) & LOW, (BLOCK_K, cols.shape[0]))
            else:
                word_k = tl.arange(0, BLOCK_K // PACK)
                words = tl.load(base + n * stride_w[1] + (k0 // PACK + word_k)[:, None] * stride_w[2],
                                mask=(word_k * PACK < k_left)[:, None] & col_ok[None, :], other=0)
                value = tl.reshape((words[:, None, :] >> shifts[None, :, None]) & LOW, (BLOCK_K, cols.shape[0]))
            if HAS_ZEROS:
                zero_word = tl.load(Z + expert * stride_z[0] + (n // PACK) * stride_z[1]
                                    + (group_k // scale_cols) * stride_z[2], mask=group_mask, other=0)
                value -= ((zero_word >> (_slot(n, PACK, INTERLEAVED) * BITS)) & LOW) + zero_offset
            else:
                value -= zero_offset
            value = value.to(tl.float32)
        scale = tl.load(S + expert * stride_s[0] + (n // scale_rows) * stride_s[1]
                        + (group_k // scale_cols) * stride_s[2], mask=group_mask, other=0.0)
        tile = (value * scale.to(tl.float32)).to(DTYPE)
    return tile


@triton.jit
def _gate_up_kernel(X, W13, S13, Z13, SortedPairs, BlockExpert, Act, num_pairs, num_blocks, inter, hidden,
                    stride_xt, stride_at, stride_w, stride_s, stride_z, scale_rows, scale_cols, zero_offset,
                    TOP_K: tl.constexpr, ACTIVATION: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
                    FORMAT: tl.constexpr, BITS: tl.constexpr, PACKED_DIM: tl.constexpr, INTERLEAVED: tl.constexpr,
                    HAS_ZEROS: tl.constexpr, GROUP_PER_TILE: tl.constexpr, BLOCK_M: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, PAIR_PER_BLOCK: tl.constexpr,
                    USE_PDL: tl.constexpr):
    """``Act[pair] = act(x W_gate^T) * (x W_up^T)`` for one block of pairs of one expert, one tile
    of intermediate columns; ``x`` is the pair's token row."""
    pdl_enter(USE_PDL)  # the block's expert comes from the align step, before any weight address
    expert, rows, row_ok, cols, col_ok = _block_tile(SortedPairs, BlockExpert, num_pairs, num_blocks, inter,
                                                     BLOCK_M, BLOCK_N, GROUP_M, PAIR_PER_BLOCK,
                                                     INTERLEAVED and PACKED_DIM == 1)
    if expert < 0:
        return
    kk = tl.arange(0, BLOCK_K)
    x_ptrs = X + (rows // TOP_K)[:, None] * stride_xt + kk[None, :]
    dtype = X.dtype.element_ty
    gate = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    up = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, hidden, BLOCK_K):
        k_ok = kk < hidden - k0
        x = tl.load(x_ptrs + k0, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        # Each expert's up rows follow its gate rows.
        for half in tl.static_range(2):
            w = _weight_tile(W13, S13, Z13, expert, k0, hidden - k0, cols + half * inter, col_ok, stride_w, stride_s,
                             stride_z, scale_rows, scale_cols, zero_offset, dtype, FORMAT, BITS, PACKED_DIM,
                             INTERLEAVED, HAS_ZEROS, GROUP_PER_TILE, BLOCK_K)
            if half == 0:
                gate = dot(x, w, gate, PRECISION, UPCAST)
            else:
                up = dot(x, w, up, PRECISION, UPCAST)
    # Rounded where the unfused path rounds: the projections, then the activation, to x's dtype.
    gate = gate.to(dtype).to(tl.float32)
    up = up.to(dtype).to(tl.float32)
    if ACTIVATION == "silu":
        act = gate / (1.0 + tl.exp(-gate))
    else:
        act = _gelu(gate, ACTIVATION == "gelu_tanh")
    act = act.to(dtype).to(tl.float32)
    tl.store(Act + rows[:, None] * stride_at + cols[None, :], (act * up).to(Act.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _down_kernel(Act, W2, S2, Z2, SortedPairs, BlockExpert, TopkWeights, Out, num_pairs, num_blocks, hidden, inter,
                 stride_at, stride_ot, stride_w, stride_s, stride_z, scale_rows, scale_cols, zero_offset,
                 PRECISION: tl.constexpr, UPCAST: tl.constexpr, FORMAT: tl.constexpr, BITS: tl.constexpr,
                 PACKED_DIM: tl.constexpr, INTERLEAVED: tl.constexpr, HAS_ZEROS: tl.constexpr,
                 GROUP_PER_TILE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 GROUP_M: tl.constexpr, PAIR_PER_BLOCK: tl.constexpr, USE_PDL: tl.constexpr):
    """``Out[pair] = weight[pair] * (Act[pair] W_down^T)`` in float32, one tile of hidden columns;
    0 for a pair of expert -1 (another rank's)."""
    pdl_enter(USE_PDL)
    expert, rows, row_ok, cols, col_ok = _block_tile(SortedPairs, BlockExpert, num_pairs, num_blocks, hidden,
                                                     BLOCK_M, BLOCK_N, GROUP_M, PAIR_PER_BLOCK,
                                                     INTERLEAVED and PACKED_DIM == 1)
    if expert < 0:
        tl.store(Out + rows[:, None] * stride_ot + cols[None, :], tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32),
                 mask=row_ok[:, None] & col_ok[None, :])
        return
    kk = tl.arange(0, BLOCK_K)
    a_ptrs = Act + rows[:, None] * stride_at + kk[None, :]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, inter, BLOCK_K):
        k_ok = kk < inter - k0
        a = tl.load(a_ptrs + k0, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w = _weight_tile(W2, S2, Z2, expert, k0, inter - k0, cols, col_ok, stride_w, stride_s, stride_z, scale_rows,
                         scale_cols, zero_offset, Act.dtype.element_ty, FORMAT, BITS, PACKED_DIM, INTERLEAVED,
                         HAS_ZEROS, GROUP_PER_TILE, BLOCK_K)
        acc = dot(a, w, acc, PRECISION, UPCAST)
    weight = tl.load(TopkWeights + rows, mask=row_ok, other=0.0)
    tl.store(Out + rows[:, None] * stride_ot + cols[None, :], acc * weight[:, None],
             mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _sum_pairs_kernel(Pairs, Addend, Result, hidden, stride_add, TOP_K: tl.constexpr, HAS_ADDEND: tl.constexpr,
                      BLOCK: tl.constexpr, USE_PDL: tl.constexpr):
    """``Result[t] = sum_j Pairs[t * TOP_K + j]`` in float32, rounded once to Result's dtype; plus
    ``Addend[t]`` after that rounding, as a separate add of two tensors of that dtype rounds."""
    pdl_enter(USE_PDL)
    token = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < hidden
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for j in tl.static_range(TOP_K):
        acc += tl.load(Pairs + (token * TOP_K + j) * hidden + cols, mask=ok, other=0.0)
    result = acc.to(Result.dtype.element_ty)
    if HAS_ADDEND:
        addend = tl.load(Addend + token * stride_add + cols, mask=ok, other=0.0)
        result = (result.to(tl.float32) + addend.to(tl.float32)).to(Result.dtype.element_ty)
    tl.store(Result + token * hidden + cols, result, mask=ok)


def default_config(num_tokens: int, top_k: int, num_experts: int) -> dict:
    """Tiles for a shape no tuned file covers: blocks about as tall as an expert's share of the
    pairs (small batches waste little on padding), 64-wide tiles otherwise."""
    per_expert = max(1, num_tokens * top_k // num_experts)
    return dict(BLOCK_M=min(64, max(16, triton.next_power_of_2(per_expert))), BLOCK_N=64, BLOCK_K=64, GROUP_M=8,
                num_warps=4, num_stages=3)


def device_name(device: torch.device) -> str:
    """The GPU's name as config files spell it (``NVIDIA_H100_80GB_HBM3``); ``cpu`` off CUDA."""
    return torch.cuda.get_device_name(device).replace(" ", "_") if device.type == "cuda" else "cpu"


def config_file_name(num_experts: int, intermediate: int, dtype: torch.dtype, device: str) -> str:
    return f"E={num_experts},I={intermediate},dtype={str(dtype).removeprefix('torch.')},device={device}.json"


@functools.lru_cache(maxsize=None)
def load_configs(path: Path) -> dict[int, dict] | None:
    """A tuned file's configs by batch size, each checked to hold every field of ``CONFIG_FIELDS``
    as a positive int, the tile sizes powers of two of at least 16 (``tl.dot``'s least);
    ``None`` without a file."""
    if not path.is_file():
        return None
    table = {}
    for batch, config in json.loads(path.read_text()).items():
        for field in CONFIG_FIELDS:
            value = config.get(field)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{path.name}: batch {batch}: {field} must be a positive int, not {value!r}")
            if field.startswith("BLOCK_") and (value < 16 or value & (value - 1)):
                raise ValueError(f"{path.name}: batch {batch}: {field} must be a power of two >= 16, not {value}")
        table[int(batch)] = {field: config[field] for field in CONFIG_FIELDS}
    return table


def launch_config(num_tokens: int, top_k: int, num_experts: int, intermediate: int, dtype: torch.dtype,
                  device: str, config_dir: Path = CONFIG_DIR) -> dict:
    """The tuned config of the batch size nearest ``num_tokens`` for this shape, dtype and GPU, or
    ``default_config``."""
    table = load_configs(config_dir / config_file_name(num_experts, intermediate, dtype, device))
    if not table:
        return default_config(num_tokens, top_k, num_experts)
    return table[min(table, key=lambda batch: abs(batch - num_tokens))]


def _weight_args(weight: torch.Tensor | QuantizedExperts, block_k: int) -> tuple[tuple, dict]:
    """A stacked weight's kernel arguments: (tensors, strides, scale groups, zero offset) and the
    constexprs that say how to read it with ``block_k``-deep tiles."""
    if isinstance(weight, torch.Tensor):
        weight = weight if weight.stride(2) == 1 else weight.contiguous()
        strides = weight.stride()
        return ((weight, weight, weight, strides, strides, strides, 1, 1, 0),
                dict(FORMAT="float", BITS=16, PACKED_DIM=2, INTERLEAVED=False, HAS_ZEROS=False, GROUP_PER_TILE=True))
    zeros = weight.zeros if weight.zeros is not None else weight.scales
    group = weight.group_cols
    return ((weight.data, weight.scales, zeros, weight.data.stride(), weight.scales.stride(), zeros.stride(),
             weight.scale_rows, group, weight.zero_offset),
            dict(FORMAT=weight.format, BITS=weight.bits, PACKED_DIM=weight.packed_dim,
                 INTERLEAVED=weight.interleaved, HAS_ZEROS=weight.zeros is not None,
                 GROUP_PER_TILE=group % block_k == 0 or group >= weight.shape[2]))


def _check_weights(hidden: torch.Tensor, w13: torch.Tensor | QuantizedExperts,
                   w2: torch.Tensor | QuantizedExperts) -> None:
    num_experts, two_inter, hidden_size = w13.shape
    inter = two_inter // 2
    if hidden_size != hidden.shape[1] or tuple(w2.shape) != (num_experts, hidden.shape[1], inter):
        raise ValueError(f"w13 {tuple(w13.shape)} and w2 {tuple(w2.shape)} do not fit hidden size {hidden.shape[1]}")
    for name, weight in (("w13", w13), ("w2", w2)):
        if isinstance(weight, torch.Tensor) and weight.dtype != hidden.dtype:
            raise ValueError(f"{name} ({weight.dtype}) must have hidden's dtype {hidden.dtype}")
    # A tile of outputs unpacks whole words, so up's rows (after gate's) must start on a word.
    if isinstance(w13, QuantizedExperts) and w13.format == "int" and w13.packed_dim == 1 and inter % (32 // w13.bits):
        raise ValueError(f"w13 packs {32 // w13.bits} outputs to a word: intermediate size {inter} must be a multiple")


@opaque_to_compiler
def fused_moe(hidden: torch.Tensor, w13: torch.Tensor | QuantizedExperts, w2: torch.Tensor | QuantizedExperts,
              topk_weights: torch.Tensor, topk_ids: torch.Tensor, activation: str = "silu",
              config: dict | None = None, addend: torch.Tensor | None = None) -> torch.Tensor:
    """``sum_j topk_weights[t, j] * down_e(act(gate_e(x_t)) * up_e(x_t))`` with ``e = topk_ids[t, j]``.

    hidden [T, H]; w13 [E, 2I, H] (each expert's gate rows, then its up rows); w2 [E, H, I]; either
    may instead be a ``QuantizedExperts`` of that shape, dequantized tile by tile in registers to
    hidden's dtype; topk_weights [T, k] float32; topk_ids [T, k] (ints in [0, E), or -1 for a pair
    another rank computes under expert parallelism, which adds nothing here); activation
    "silu", "gelu" or "gelu_tanh". Result [T, H] in hidden's dtype; sums in float32. ``config``
    overrides the tile sizes (fields ``CONFIG_FIELDS``) that ``launch_config`` would choose.
    ``addend`` [T, H] in hidden's dtype (a shared expert's output) is added to the rounded result
    in the last launch, equal to adding it after the call."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation: must be one of {', '.join(ACTIVATIONS)}, not {activation!r}")
    _check_weights(hidden, w13, w2)
    tokens, hidden_size = hidden.shape
    num_experts, two_inter, _ = w13.shape
    inter = two_inter // 2
    top_k = topk_ids.shape[1]
    if topk_weights.shape != topk_ids.shape or topk_ids.shape[0] != tokens:
        raise ValueError(f"topk_weights {tuple(topk_weights.shape)} and topk_ids {tuple(topk_ids.shape)} "
                         f"must both be [{tokens}, k]")
    if addend is not None and (addend.shape != hidden.shape or addend.dtype != hidden.dtype
                               or addend.stride(1) != 1):
        raise ValueError(f"addend: {tuple(addend.shape)} {addend.dtype} must be hidden's shape and dtype, "
                         "with contiguous rows")
    if tokens == 0:
        return torch.zeros_like(hidden)
    config = dict(config or launch_config(tokens, top_k, num_experts, inter, hidden.dtype,
                                          device_name(hidden.device)))
    block_m, block_n, block_k = config.pop("BLOCK_M"), config.pop("BLOCK_N"), config.pop("BLOCK_K")
    group_m = config.pop("GROUP_M")
    hidden = hidden if hidden.stride(1) == 1 else hidden.contiguous()
    w13_args, w13_format = _weight_args(w13, block_k)
    w2_args, w2_format = _weight_args(w2, block_k)
    pairs = tokens * top_k
    pair_per_block = tokens == 1
    # The kernels index the flat ids and weights as dense vectors; reshape may return a strided view.
    flat_weights = topk_weights.reshape(-1).float().contiguous()
    if pair_per_block:
        # One token's pairs each make a block of their own, its expert read straight from the ids:
        # no sort, two launches instead of the align step's ~18 in a batch-1 decode step. (Its
        # experts are distinct when they come from a top-k, so no weight is read twice.)
        sorted_pairs = block_expert = topk_ids.reshape(-1).contiguous()
    else:
        sorted_pairs, block_expert = align_by_expert(topk_ids, num_experts, block_m)
    num_blocks = block_expert.numel()
    tiles = dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=group_m, PAIR_PER_BLOCK=pair_per_block,
                 **config,
                 # float32 products exactly (no TF32), as the float32 PyTorch path computes them.
                 PRECISION="ieee" if hidden.dtype == torch.float32 else "tf32",
                 # Triton's interpreter multiplies bfloat16 tiles as their raw 16-bit integers.
                 UPCAST=hidden.dtype == torch.bfloat16
                 and os.environ.get("TRITON_INTERPRET", "").lower() in ("1", "true", "on"),
                 **launch_options(hidden))
    act = torch.empty(pairs, inter, dtype=hidden.dtype, device=hidden.device)
    (w, s, z), w13_rest = w13_args[:3], w13_args[3:]
    _gate_up_kernel[(num_blocks * triton.cdiv(inter, block_n),)](
        hidden, w, s, z, sorted_pairs, block_expert, act, pairs, num_blocks, inter, hidden_size,
        hidden.stride(0), act.stride(0), *w13_rest, TOP_K=top_k, ACTIVATION=activation, **w13_format, **tiles)
    out = torch.empty(pairs, hidden_size, dtype=torch.float32, device=hidden.device)
    (w, s, z), w2_rest = w2_args[:3], w2_args[3:]
    _down_kernel[(num_blocks * triton.cdiv(hidden_size, block_n),)](
        act, w, s, z, sorted_pairs, block_expert, flat_weights, out, pairs, num_blocks,
        hidden_size, inter, act.stride(0), out.stride(0), *w2_rest, **w2_format, **tiles)
    # Each token's k rows summed and rounded in one launch (a sum and a cast would be two).
    result = torch.empty(tokens, hidden_size, dtype=hidden.dtype, device=hidden.device)
    sum_block = 1024
    _sum_pairs_kernel[(tokens, triton.cdiv(hidden_size, sum_block))](
        out, result if addend is None else addend, result, hidden_size,
        hidden_size if addend is None else addend.stride(0), TOP_K=top_k, HAS_ADDEND=addend is not None,
        BLOCK=sum_block, **launch_options(hidden))
    return result

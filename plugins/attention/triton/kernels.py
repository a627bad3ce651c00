"""Triton attention kernels over the token-granular KV pool.

Both kernels find a request's keys through its row of ``req_to_token`` (slot of every cached
token, in order), so a request's KV may sit anywhere in the pool: no paging, no copies.

- ``decode_attention``: one query token per request, split-KV ("flash decoding"). Stage one
  gives each (request, KV head, split) a slice of the keys and all the query heads sharing that
  KV head, so a KV row is read once for the whole GQA group; stage two merges the splits by
  their log-sum-exp. The slice size is computed in the kernel from ``seq_lens``, so the launch
  depends only on the batch size: a CUDA graph replays it for any lengths.
- ``extend_attention``: the new tokens of each request over its cached prefix and themselves
  (causal), flash-attention style, tiles of queries against tiles of keys.

Both support a sliding window (``window`` > 0: a query at position p sees keys > p - window;
a compile-time constant, so models without one pay nothing for it).
They run on CPU under ``TRITON_INTERPRET=1``, which is how CI tests them. The decode kernels
take part in the core's programmatic dependent launch (``sglang_core.kernels.pdl``) on Hopper.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from sglang_core.kernels.pdl import launch_options, pdl_enter


@triton.jit
def _attend_keys(q, K, V, ReqToToken, table_row, start, end, kv_head, scale,
                 stride_kt, stride_kh, stride_vt, stride_vh, stride_r2t,
                 ROWS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
                 PRECISION: tl.constexpr):
    """Softmax attention of the query rows ``q`` ([ROWS, BLOCK_D], one KV head's) over keys
    ``[start, end)`` of request-table row ``table_row``, online over key blocks. Returns the
    output rows and their log-sum-exp; with no keys (an empty split) lse is -inf, which the
    merge ignores. K/V may be stored narrower than q (an FP8 pool): converted on load."""
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < HEAD_DIM
    m_i = tl.full([ROWS], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([ROWS], dtype=tl.float32)
    acc = tl.zeros([ROWS, BLOCK_D], dtype=tl.float32)
    for n0 in range(start, end, BLOCK_N):
        keys = n0 + tl.arange(0, BLOCK_N)
        key_ok = keys < end
        slots = tl.load(ReqToToken + table_row * stride_r2t + keys, mask=key_ok, other=0)
        k = tl.load(K + slots[:, None] * stride_kt + kv_head * stride_kh + dims[None, :],
                    mask=key_ok[:, None] & dim_ok[None, :], other=0.0).to(q.dtype)
        qk = tl.dot(q, tl.trans(k), input_precision=PRECISION).to(tl.float32) * scale
        qk = tl.where(key_ok[None, :], qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        p = tl.exp(qk - m_new[:, None])
        alpha = tl.exp(m_i - m_new)
        v = tl.load(V + slots[:, None] * stride_vt + kv_head * stride_vh + dims[None, :],
                    mask=key_ok[:, None] & dim_ok[None, :], other=0.0).to(q.dtype)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION).to(tl.float32)
        l_i = l_i * alpha + tl.sum(p, 1)
        m_i = m_new
    has_keys = l_i > 0
    out = acc / tl.where(has_keys, l_i, 1.0)[:, None]
    lse = tl.where(has_keys, m_i + tl.log(tl.where(has_keys, l_i, 1.0)), float("-inf"))
    return out, lse


@triton.jit
def _decode_split_kernel(
    Q, K, V, ReqToToken, ReqPoolIdx, SeqLens, KvStart, MidO, MidLse,
    scale,
    stride_qb, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_r2t,
    stride_mob, stride_moh, stride_mos, stride_mlb, stride_mlh,
    WINDOW: tl.constexpr, GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr, NUM_SPLITS: tl.constexpr, PREFIX_SPLITS: tl.constexpr, PRECISION: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    pdl_enter(USE_PDL)
    b = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(SeqLens + b)
    row = tl.load(ReqPoolIdx + b)
    first = 0
    if WINDOW > 0:  # a constexpr: resolved at compile time
        first = tl.maximum(seq_len - WINDOW, 0)
    if PREFIX_SPLITS > 0:  # cascade: keys before KvStart are the shared prefix's, done per group
        first = tl.load(KvStart + b)
        if split == 0 and first == 0:  # in no group: its shared-prefix partials are empty
            slots_p = tl.arange(0, PREFIX_SPLITS)
            heads_p = kv_head * GROUP + tl.arange(0, GROUP_PAD)
            tl.store(MidLse + b * stride_mlb + heads_p[:, None] * stride_mlh + NUM_SPLITS + slots_p[None, :],
                     tl.full([GROUP_PAD, PREFIX_SPLITS], float("-inf"), tl.float32),
                     mask=(tl.arange(0, GROUP_PAD) < GROUP)[:, None])
    span = seq_len - first
    per_split = tl.cdiv(tl.cdiv(span, NUM_SPLITS), BLOCK_N) * BLOCK_N
    start = first + split * per_split
    end = tl.minimum(start + per_split, seq_len)

    heads = kv_head * GROUP + tl.arange(0, GROUP_PAD)
    head_ok = tl.arange(0, GROUP_PAD) < GROUP
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < HEAD_DIM
    q = tl.load(Q + b * stride_qb + heads[:, None] * stride_qh + dims[None, :],
                mask=head_ok[:, None] & dim_ok[None, :], other=0.0)

    out, lse = _attend_keys(q, K, V, ReqToToken, row, start, end, kv_head, scale,
                            stride_kt, stride_kh, stride_vt, stride_vh, stride_r2t,
                            GROUP_PAD, HEAD_DIM, BLOCK_D, BLOCK_N, PRECISION)
    tl.store(MidO + b * stride_mob + heads[:, None] * stride_moh + split * stride_mos + dims[None, :], out,
             mask=head_ok[:, None] & dim_ok[None, :])
    tl.store(MidLse + b * stride_mlb + heads * stride_mlh + split, lse, mask=head_ok)


@triton.jit
def _shared_prefix_kernel(
    Q, K, V, ReqToToken, ReqPoolIdx, GroupLens, GroupMembers, MidO, MidLse,
    scale,
    stride_qb, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_r2t,
    stride_mob, stride_moh, stride_mos, stride_mlb, stride_mlh,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, MEMBERS: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT_BASE: tl.constexpr, PREFIX_SPLITS: tl.constexpr,
    PRECISION: tl.constexpr,
):
    g = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    shared = tl.load(GroupLens + g)
    if shared == 0:  # an unused group slot (the grid is fixed for CUDA graphs)
        return
    # Rows are (member, query head of this KV head): one tile of queries reads each key once.
    rows = tl.arange(0, MEMBERS * GROUP_PAD)
    member = tl.load(GroupMembers + g * MEMBERS + rows // GROUP_PAD)
    q_head = rows % GROUP_PAD
    row_ok = (member >= 0) & (q_head < GROUP)
    b = tl.where(row_ok, member, 0)
    heads = kv_head * GROUP + q_head
    table_row = tl.load(ReqPoolIdx + tl.load(GroupMembers + g * MEMBERS))  # any member: same slots
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < HEAD_DIM
    q = tl.load(Q + b[:, None] * stride_qb + heads[:, None] * stride_qh + dims[None, :],
                mask=row_ok[:, None] & dim_ok[None, :], other=0.0)
    per_split = tl.cdiv(tl.cdiv(shared, PREFIX_SPLITS), BLOCK_N) * BLOCK_N
    start = split * per_split
    end = tl.minimum(start + per_split, shared)
    out, lse = _attend_keys(q, K, V, ReqToToken, table_row, start, end, kv_head, scale,
                            stride_kt, stride_kh, stride_vt, stride_vh, stride_r2t,
                            MEMBERS * GROUP_PAD, HEAD_DIM, BLOCK_D, BLOCK_N, PRECISION)
    slot = SPLIT_BASE + split
    tl.store(MidO + b[:, None] * stride_mob + heads[:, None] * stride_moh + slot * stride_mos + dims[None, :], out,
             mask=row_ok[:, None] & dim_ok[None, :])
    tl.store(MidLse + b * stride_mlb + heads * stride_mlh + slot, lse, mask=row_ok)


@triton.jit
def _decode_merge_kernel(
    MidO, MidLse, Out,
    stride_mob, stride_moh, stride_mos, stride_mlb, stride_mlh, stride_ob, stride_oh,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, NUM_SPLITS: tl.constexpr, SPLITS_PAD: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    pdl_enter(USE_PDL)
    b = tl.program_id(0)
    head = tl.program_id(1)
    splits = tl.arange(0, SPLITS_PAD)
    split_ok = splits < NUM_SPLITS
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < HEAD_DIM
    lse = tl.load(MidLse + b * stride_mlb + head * stride_mlh + splits, mask=split_ok, other=float("-inf"))
    top = tl.max(lse, 0)
    weights = tl.exp(lse - top)  # empty splits: exp(-inf) = 0
    parts = tl.load(MidO + b * stride_mob + head * stride_moh + splits[:, None] * stride_mos + dims[None, :],
                    mask=split_ok[:, None] & dim_ok[None, :], other=0.0)
    # A split with no keys may never have had its partial written (cascade: a request's empty
    # shared-prefix slots): weight 0 must not meet garbage, since NaN * 0 is NaN.
    out = tl.sum(tl.where(weights[:, None] > 0, parts * weights[:, None], 0.0), 0) / tl.sum(weights, 0)
    tl.store(Out + b * stride_ob + head * stride_oh + dims, out.to(Out.dtype.element_ty), mask=dim_ok)


@triton.jit
def _extend_kernel(
    Q, K, V, Out, ReqToToken, ReqPoolIdx, SeqLens, PrefixLens, ExtendStart,
    scale,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh, stride_r2t,
    WINDOW: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr,
):
    b = tl.program_id(0)
    head = tl.program_id(1)
    m_block = tl.program_id(2)
    seq_len = tl.load(SeqLens + b)
    prefix = tl.load(PrefixLens + b)
    extend_len = seq_len - prefix
    if m_block * BLOCK_M >= extend_len:
        return
    row = tl.load(ReqPoolIdx + b)
    first_token = tl.load(ExtendStart + b)
    kv_head = head // GROUP

    offs_m = m_block * BLOCK_M + tl.arange(0, BLOCK_M)
    q_ok = offs_m < extend_len
    q_pos = prefix + offs_m
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < HEAD_DIM
    q = tl.load(Q + (first_token + offs_m)[:, None] * stride_qt + head * stride_qh + dims[None, :],
                mask=q_ok[:, None] & dim_ok[None, :], other=0.0)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    last_pos = tl.minimum(prefix + (m_block + 1) * BLOCK_M, seq_len)  # causal: no key past the last query
    start = 0
    if WINDOW > 0:
        start = tl.maximum(prefix + m_block * BLOCK_M - WINDOW + 1, 0) // BLOCK_N * BLOCK_N
    for n0 in range(start, last_pos, BLOCK_N):
        keys = n0 + tl.arange(0, BLOCK_N)
        key_ok = keys < last_pos
        slots = tl.load(ReqToToken + row * stride_r2t + keys, mask=key_ok, other=0)
        k = tl.load(K + slots[:, None] * stride_kt + kv_head * stride_kh + dims[None, :],
                    mask=key_ok[:, None] & dim_ok[None, :], other=0.0).to(q.dtype)
        qk = tl.dot(q, tl.trans(k), input_precision=PRECISION).to(tl.float32) * scale
        visible = key_ok[None, :] & (keys[None, :] <= q_pos[:, None])
        if WINDOW > 0:
            visible &= keys[None, :] > q_pos[:, None] - WINDOW
        qk = tl.where(visible, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        # A row that has seen no visible key yet keeps m = -inf; exp(-inf - -inf) would be NaN.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp(qk - m_safe[:, None])
        alpha = tl.exp(m_i - m_safe)
        v = tl.load(V + slots[:, None] * stride_vt + kv_head * stride_vh + dims[None, :],
                    mask=key_ok[:, None] & dim_ok[None, :], other=0.0).to(q.dtype)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION).to(tl.float32)
        l_i = l_i * alpha + tl.sum(p, 1)
        m_i = m_new

    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(Out + (first_token + offs_m)[:, None] * stride_ot + head * stride_oh + dims[None, :],
             out.to(Out.dtype.element_ty), mask=q_ok[:, None] & dim_ok[None, :])


# Launch settings, picked on an H100 with benchmarks/tune_triton_attention.py.
DECODE_LAUNCH = {"BLOCK_N": 128, "num_warps": 4, "num_stages": 2}
# Cascade decode: members per group tile (a bigger group takes several tiles) and key splits of a
# shared prefix. Not tuned yet.
SHARED_MEMBERS = 16
SHARED_SPLITS = 4
SHARED_LAUNCH = {"BLOCK_N": 64, "num_warps": 4, "num_stages": 2}
EXTEND_LAUNCH = {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 2}


def _precision(q: torch.Tensor) -> str:
    """float32 inputs get full-precision dots (TF32 would drift from the reference); others as is."""
    return "ieee" if q.dtype == torch.float32 else "tf32"


@dataclass
class SharedPrefixes:
    """Cascade decode's groups, in fixed device buffers (CUDA graphs keep their addresses):
    ``kv_start[b]`` is where request b's own keys begin (0: in no group); group g holds the
    batch rows ``members[g]`` (-1 pads) sharing their first ``lens[g]`` KV slots (0: unused)."""

    kv_start: torch.Tensor  # [max batch] int32
    lens: torch.Tensor  # [groups] int32
    members: torch.Tensor  # [groups, SHARED_MEMBERS] int32


def decode_attention(q: torch.Tensor, k_buffer: torch.Tensor, v_buffer: torch.Tensor, out: torch.Tensor,
                     req_to_token: torch.Tensor, req_pool_indices: torch.Tensor, seq_lens: torch.Tensor,
                     scale: float, window: int, num_splits: int, mid_o: torch.Tensor,
                     mid_lse: torch.Tensor, shared: SharedPrefixes | None = None) -> None:
    """q/out: [B, heads, head_dim]; k/v_buffer: [slots, kv_heads, head_dim];
    mid_o: [>=B, heads, splits, head_dim] float32, mid_lse: [>=B, heads, splits] float32, with
    splits = num_splits, plus SHARED_SPLITS with ``shared`` (cascade: each group's shared prefix is
    read once for all its members by one kernel, the rest per request, then all merged)."""
    batch, heads, head_dim = q.shape
    kv_heads = k_buffer.shape[1]
    group = heads // kv_heads
    group_pad = max(16, triton.next_power_of_2(group))
    block_d = max(16, triton.next_power_of_2(head_dim))  # tl.dot needs >= 16
    prefix_splits = SHARED_SPLITS if shared is not None else 0
    strides = (q.stride(0), q.stride(1), k_buffer.stride(0), k_buffer.stride(1), v_buffer.stride(0),
               v_buffer.stride(1), req_to_token.stride(0),
               mid_o.stride(0), mid_o.stride(1), mid_o.stride(2), mid_lse.stride(0), mid_lse.stride(1))
    _decode_split_kernel[(batch, kv_heads, num_splits)](
        q, k_buffer, v_buffer, req_to_token, req_pool_indices, seq_lens,
        shared.kv_start if shared is not None else seq_lens, mid_o, mid_lse, scale, *strides,
        WINDOW=window, GROUP=group, GROUP_PAD=group_pad, HEAD_DIM=head_dim, BLOCK_D=block_d,
        NUM_SPLITS=num_splits, PREFIX_SPLITS=prefix_splits, PRECISION=_precision(q), **DECODE_LAUNCH,
        **launch_options(q),
    )
    if shared is not None:
        _shared_prefix_kernel[(shared.lens.shape[0], kv_heads, prefix_splits)](
            q, k_buffer, v_buffer, req_to_token, req_pool_indices, shared.lens, shared.members, mid_o, mid_lse,
            scale, *strides,
            GROUP=group, GROUP_PAD=triton.next_power_of_2(group), MEMBERS=SHARED_MEMBERS, HEAD_DIM=head_dim,
            BLOCK_D=block_d, SPLIT_BASE=num_splits, PREFIX_SPLITS=prefix_splits, PRECISION=_precision(q),
            **SHARED_LAUNCH,
        )
    splits = num_splits + prefix_splits
    _decode_merge_kernel[(batch, heads)](
        mid_o, mid_lse, out,
        mid_o.stride(0), mid_o.stride(1), mid_o.stride(2), mid_lse.stride(0), mid_lse.stride(1),
        out.stride(0), out.stride(1),
        HEAD_DIM=head_dim, BLOCK_D=block_d, NUM_SPLITS=splits, SPLITS_PAD=max(2, triton.next_power_of_2(splits)),
        num_warps=2, **launch_options(q),
    )


def extend_attention(q: torch.Tensor, k_buffer: torch.Tensor, v_buffer: torch.Tensor, out: torch.Tensor,
                     req_to_token: torch.Tensor, req_pool_indices: torch.Tensor, seq_lens: torch.Tensor,
                     prefix_lens: torch.Tensor, extend_start: torch.Tensor, max_extend_len: int,
                     scale: float, window: int) -> None:
    """q/out: [T, heads, head_dim] new tokens of all requests, request b's from ``extend_start[b]``.
    The new tokens' K/V must already be in the pool."""
    heads, head_dim = q.shape[1], q.shape[2]
    group = heads // k_buffer.shape[1]
    launch = dict(EXTEND_LAUNCH)
    if max_extend_len <= 32:  # short extends: small query tiles waste less
        launch["BLOCK_M"] = 16
    grid = (seq_lens.shape[0], heads, triton.cdiv(max_extend_len, launch["BLOCK_M"]))
    _extend_kernel[grid](
        q, k_buffer, v_buffer, out, req_to_token, req_pool_indices, seq_lens, prefix_lens, extend_start,
        scale,
        q.stride(0), q.stride(1), k_buffer.stride(0), k_buffer.stride(1), v_buffer.stride(0), v_buffer.stride(1),
        out.stride(0), out.stride(1), req_to_token.stride(0),
        WINDOW=window, GROUP=group, HEAD_DIM=head_dim, BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
        PRECISION=_precision(q), **launch,
    )

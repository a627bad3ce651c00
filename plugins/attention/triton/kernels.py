"""Triton attention kernels over the token-granular KV pool.

Both kernels find a request's keys through its row of ``req_to_token`` (slot of every cached
token, in order), so a request's KV may sit anywhere in the pool: no paging, no copies.

- ``decode_attention``: one query token per request, split-KV ("flash decoding"). Stage one
  gives each (request, KV head, split) a slice of the keys and the query heads sharing that
  KV head, so a KV row is read once for the whole GQA group; stage two merges the splits by
  their log-sum-exp. The slice size is computed in the kernel from ``seq_lens``, so the launch
  depends only on the batch size: a CUDA graph replays it for any lengths. Optionally (cascade)
  a third kernel reads a prefix shared by several requests once for all of them.
- ``extend_attention``: the new tokens of each request over its cached prefix and themselves
  (causal), flash-attention style, tiles of queries against tiles of keys. Its launch too depends
  only on shapes and a bound on the new tokens, so the decode graphs capture it for the prefill
  chunks of an extend step replayed as decode rows (``ForwardBatch.row_chunks``), the decode
  kernel skipping those rows.

What both support:

- a sliding window (``window`` > 0: a query at position p sees keys > p - window);
- logit soft-capping (``logit_cap`` > 0, as Gemma 2: the scaled logits q.k * scale become
  cap * tanh(logits / cap) before masking and softmax);
- any softmax ``scale``;
- keys wider than values: q and K have ``Dk`` values per head, V and the output ``Dv`` (read from
  the V buffer), e.g. DeepSeek's MLA with Dk 192 / Dv 128, or Dk 576 / Dv 512 over latents, where V
  is the first 512 values of each stored latent: ``v_buffer = k_buffer[..., :512]``. Every tensor
  is addressed through its own strides (the last dimension's too), so V may be such a view;
- head sizes that are not powers of two: padded (masked) to the next power of two, except a key
  width just above one (80, 96, 192, 576), which is split into that power of two and a small tail,
  two dots instead of one half spent on padding;
- K/V stored narrower than q (an FP8 pool): converted on load.

Window and soft-cap are compile-time constants, so models without them pay nothing. Head sizes
up to 128 launch exactly as tuned; wider heads get smaller tiles (see ``_scaled_to_width``).
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
def _tile(Ptr, row_offsets, row_ok, stride_d, FIRST: tl.constexpr, BLOCK: tl.constexpr, WIDTH: tl.constexpr):
    """Pointers to columns [FIRST, FIRST + BLOCK) of the rows at ``Ptr + row_offsets``, and the mask
    of those that exist (row ok, column below WIDTH)."""
    cols = FIRST + tl.arange(0, BLOCK)
    return Ptr + row_offsets[:, None] + cols[None, :] * stride_d, row_ok[:, None] & (cols < WIDTH)[None, :]


@triton.jit
def _load_q(Q, row_offsets, row_ok, stride_qd,
            HEAD_DIM_K: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_DK_TAIL: tl.constexpr):
    """Query rows as the key width's power-of-two part and its tail (the tail is q again when
    there is none, unused)."""
    ptrs, mask = _tile(Q, row_offsets, row_ok, stride_qd, 0, BLOCK_DK, HEAD_DIM_K)
    q = tl.load(ptrs, mask=mask, other=0.0)
    q_tail = q
    if BLOCK_DK_TAIL > 0:
        ptrs, mask = _tile(Q, row_offsets, row_ok, stride_qd, BLOCK_DK, BLOCK_DK_TAIL, HEAD_DIM_K)
        q_tail = tl.load(ptrs, mask=mask, other=0.0)
    return q, q_tail


@triton.jit
def _soft_cap(x, cap):
    """cap * tanh(x / cap), tanh written with one exp of a non-positive argument: no overflow at
    any |x|, and +-cap in the limit."""
    e = tl.exp(-2.0 * tl.abs(x) / cap)
    t = (1.0 - e) / (1.0 + e)
    return cap * tl.where(x < 0, -t, t)


@triton.jit
def _logits(q, q_tail, K, k_rows, key_ok, scale, logit_cap, stride_kd,
            HEAD_DIM_K: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_DK_TAIL: tl.constexpr,
            SOFT_CAP: tl.constexpr, PRECISION: tl.constexpr):
    """q.k * scale of the query rows against the keys at ``K + k_rows`` ([rows, keys], float32),
    soft-capped with SOFT_CAP. K may be stored narrower than q: converted on load."""
    ptrs, mask = _tile(K, k_rows, key_ok, stride_kd, 0, BLOCK_DK, HEAD_DIM_K)
    k = tl.load(ptrs, mask=mask, other=0.0).to(q.dtype)
    qk = tl.dot(q, tl.trans(k), input_precision=PRECISION).to(tl.float32)
    if BLOCK_DK_TAIL > 0:
        ptrs, mask = _tile(K, k_rows, key_ok, stride_kd, BLOCK_DK, BLOCK_DK_TAIL, HEAD_DIM_K)
        k_tail = tl.load(ptrs, mask=mask, other=0.0).to(q.dtype)
        qk = tl.dot(q_tail, tl.trans(k_tail), acc=qk, input_precision=PRECISION)
    qk = qk * scale
    if SOFT_CAP:
        qk = _soft_cap(qk, logit_cap)
    return qk


@triton.jit
def _attend_keys(q, q_tail, K, V, ReqToToken, table_row, start, end, kv_head, scale, logit_cap,
                 stride_kt, stride_kh, stride_kd, stride_vt, stride_vh, stride_vd, stride_r2t, stride_r2n,
                 ROWS: tl.constexpr, HEAD_DIM_K: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_DK_TAIL: tl.constexpr,
                 HEAD_DIM_V: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_N: tl.constexpr,
                 SOFT_CAP: tl.constexpr, PRECISION: tl.constexpr):
    """Softmax attention of the query rows ``q`` (with ``q_tail``, as ``_load_q`` gives them; one
    KV head's) over keys ``[start, end)`` of request-table row ``table_row``, online over key blocks.
    Returns the output rows ([ROWS, BLOCK_DV]) and their log-sum-exp; with no keys (an empty split)
    lse is -inf, which the merge ignores."""
    m_i = tl.full([ROWS], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([ROWS], dtype=tl.float32)
    acc = tl.zeros([ROWS, BLOCK_DV], dtype=tl.float32)
    for n0 in range(start, end, BLOCK_N):
        keys = n0 + tl.arange(0, BLOCK_N)
        key_ok = keys < end
        slots = tl.load(ReqToToken + table_row * stride_r2t + keys * stride_r2n, mask=key_ok, other=0)
        qk = _logits(q, q_tail, K, slots * stride_kt + kv_head * stride_kh, key_ok, scale, logit_cap, stride_kd,
                     HEAD_DIM_K, BLOCK_DK, BLOCK_DK_TAIL, SOFT_CAP, PRECISION)
        qk = tl.where(key_ok[None, :], qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        p = tl.exp(qk - m_new[:, None])
        alpha = tl.exp(m_i - m_new)
        ptrs, mask = _tile(V, slots * stride_vt + kv_head * stride_vh, key_ok, stride_vd, 0, BLOCK_DV, HEAD_DIM_V)
        v = tl.load(ptrs, mask=mask, other=0.0).to(q.dtype)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION).to(tl.float32)
        l_i = l_i * alpha + tl.sum(p, 1)
        m_i = m_new
    has_keys = l_i > 0
    out = acc / tl.where(has_keys, l_i, 1.0)[:, None]
    lse = tl.where(has_keys, m_i + tl.log(tl.where(has_keys, l_i, 1.0)), float("-inf"))
    return out, lse


@triton.jit
def _decode_split_kernel(
    Q, K, V, ReqToToken, ReqPoolIdx, SeqLens, KvStart, SkipRows, MidO, MidLse, Out,
    scale, logit_cap,
    stride_qb, stride_qh, stride_qd, stride_kt, stride_kh, stride_kd, stride_vt, stride_vh, stride_vd,
    stride_r2t, stride_r2n, stride_mob, stride_moh, stride_mos, stride_mod, stride_mlb, stride_mlh, stride_mls,
    stride_ob, stride_oh, stride_od,
    WINDOW: tl.constexpr, GROUP: tl.constexpr, HEAD_PAD: tl.constexpr, HEAD_TILES: tl.constexpr,
    HEAD_DIM_K: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_DK_TAIL: tl.constexpr,
    HEAD_DIM_V: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_N: tl.constexpr, NUM_SPLITS: tl.constexpr, PREFIX_SPLITS: tl.constexpr, SOFT_CAP: tl.constexpr,
    SKIP_ROWS: tl.constexpr, PRECISION: tl.constexpr, USE_PDL: tl.constexpr,
):
    """One split's partial output and log-sum-exp of each query head, for the merge; with one split
    and no cascade (``NUM_SPLITS == 1``, ``PREFIX_SPLITS == 0``) the partial is the output, written
    to ``Out`` in its dtype (what the merge of one split gives: weight 1), and no merge follows."""
    pdl_enter(USE_PDL)
    b = tl.program_id(0)
    if SKIP_ROWS:  # a row another kernel attends (a prefill chunk's, ``row_chunks``)
        if tl.load(SkipRows + b) != 0:
            return
    kv_head = tl.program_id(1) // HEAD_TILES  # a KV head's query heads, HEAD_PAD per program
    tile = tl.program_id(1) % HEAD_TILES
    split = tl.program_id(2)
    local = tile * HEAD_PAD + tl.arange(0, HEAD_PAD)
    head_ok = local < GROUP
    heads = kv_head * GROUP + local
    seq_len = tl.load(SeqLens + b)
    row = tl.load(ReqPoolIdx + b)
    first = 0
    if WINDOW > 0:  # a constexpr: resolved at compile time
        first = tl.maximum(seq_len - WINDOW, 0)
    if PREFIX_SPLITS > 0:  # cascade: keys before KvStart are the shared prefix's, done per group
        first = tl.load(KvStart + b)
        if split == 0 and first == 0:  # in no group: its shared-prefix partials are empty
            slots_p = NUM_SPLITS + tl.arange(0, PREFIX_SPLITS)
            tl.store(MidLse + b * stride_mlb + heads[:, None] * stride_mlh + slots_p[None, :] * stride_mls,
                     tl.full([HEAD_PAD, PREFIX_SPLITS], float("-inf"), tl.float32), mask=head_ok[:, None])
    span = seq_len - first
    per_split = tl.cdiv(tl.cdiv(span, NUM_SPLITS), BLOCK_N) * BLOCK_N
    start = first + split * per_split
    end = tl.minimum(start + per_split, seq_len)

    q, q_tail = _load_q(Q, b * stride_qb + heads * stride_qh, head_ok, stride_qd, HEAD_DIM_K, BLOCK_DK, BLOCK_DK_TAIL)
    out, lse = _attend_keys(q, q_tail, K, V, ReqToToken, row, start, end, kv_head, scale, logit_cap,
                            stride_kt, stride_kh, stride_kd, stride_vt, stride_vh, stride_vd, stride_r2t, stride_r2n,
                            HEAD_PAD, HEAD_DIM_K, BLOCK_DK, BLOCK_DK_TAIL, HEAD_DIM_V, BLOCK_DV, BLOCK_N,
                            SOFT_CAP, PRECISION)
    if NUM_SPLITS == 1 and PREFIX_SPLITS == 0:
        ptrs, mask = _tile(Out, b * stride_ob + heads * stride_oh, head_ok, stride_od, 0, BLOCK_DV, HEAD_DIM_V)
        tl.store(ptrs, out.to(Out.dtype.element_ty), mask=mask)
    else:
        ptrs, mask = _tile(MidO, b * stride_mob + heads * stride_moh + split * stride_mos, head_ok, stride_mod,
                           0, BLOCK_DV, HEAD_DIM_V)
        tl.store(ptrs, out, mask=mask)
        tl.store(MidLse + b * stride_mlb + heads * stride_mlh + split * stride_mls, lse, mask=head_ok)


@triton.jit
def _shared_prefix_kernel(
    Q, K, V, ReqToToken, ReqPoolIdx, GroupLens, GroupMembers, MidO, MidLse,
    scale, logit_cap,
    stride_qb, stride_qh, stride_qd, stride_kt, stride_kh, stride_kd, stride_vt, stride_vh, stride_vd,
    stride_r2t, stride_r2n, stride_mob, stride_moh, stride_mos, stride_mod, stride_mlb, stride_mlh, stride_mls,
    GROUP: tl.constexpr, HEAD_PAD: tl.constexpr, HEAD_TILES: tl.constexpr, MEMBERS: tl.constexpr,
    HEAD_DIM_K: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_DK_TAIL: tl.constexpr,
    HEAD_DIM_V: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_N: tl.constexpr,
    SPLIT_BASE: tl.constexpr, PREFIX_SPLITS: tl.constexpr, SOFT_CAP: tl.constexpr, PRECISION: tl.constexpr,
):
    g = tl.program_id(0)
    kv_head = tl.program_id(1) // HEAD_TILES
    tile = tl.program_id(1) % HEAD_TILES
    split = tl.program_id(2)
    shared = tl.load(GroupLens + g)
    if shared == 0:  # an unused group slot (the grid is fixed for CUDA graphs)
        return
    # Rows are (member, query head of this KV head): one tile of queries reads each key once.
    rows = tl.arange(0, MEMBERS * HEAD_PAD)
    member = tl.load(GroupMembers + g * MEMBERS + rows // HEAD_PAD)
    local = tile * HEAD_PAD + rows % HEAD_PAD
    row_ok = (member >= 0) & (local < GROUP)
    b = tl.where(row_ok, member, 0)
    heads = kv_head * GROUP + local
    table_row = tl.load(ReqPoolIdx + tl.load(GroupMembers + g * MEMBERS))  # any member: same slots
    q, q_tail = _load_q(Q, b * stride_qb + heads * stride_qh, row_ok, stride_qd, HEAD_DIM_K, BLOCK_DK, BLOCK_DK_TAIL)
    per_split = tl.cdiv(tl.cdiv(shared, PREFIX_SPLITS), BLOCK_N) * BLOCK_N
    start = split * per_split
    end = tl.minimum(start + per_split, shared)
    out, lse = _attend_keys(q, q_tail, K, V, ReqToToken, table_row, start, end, kv_head, scale, logit_cap,
                            stride_kt, stride_kh, stride_kd, stride_vt, stride_vh, stride_vd, stride_r2t, stride_r2n,
                            MEMBERS * HEAD_PAD, HEAD_DIM_K, BLOCK_DK, BLOCK_DK_TAIL, HEAD_DIM_V, BLOCK_DV, BLOCK_N,
                            SOFT_CAP, PRECISION)
    slot = SPLIT_BASE + split
    ptrs, mask = _tile(MidO, b * stride_mob + heads * stride_moh + slot * stride_mos, row_ok, stride_mod,
                       0, BLOCK_DV, HEAD_DIM_V)
    tl.store(ptrs, out, mask=mask)
    tl.store(MidLse + b * stride_mlb + heads * stride_mlh + slot * stride_mls, lse, mask=row_ok)


@triton.jit
def _decode_merge_kernel(
    MidO, MidLse, Out, SkipRows,
    stride_mob, stride_moh, stride_mos, stride_mod, stride_mlb, stride_mlh, stride_mls,
    stride_ob, stride_oh, stride_od,
    HEAD_DIM_V: tl.constexpr, BLOCK_DV: tl.constexpr, NUM_SPLITS: tl.constexpr, SPLITS_PAD: tl.constexpr,
    SKIP_ROWS: tl.constexpr, USE_PDL: tl.constexpr,
):
    pdl_enter(USE_PDL)
    b = tl.program_id(0)
    if SKIP_ROWS:
        if tl.load(SkipRows + b) != 0:
            return
    head = tl.program_id(1)
    splits = tl.arange(0, SPLITS_PAD)
    split_ok = splits < NUM_SPLITS
    lse = tl.load(MidLse + b * stride_mlb + head * stride_mlh + splits * stride_mls, mask=split_ok,
                  other=float("-inf"))
    top = tl.max(lse, 0)
    weights = tl.exp(lse - top)  # empty splits: exp(-inf) = 0
    ptrs, mask = _tile(MidO, b * stride_mob + head * stride_moh + splits * stride_mos, split_ok, stride_mod,
                       0, BLOCK_DV, HEAD_DIM_V)
    parts = tl.load(ptrs, mask=mask, other=0.0)
    # A split with no keys may never have had its partial written (cascade: a request's empty
    # shared-prefix slots): weight 0 must not meet garbage, since NaN * 0 is NaN.
    out = tl.sum(tl.where(weights[:, None] > 0, parts * weights[:, None], 0.0), 0) / tl.sum(weights, 0)
    dims = tl.arange(0, BLOCK_DV)
    tl.store(Out + b * stride_ob + head * stride_oh + dims * stride_od, out.to(Out.dtype.element_ty),
             mask=dims < HEAD_DIM_V)


@triton.jit
def _extend_kernel(
    Q, K, V, Out, ReqToToken, ReqPoolIdx, SeqLens, PrefixLens, ExtendStart,
    scale, logit_cap,
    stride_qt, stride_qh, stride_qd, stride_kt, stride_kh, stride_kd, stride_vt, stride_vh, stride_vd,
    stride_ot, stride_oh, stride_od, stride_r2t, stride_r2n,
    WINDOW: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM_K: tl.constexpr, BLOCK_DK: tl.constexpr,
    BLOCK_DK_TAIL: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SOFT_CAP: tl.constexpr, PRECISION: tl.constexpr,
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
    q, q_tail = _load_q(Q, (first_token + offs_m) * stride_qt + head * stride_qh, q_ok, stride_qd,
                        HEAD_DIM_K, BLOCK_DK, BLOCK_DK_TAIL)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    last_pos = tl.minimum(prefix + (m_block + 1) * BLOCK_M, seq_len)  # causal: no key past the last query
    start = 0
    if WINDOW > 0:
        start = tl.maximum(prefix + m_block * BLOCK_M - WINDOW + 1, 0) // BLOCK_N * BLOCK_N
    for n0 in range(start, last_pos, BLOCK_N):
        keys = n0 + tl.arange(0, BLOCK_N)
        key_ok = keys < last_pos
        slots = tl.load(ReqToToken + row * stride_r2t + keys * stride_r2n, mask=key_ok, other=0)
        qk = _logits(q, q_tail, K, slots * stride_kt + kv_head * stride_kh, key_ok, scale, logit_cap, stride_kd,
                     HEAD_DIM_K, BLOCK_DK, BLOCK_DK_TAIL, SOFT_CAP, PRECISION)
        visible = key_ok[None, :] & (keys[None, :] <= q_pos[:, None])
        if WINDOW > 0:
            visible &= keys[None, :] > q_pos[:, None] - WINDOW
        qk = tl.where(visible, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        # A row that has seen no visible key yet keeps m = -inf; exp(-inf - -inf) would be NaN.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp(qk - m_safe[:, None])
        alpha = tl.exp(m_i - m_safe)
        ptrs, mask = _tile(V, slots * stride_vt + kv_head * stride_vh, key_ok, stride_vd, 0, BLOCK_DV, HEAD_DIM_V)
        v = tl.load(ptrs, mask=mask, other=0.0).to(q.dtype)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION).to(tl.float32)
        l_i = l_i * alpha + tl.sum(p, 1)
        m_i = m_new

    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    ptrs, mask = _tile(Out, (first_token + offs_m) * stride_ot + head * stride_oh, q_ok, stride_od,
                       0, BLOCK_DV, HEAD_DIM_V)
    tl.store(ptrs, out.to(Out.dtype.element_ty), mask=mask)


# Launch settings, picked on an H100 with benchmarks/tune_triton_attention.py (head size 128).
DECODE_LAUNCH = {"BLOCK_N": 128, "num_warps": 4, "num_stages": 2}
# Cascade decode: members per group tile (a bigger group takes several tiles) and key splits of a
# shared prefix. Not tuned yet.
SHARED_MEMBERS = 16
SHARED_SPLITS = 4
SHARED_LAUNCH = {"BLOCK_N": 64, "num_warps": 4, "num_stages": 2}
EXTEND_LAUNCH = {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 2}
# The tuned settings hold for K and V blocks together this wide (head size 128): a key block of a
# wider head is narrowed in proportion, so that one pipeline stage's K and V tiles take no more
# shared memory than at 128 (Dk 576 / Dv 512: 16 keys a block, about 34 KiB a stage in bf16).
TUNED_KV_WIDTH = 256
# Float32 accumulator elements ([query rows, BLOCK_DV]) a program of 4 warps keeps in registers:
# 64 a thread, as the tuned extend tile (64 x 128). Wider values take fewer query rows a program
# (Dv 512: 16), so the accumulator does not spill.
ACC_ELEMENTS = 8192
# The cascade kernel's tile, 16 members x the query heads of a KV head, is allowed twice as many:
# Llama-3's 8 heads a KV head (128 rows x 128) fit as they did.
SHARED_ACC_ELEMENTS = 2 * ACC_ELEMENTS


def _precision(q: torch.Tensor) -> str:
    """float32 inputs get full-precision dots (TF32 would drift from the reference); others as is."""
    return "ieee" if q.dtype == torch.float32 else "tf32"


def _floor_power_of_2(n: int) -> int:
    return 1 << (n.bit_length() - 1)


def _key_blocks(head_dim_k: int) -> tuple[int, int]:
    """(BLOCK_DK, BLOCK_DK_TAIL): a key width just above a power of two (80, 96, 192, 576) takes
    that power of two plus a small tail block; any other is padded to the next power of two
    (tail 0). tl.dot needs blocks of 16 or more."""
    padded = max(16, triton.next_power_of_2(head_dim_k))
    main = _floor_power_of_2(head_dim_k)
    tail = max(16, triton.next_power_of_2(head_dim_k - main))
    if main >= 16 and main < head_dim_k and main + tail < padded:
        return main, tail
    return padded, 0


def _head_dims(q: torch.Tensor, k_buffer: torch.Tensor, v_buffer: torch.Tensor, out: torch.Tensor) -> dict:
    """The width constants of a launch: keys as wide as q, values as wide as the output."""
    head_dim_k, head_dim_v = q.shape[-1], v_buffer.shape[-1]
    if k_buffer.shape[-1] != head_dim_k:
        raise ValueError(f"k_buffer: head size {k_buffer.shape[-1]} is not q's {head_dim_k}")
    if out.shape[-1] != head_dim_v:
        raise ValueError(f"out: head size {out.shape[-1]} is not v_buffer's {head_dim_v}")
    block_dk, block_dk_tail = _key_blocks(head_dim_k)
    return dict(HEAD_DIM_K=head_dim_k, BLOCK_DK=block_dk, BLOCK_DK_TAIL=block_dk_tail,
                HEAD_DIM_V=head_dim_v, BLOCK_DV=max(16, triton.next_power_of_2(head_dim_v)))


def _scaled_to_width(block: int, dims: dict) -> int:
    """A tuned key block, narrowed (by powers of two, to 16 at least) for K and V wider than tuned."""
    width = dims["BLOCK_DK"] + dims["BLOCK_DK_TAIL"] + dims["BLOCK_DV"]
    return max(16, min(block, _floor_power_of_2(block * TUNED_KV_WIDTH // width)))


def _head_tiles(group: int, rows_per_head: int, dims: dict, budget: int) -> tuple[int, int]:
    """(HEAD_PAD, HEAD_TILES): the query heads a program takes (a power of two, at least enough for
    the 16 rows tl.dot needs) and the programs a KV head takes: one for the whole group, unless its
    accumulator (``rows_per_head`` rows a head) would pass ``budget`` elements."""
    fitting = _floor_power_of_2(max(1, budget // (rows_per_head * dims["BLOCK_DV"])))
    head_pad = max(min(triton.next_power_of_2(group), fitting), triton.cdiv(16, rows_per_head))
    return head_pad, triton.cdiv(group, head_pad)


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
                     mid_lse: torch.Tensor, shared: SharedPrefixes | None = None, logit_cap: float = 0.0,
                     skip_rows: torch.Tensor | None = None) -> None:
    """q: [B, heads, Dk]; k_buffer: [slots, kv_heads, Dk]; v_buffer: [slots, kv_heads, Dv] (may be a
    view of k_buffer); out: [B, heads, Dv]; mid_o: [>=B, heads, splits, Dv] float32, mid_lse:
    [>=B, heads, splits] float32, with splits = num_splits, plus SHARED_SPLITS with ``shared``
    (cascade: each group's shared prefix is read once for all its members by one kernel, the rest
    per request, then all merged). ``logit_cap`` > 0 soft-caps the scaled logits. ``skip_rows``
    ([B], nonzero: skip): rows whose output another kernel writes, left untouched (their
    programs exit at once). One split without cascade is one launch: no merge."""
    batch, heads = q.shape[0], q.shape[1]
    kv_heads = k_buffer.shape[1]
    group = heads // kv_heads
    dims = _head_dims(q, k_buffer, v_buffer, out)
    if mid_o.shape[-1] != dims["HEAD_DIM_V"]:
        raise ValueError(f"mid_o: head size {mid_o.shape[-1]} is not v_buffer's {dims['HEAD_DIM_V']}")
    prefix_splits = SHARED_SPLITS if shared is not None else 0
    common = dict(SOFT_CAP=logit_cap > 0, PRECISION=_precision(q), **dims)
    strides = (*q.stride(), *k_buffer.stride(), *v_buffer.stride(), *req_to_token.stride(),
               *mid_o.stride(), *mid_lse.stride())
    head_pad, head_tiles = _head_tiles(group, 1, dims, ACC_ELEMENTS)
    launch = dict(DECODE_LAUNCH, BLOCK_N=_scaled_to_width(DECODE_LAUNCH["BLOCK_N"], dims))
    skips = skip_rows if skip_rows is not None else seq_lens  # not read without SKIP_ROWS
    _decode_split_kernel[(batch, kv_heads * head_tiles, num_splits)](
        q, k_buffer, v_buffer, req_to_token, req_pool_indices, seq_lens,
        shared.kv_start if shared is not None else seq_lens, skips, mid_o, mid_lse, out, scale, logit_cap, *strides,
        *out.stride(), WINDOW=window, GROUP=group, HEAD_PAD=head_pad, HEAD_TILES=head_tiles,
        NUM_SPLITS=num_splits, PREFIX_SPLITS=prefix_splits, SKIP_ROWS=skip_rows is not None, **common, **launch,
        **launch_options(q),
    )
    if shared is not None:
        head_pad, head_tiles = _head_tiles(group, SHARED_MEMBERS, dims, SHARED_ACC_ELEMENTS)
        launch = dict(SHARED_LAUNCH, BLOCK_N=_scaled_to_width(SHARED_LAUNCH["BLOCK_N"], dims))
        _shared_prefix_kernel[(shared.lens.shape[0], kv_heads * head_tiles, prefix_splits)](
            q, k_buffer, v_buffer, req_to_token, req_pool_indices, shared.lens, shared.members, mid_o, mid_lse,
            scale, logit_cap, *strides,
            GROUP=group, HEAD_PAD=head_pad, HEAD_TILES=head_tiles, MEMBERS=SHARED_MEMBERS,
            SPLIT_BASE=num_splits, PREFIX_SPLITS=prefix_splits, **common, **launch,
        )
    splits = num_splits + prefix_splits
    if splits == 1:  # the split kernel wrote the output
        return
    _decode_merge_kernel[(batch, heads)](
        mid_o, mid_lse, out, skips, *mid_o.stride(), *mid_lse.stride(), *out.stride(),
        HEAD_DIM_V=dims["HEAD_DIM_V"], BLOCK_DV=dims["BLOCK_DV"], NUM_SPLITS=splits,
        SPLITS_PAD=max(2, triton.next_power_of_2(splits)), SKIP_ROWS=skip_rows is not None,
        num_warps=max(2, dims["BLOCK_DV"] // 64), **launch_options(q),  # 2 warps up to Dv 128, as tuned
    )


def extend_attention(q: torch.Tensor, k_buffer: torch.Tensor, v_buffer: torch.Tensor, out: torch.Tensor,
                     req_to_token: torch.Tensor, req_pool_indices: torch.Tensor, seq_lens: torch.Tensor,
                     prefix_lens: torch.Tensor, extend_start: torch.Tensor, max_extend_len: int,
                     scale: float, window: int, logit_cap: float = 0.0) -> None:
    """q: [T, heads, Dk] and out: [T, heads, Dv], the new tokens of all requests, request b's from
    ``extend_start[b]``; k_buffer: [slots, kv_heads, Dk]; v_buffer: [slots, kv_heads, Dv] (may be a
    view of k_buffer). The new tokens' K/V must already be in the pool. ``logit_cap`` > 0
    soft-caps the scaled logits. The launch depends only on the shapes and ``max_extend_len`` (a
    bound on any request's new tokens): blocks past a request's new tokens exit at once, and a
    request whose seq_len is its prefix_len does nothing, so a CUDA graph captured with a bound
    replays for any lengths and requests within it (``row_chunks``)."""
    heads = q.shape[1]
    group = heads // k_buffer.shape[1]
    dims = _head_dims(q, k_buffer, v_buffer, out)
    launch = dict(EXTEND_LAUNCH)
    launch["BLOCK_M"] = min(launch["BLOCK_M"], max(16, ACC_ELEMENTS // dims["BLOCK_DV"]))
    if max_extend_len <= 32:  # short extends: small query tiles waste less
        launch["BLOCK_M"] = 16
    launch["BLOCK_N"] = _scaled_to_width(launch["BLOCK_N"], dims)
    grid = (seq_lens.shape[0], heads, triton.cdiv(max_extend_len, launch["BLOCK_M"]))
    _extend_kernel[grid](
        q, k_buffer, v_buffer, out, req_to_token, req_pool_indices, seq_lens, prefix_lens, extend_start,
        scale, logit_cap,
        *q.stride(), *k_buffer.stride(), *v_buffer.stride(), *out.stride(), *req_to_token.stride(),
        WINDOW=window, GROUP=group, SOFT_CAP=logit_cap > 0, PRECISION=_precision(q), **dims, **launch,
    )

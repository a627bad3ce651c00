"""One launch for MLA's absorbed decode query and both rotary parts (CUDA; the layer's PyTorch
path is the reference): per head ``W_UK^T q_nope`` into the query's first ``kv_lora_rank`` values,
the rotated ``q_pe`` into its last ``qk_rope_head_dim``, and ``k_pe`` rotated in place (the
cached row's). It replaces the rotary launch and the ``bmm`` (cuBLAS) that ran one after the other.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sglang_core.kernels.fused import _rotate_heads
from sglang_core.kernels.opaque import opaque_to_compiler
from sglang_core.kernels.pdl import launch_options, pdl_enter

# Latent columns a program computes for one head (its share of W_UK: NOPE x BLOCK_R values).
BLOCK_R = 64


@triton.jit
def _absorbed_query_kernel(QNope, WUK, Query, QPe, KPe, Positions, Cos, Sin,
                           stride_nt, stride_nh, stride_wh, stride_wd, stride_qt, stride_qh,
                           stride_pt, stride_ph, stride_kt, stride_kh, stride_c, heads, rank,
                           NOPE: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr, TILES: tl.constexpr,
                           HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr,
                           INTERLEAVED: tl.constexpr, USE_PDL: tl.constexpr):
    """Programs (token, i): i < heads * TILES a head's BLOCK_R latent columns of the query; the
    last two the rotary of every q_pe head (into the query's tail) and of k_pe (in place)."""
    pdl_enter(USE_PDL)
    token = tl.program_id(0)
    i = tl.program_id(1)
    if i >= heads * TILES:
        pos = tl.load(Positions + token)
        if i == heads * TILES:
            _rotate_heads(QPe, Query + rank, token, pos, Cos, Sin, stride_pt, stride_ph, stride_qt, stride_qh,
                          stride_c, heads, HALF, BLOCK_H, BLOCK_HALF, INTERLEAVED)
        else:
            _rotate_heads(KPe, KPe, token, pos, Cos, Sin, stride_kt, stride_kh, stride_kt, stride_kh, stride_c, 1,
                          HALF, BLOCK_H, BLOCK_HALF, INTERLEAVED)
    else:
        head = i // TILES
        dims = tl.arange(0, BLOCK_D)
        cols = (i % TILES) * BLOCK_R + tl.arange(0, BLOCK_R)
        dims_ok, cols_ok = dims < NOPE, cols < rank
        q = tl.load(QNope + token * stride_nt + head * stride_nh + dims, mask=dims_ok, other=0.0).to(tl.float32)
        w = tl.load(WUK + head * stride_wh + dims[:, None] * stride_wd + cols[None, :],
                    mask=dims_ok[:, None] & cols_ok[None, :], other=0.0).to(tl.float32)
        out = tl.sum(q[:, None] * w, 0)  # float32 sums, rounded once, as the bmm
        tl.store(Query + token * stride_qt + head * stride_qh + cols, out.to(Query.dtype.element_ty), mask=cols_ok)


@opaque_to_compiler
def absorbed_query(q_nope: torch.Tensor, w_uk: torch.Tensor, q_pe: torch.Tensor, k_pe: torch.Tensor,
                   query: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                   interleaved: bool) -> None:
    """``query[t, h, :rank] = q_nope[t, h] @ w_uk[h]`` and ``query[t, h, rank:]`` = q_pe[t, h]
    rotated; ``k_pe`` rotated in place. q_nope [T, heads, nope], w_uk [heads, nope, rank], q_pe
    [T, heads, rope], k_pe [T, 1, rope], query [T, heads, rank + rope]: rows at any stride, last
    dimensions contiguous. ``cos``/``sin``: the rotary's tables [max_position, >= rope // 2]."""
    tokens, heads, nope = q_nope.shape
    rank, rope = w_uk.shape[2], q_pe.shape[2]
    if w_uk.shape[:2] != (heads, nope) or query.shape != (tokens, heads, rank + rope) or k_pe.shape != (tokens, 1, rope):
        raise ValueError(f"absorbed_query: w_uk {tuple(w_uk.shape)}, query {tuple(query.shape)} and k_pe "
                         f"{tuple(k_pe.shape)} do not fit q_nope {tuple(q_nope.shape)} and q_pe {tuple(q_pe.shape)}")
    if any(t.stride(-1) != 1 for t in (q_nope, w_uk, q_pe, k_pe, query)):
        raise ValueError("absorbed_query: every last dimension must be contiguous")
    if tokens == 0:
        return
    tiles = triton.cdiv(rank, BLOCK_R)
    half = rope // 2
    _absorbed_query_kernel[(tokens, heads * tiles + 2)](
        q_nope, w_uk, query, q_pe, k_pe, positions, cos, sin, q_nope.stride(0), q_nope.stride(1), w_uk.stride(0),
        w_uk.stride(1), query.stride(0), query.stride(1), q_pe.stride(0), q_pe.stride(1), k_pe.stride(0),
        k_pe.stride(1), cos.stride(0), heads, rank, NOPE=nope, BLOCK_D=triton.next_power_of_2(nope), BLOCK_R=BLOCK_R,
        TILES=tiles, HALF=half, BLOCK_H=triton.next_power_of_2(heads), BLOCK_HALF=triton.next_power_of_2(half),
        INTERLEAVED=interleaved, num_warps=4, **launch_options(q_nope))

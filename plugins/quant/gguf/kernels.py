"""``y = x @ dequantize(W)^T`` on CUDA reading a GGUF layer's ggml blocks directly (layouts: ``blocks.py``).

The kernels see a stored row as *lanes* of quant bytes: a Q4_0 / Q4_1 / Q8_0 block is one lane of
16 bytes, a Q4_K / Q5_K / Q6_K super-block four lanes of 32. Each lane byte yields two values, a
"low" and a "high" one (the two nibbles; Q8_0: byte ``j`` and byte ``16 + j``), at columns the
decoder names, so the quants are read once, contiguously, and decoded in registers; the scales
of a lane are a few loads that every byte of it shares. Two kernels use the same decoders:

- ``_gemv_kernel`` for a few rows of ``x`` (decode): each program streams whole blocks of
  ``BLOCK_N`` weight rows along K and multiplies them by ``x`` gathered at the decoded columns;
  the weight is read once for all rows of ``x``.
- ``_dequantize_kernel`` for more rows (prefill): the blocks become an ``x.dtype`` weight that
  cuBLAS multiplies; reading the blocks is small beside a matmul of many rows.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from gguf import GGMLQuantizationType as T

from sglang_core.kernels.opaque import opaque_to_compiler

GEMV_MAX_ROWS = 8  # beyond this many rows of x, dequantize + cuBLAS
VALUES_PER_STEP = 512  # values of each weight row a program decodes per loop step
GEMV_BLOCK_N = 4
DEQUANTIZE_BLOCK_N = 16

_Q4_0: tl.constexpr = tl.constexpr(int(T.Q4_0))
_Q4_1: tl.constexpr = tl.constexpr(int(T.Q4_1))
_Q8_0: tl.constexpr = tl.constexpr(int(T.Q8_0))
_Q4_K: tl.constexpr = tl.constexpr(int(T.Q4_K))
_Q5_K: tl.constexpr = tl.constexpr(int(T.Q5_K))
_Q6_K: tl.constexpr = tl.constexpr(int(T.Q6_K))

# ggml type -> (quant bytes per lane, values per lane)
LANES: dict[int, tuple[int, int]] = {T.Q4_0: (16, 32), T.Q4_1: (16, 32), T.Q8_0: (16, 32),
                                     T.Q4_K: (32, 64), T.Q5_K: (32, 64), T.Q6_K: (32, 64)}


@triton.jit
def _f16(H, byte_offset, mask):
    """The f16 at an even byte offset of the blocks (``H`` is the same memory as halves), as float32."""
    return tl.load(H + byte_offset // 2, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _byte(Q, byte_offset, mask):
    return tl.load(Q + byte_offset, mask=mask, other=0).to(tl.int32)


@triton.jit
def _int8(Q, byte_offset, mask):
    return tl.load(Q + byte_offset, mask=mask, other=0).to(tl.int8, bitcast=True).to(tl.float32)


@triton.jit
def _k_scale_min(Q, base, group, mask):
    """The 6-bit scale and min of 32-value group ``group`` (0-7) of a Q4_K/Q5_K super-block at ``base``:
    groups 0-3 in the low 6 bits of bytes 4-7 / 8-11, groups 4-7 split between the low / high
    nibble of bytes 12-15 and the top 2 bits of bytes 4-7 / 8-11."""
    low = _byte(Q, base + 4 + group % 4, mask)
    mid = _byte(Q, base + 8 + group % 4, mask)
    high = _byte(Q, base + 12 + group % 4, mask)
    first = group < 4
    scale = tl.where(first, low & 63, (high & 15) | ((low >> 6) << 4))
    minimum = tl.where(first, mid & 63, (high >> 4) | ((mid >> 6) << 4))
    return scale.to(tl.float32), minimum.to(tl.float32)


@triton.jit
def _decode(Q, H, row, lane, byte, mask, TYPE: tl.constexpr):
    """Lanes ``lane`` (``[1, L, 1]``) of the rows starting at byte ``row`` (``[N, 1, 1]``), bytes
    ``byte`` (``[1, 1, B]``) of each: ``(low values, their columns, high values, their columns)``,
    the values ``[N, L, B]`` float32 (0 where ``mask`` is off), the columns ``[1, L, B]``."""
    quant_mask = mask & (byte >= 0)
    if TYPE == _Q8_0:  # 34 bytes: d, 32 int8
        base = row + lane * 34
        d = _f16(H, base, mask)
        low = d * _int8(Q, base + 2 + byte, quant_mask)
        high = d * _int8(Q, base + 18 + byte, quant_mask)
        low_col = lane * 32 + byte
        high_col = low_col + 16
    elif TYPE == _Q4_0 or TYPE == _Q4_1:  # 18 bytes: d, 16 of nibbles / 20 bytes: d, m, 16 of nibbles
        if TYPE == _Q4_0:
            base = row + lane * 18
            offset = -8.0 * _f16(H, base, mask)
            quants = _byte(Q, base + 2 + byte, quant_mask)
        else:
            base = row + lane * 20
            offset = _f16(H, base + 2, mask)
            quants = _byte(Q, base + 4 + byte, quant_mask)
        d = _f16(H, base, mask)
        low = d * (quants & 15).to(tl.float32) + offset
        high = d * (quants >> 4).to(tl.float32) + offset
        low_col = lane * 32 + byte
        high_col = low_col + 16
    elif TYPE == _Q4_K or TYPE == _Q5_K:  # lane c of a super-block: groups 2c (low nibbles), 2c + 1 (high)
        chunk = lane % 4
        if TYPE == _Q4_K:
            base = row + lane // 4 * 144
            quants = _byte(Q, base + 16 + chunk * 32 + byte, quant_mask)
            low_q = quants & 15
            high_q = quants >> 4
        else:
            base = row + lane // 4 * 176
            quants = _byte(Q, base + 48 + chunk * 32 + byte, quant_mask)
            fifth = _byte(Q, base + 16 + byte, quant_mask)  # bit g: the fifth bit of group g's value
            low_q = (quants & 15) | (((fifth >> (2 * chunk)) & 1) << 4)
            high_q = (quants >> 4) | (((fifth >> (2 * chunk + 1)) & 1) << 4)
        d = _f16(H, base, mask)
        dmin = _f16(H, base + 2, mask)
        low_scale, low_min = _k_scale_min(Q, base, 2 * chunk, mask)
        high_scale, high_min = _k_scale_min(Q, base, 2 * chunk + 1, mask)
        low = d * low_scale * low_q.to(tl.float32) - dmin * low_min
        high = d * high_scale * high_q.to(tl.float32) - dmin * high_min
        low_col = lane // 4 * 256 + chunk * 64 + byte
        high_col = low_col + 32
    else:
        tl.static_assert(TYPE == _Q6_K, "no decoder for this ggml type")
        # Lane 2h + s of a super-block: byte l of ql[64h + 32s:] holds values 128h + 32s + l (low
        # nibble) and 128h + 32(s + 2) + l (high); bit pairs s and s + 2 of qh[32h + l] are their top bits.
        half = lane % 4 // 2
        sub = lane % 2
        base = row + lane // 4 * 210
        low_bits = _byte(Q, base + half * 64 + sub * 32 + byte, quant_mask)
        top_bits = _byte(Q, base + 128 + half * 32 + byte, quant_mask)
        low_q = (low_bits & 15) | (((top_bits >> (2 * sub)) & 3) << 4)
        high_q = (low_bits >> 4) | (((top_bits >> (2 * sub + 4)) & 3) << 4)
        low_index = half * 128 + sub * 32 + byte  # within the super-block: one int8 scale per 16 values
        d = _f16(H, base + 208, mask)
        low = d * _int8(Q, base + 192 + low_index // 16, quant_mask) * (low_q - 32).to(tl.float32)
        high = d * _int8(Q, base + 192 + (low_index + 64) // 16, quant_mask) * (high_q - 32).to(tl.float32)
        low_col = lane // 4 * 256 + low_index
        high_col = low_col + 64
    return low, low_col, high, high_col


@triton.jit
def _gemv_kernel(X, Q, H, Y, N, row_bytes, lanes_per_row, stride_xm, stride_ym,
                 M: tl.constexpr, M_POW2: tl.constexpr, TYPE: tl.constexpr, BLOCK_N: tl.constexpr,
                 LANES: tl.constexpr, LANE_BYTES: tl.constexpr):
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row = (n.to(tl.int64) * row_bytes)[:, None, None]
    n_ok = (n < N)[:, None, None]
    byte = tl.arange(0, LANE_BYTES)[None, None, :]
    m_index = tl.arange(0, M_POW2)[:, None]
    acc = tl.zeros([M_POW2, BLOCK_N], dtype=tl.float32)
    for first in range(0, lanes_per_row, LANES):
        lane = first + tl.arange(0, LANES)[None, :, None]
        lane_ok = lane < lanes_per_row
        low, low_col, high, high_col = _decode(Q, H, row, lane, byte, n_ok & lane_ok, TYPE)
        x_mask = lane_ok & (byte >= 0)
        for m in tl.static_range(M):  # the decoded weight serves every row of x
            x_low = tl.load(X + m * stride_xm + low_col, mask=x_mask, other=0.0).to(tl.float32)
            x_high = tl.load(X + m * stride_xm + high_col, mask=x_mask, other=0.0).to(tl.float32)
            partial = tl.sum(tl.sum(low * x_low + high * x_high, axis=2), axis=1)
            acc = tl.where(m_index == m, acc + partial[None, :], acc)
    y_ptrs = Y + m_index * stride_ym + n[None, :]
    tl.store(y_ptrs, acc.to(Y.dtype.element_ty), mask=(m_index < M) & (n < N)[None, :])


@triton.jit
def _dequantize_kernel(Q, H, W, N, K, row_bytes, lanes_per_row,
                       TYPE: tl.constexpr, BLOCK_N: tl.constexpr, LANES: tl.constexpr, LANE_BYTES: tl.constexpr):
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    lane = tl.program_id(1) * LANES + tl.arange(0, LANES)[None, :, None]
    byte = tl.arange(0, LANE_BYTES)[None, None, :]
    mask = (n < N)[:, None, None] & (lane < lanes_per_row)
    low, low_col, high, high_col = _decode(Q, H, (n.to(tl.int64) * row_bytes)[:, None, None], lane, byte, mask, TYPE)
    out = W + n.to(tl.int64)[:, None, None] * K
    store_mask = mask & (byte >= 0)
    tl.store(out + low_col, low.to(W.dtype.element_ty), mask=store_mask)
    tl.store(out + high_col, high.to(W.dtype.element_ty), mask=store_mask)


def _launch_shape(ggml_type: int, blocks: torch.Tensor, features: int) -> tuple[int, int, int, torch.Tensor]:
    """(lane bytes, lanes per row, lanes per loop step, the blocks as halves) for ``_decode``."""
    lane_bytes, lane_values = LANES[ggml_type]
    # Every block, row and part is an even number of bytes from a 16-byte-aligned start.
    halves = blocks.reshape(-1).view(torch.float16)
    return lane_bytes, features // lane_values, VALUES_PER_STEP // lane_values, halves


@opaque_to_compiler
def dequantize(blocks: torch.Tensor, ggml_type: int, features: int, dtype: torch.dtype) -> torch.Tensor:
    """``[rows, row_bytes]`` uint8 blocks of ``ggml_type`` -> ``[rows, features]`` of ``dtype``."""
    rows = blocks.shape[0]
    lane_bytes, lanes_per_row, lanes, halves = _launch_shape(ggml_type, blocks, features)
    weight = torch.empty(rows, features, dtype=dtype, device=blocks.device)
    grid = (triton.cdiv(rows, DEQUANTIZE_BLOCK_N), triton.cdiv(lanes_per_row, lanes))
    _dequantize_kernel[grid](blocks, halves, weight, rows, features, blocks.shape[1], lanes_per_row, TYPE=ggml_type,
                             BLOCK_N=DEQUANTIZE_BLOCK_N, LANES=lanes, LANE_BYTES=lane_bytes)
    return weight


@opaque_to_compiler
def gemv(x: torch.Tensor, blocks: torch.Tensor, ggml_type: int) -> torch.Tensor:
    """``x @ dequantize(blocks)^T`` for ``x`` of at most ``GEMV_MAX_ROWS`` rows ``[M, K]``."""
    rows, (m, features) = blocks.shape[0], x.shape
    lane_bytes, lanes_per_row, lanes, halves = _launch_shape(ggml_type, blocks, features)
    y = torch.empty(m, rows, dtype=x.dtype, device=x.device)
    _gemv_kernel[(triton.cdiv(rows, GEMV_BLOCK_N),)](
        x, blocks, halves, y, rows, blocks.shape[1], lanes_per_row, x.stride(0), y.stride(0),
        M=m, M_POW2=triton.next_power_of_2(m), TYPE=ggml_type, BLOCK_N=GEMV_BLOCK_N, LANES=lanes,
        LANE_BYTES=lane_bytes)
    return y


def matmul(x: torch.Tensor, blocks: torch.Tensor, ggml_type: int) -> torch.Tensor:
    """``x @ dequantize(blocks)^T`` for ``x`` ``[M, K]`` (K contiguous) and ``[rows, row_bytes]``
    blocks of a type in ``LANES``: the GEMV for a few rows, dequantize + cuBLAS beyond."""
    if x.shape[0] <= GEMV_MAX_ROWS:
        return gemv(x, blocks, ggml_type)
    return F.linear(x, dequantize(blocks, ggml_type, x.shape[1], x.dtype))

"""Fused Triton kernels for the per-token work between matmuls: RMSNorm and LayerNorm (with the
residual add), SiLU- and GELU-and-mul, rotary embedding (both layouts) and the KV-cache write.
Each replaces several small PyTorch kernels with one launch, which is most of what a decode step
at small batch spends outside the matmuls.

Each matches the PyTorch path of its layer (``sglang_core/layers``) in rounding: float32
inside, rounded to the input dtype where the PyTorch code rounds. The layers call these on CUDA
tensors when Triton is installed; tests run them on CPU with ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sglang_core.kernels.opaque import opaque_to_compiler
from sglang_core.kernels.pdl import launch_options, pdl_enter
from sglang_core.kernels.rows_out import RowsOut


@triton.jit
def _rms_scaled(xf, Weight, cols, ok, hidden, eps, dtype, SCALE_IN_FP32: tl.constexpr):
    """``weight * (x / rms(x))`` in float32, rounded as the PyTorch path rounds: the normalised row
    to ``dtype`` first, then the product; ``SCALE_IN_FP32``: the product of the float32 row (the
    caller rounds it once)."""
    rstd = 1.0 / tl.sqrt(tl.sum(xf * xf, 0) / hidden + eps)
    normed = xf * rstd
    if not SCALE_IN_FP32:
        normed = normed.to(dtype).to(tl.float32)
    return normed * tl.load(Weight + cols, mask=ok, other=0.0).to(tl.float32)


@triton.jit
def _norm_input(X, Residual, PreWeight, stride_x, stride_r, hidden, pre_eps, HAS_RESIDUAL: tl.constexpr,
                HAS_PRE: tl.constexpr, BLOCK: tl.constexpr, USE_PDL: tl.constexpr, SCALE_IN_FP32: tl.constexpr):
    """A norm kernel's start: its row, columns and input, ``x`` or with a residual
    ``residual += x`` (stored) and that sum. ``HAS_PRE``: ``x`` is first RMS-normalised with
    ``PreWeight`` (a sublayer's output norm before the residual add, as Gemma 2's)."""
    pdl_enter(USE_PDL)
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    ok = cols < hidden
    x = tl.load(X + row * stride_x + cols, mask=ok, other=0.0)
    if HAS_PRE:
        x = _rms_scaled(x.to(tl.float32), PreWeight, cols, ok, hidden, pre_eps, X.dtype.element_ty,
                        SCALE_IN_FP32).to(X.dtype.element_ty)
    if HAS_RESIDUAL:
        residual = tl.load(Residual + row * stride_r + cols, mask=ok, other=0.0)
        x = (x.to(tl.float32) + residual.to(tl.float32)).to(X.dtype.element_ty)  # as torch rounds x + r
        tl.store(Residual + row * stride_r + cols, x, mask=ok)
    return row, cols, ok, x


@triton.jit
def _rms_norm_kernel(X, Residual, PreWeight, Weight, Out, RowsOut, Rows, Tail, stride_x, stride_r, stride_o,
                     stride_ro, stride_t, hidden, tail_width, pre_eps, eps, HAS_RESIDUAL: tl.constexpr,
                     HAS_PRE: tl.constexpr, SCALE_IN_FP32: tl.constexpr, HAS_ROWS_OUT: tl.constexpr,
                     BLOCK: tl.constexpr, BLOCK_TAIL: tl.constexpr, USE_PDL: tl.constexpr):
    row, cols, ok, x = _norm_input(X, Residual, PreWeight, stride_x, stride_r, hidden, pre_eps, HAS_RESIDUAL,
                                   HAS_PRE, BLOCK, USE_PDL, SCALE_IN_FP32)
    out = _rms_scaled(x.to(tl.float32), Weight, cols, ok, hidden, eps, X.dtype.element_ty, SCALE_IN_FP32)
    out = out.to(Out.dtype.element_ty)
    tl.store(Out + row * stride_o + cols, out, mask=ok)
    if HAS_ROWS_OUT:  # the row again, then its tail, at its own row of another buffer (a KV pool slot)
        dest = RowsOut + tl.load(Rows + row).to(tl.int64) * stride_ro
        tl.store(dest + cols, out, mask=ok)
        tail_cols = tl.arange(0, BLOCK_TAIL)
        tail_ok = tail_cols < tail_width
        tail = tl.load(Tail + row * stride_t + tail_cols, mask=tail_ok, other=0.0)
        tl.store(dest + hidden + tail_cols, tail, mask=tail_ok)


@opaque_to_compiler
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None,
             pre_norm: tuple[torch.Tensor, float] | None = None, scale_in_float32: bool = False,
             out: torch.Tensor | None = None, rows_out: RowsOut | None = None) -> torch.Tensor:
    """``weight * norm(x)``; with ``residual``, first ``residual += x`` (in place) and normalise that.
    ``pre_norm`` (a weight and its eps): ``x`` is RMS-normalised with it before all that, so two
    norms around a residual add are one launch. ``scale_in_float32``: both norms round as
    ``RMSNorm(scale_in_float32=True)``, once after the weight, to ``x``'s dtype. ``out``: where the
    result is written (x's shape and the result's dtype, rows at any stride; ``x`` itself too: each
    row is read whole before it is written), returned. ``rows_out``: result row i is also written,
    followed by the tail's row i, into row ``rows[i]`` of the buffer (see ``RowsOut``)."""
    x2 = x.reshape(-1, x.shape[-1])
    out_dtype = x.dtype if scale_in_float32 else torch.promote_types(weight.dtype, x.dtype)
    if out is None:
        out = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    elif out.shape != x.shape or out.dtype != out_dtype or out.stride(-1) != 1:
        raise ValueError(f"out: {tuple(out.shape)} {out.dtype} must be x's shape {tuple(x.shape)} in {out_dtype}, "
                         "with contiguous rows")
    result = out
    out = out.view(x2.shape)
    res2 = residual.view(-1, x.shape[-1]) if residual is not None else x2
    pre_weight, pre_eps = pre_norm if pre_norm is not None else (weight, 0.0)
    hidden = x2.shape[1]
    if rows_out is not None:
        rows_out.check(x2.shape[0], hidden, out_dtype)
        buffer, rows, tail = rows_out.buffer, rows_out.rows, rows_out.tail
    else:
        buffer, rows, tail = out, out, out  # unread
    block = triton.next_power_of_2(hidden)
    _rms_norm_kernel[(x2.shape[0],)](x2, res2, pre_weight, weight, out, buffer, rows, tail, x2.stride(0),
                                     res2.stride(0), out.stride(0), buffer.stride(0), tail.stride(0), hidden,
                                     tail.shape[-1] if rows_out is not None else 0, pre_eps, eps,
                                     HAS_RESIDUAL=residual is not None, HAS_PRE=pre_norm is not None,
                                     SCALE_IN_FP32=scale_in_float32, HAS_ROWS_OUT=rows_out is not None, BLOCK=block,
                                     BLOCK_TAIL=triton.next_power_of_2(tail.shape[-1]) if rows_out is not None else 1,
                                     num_warps=min(max(block // 256, 1), 8), **launch_options(x))
    return result


@triton.jit
def _layer_norm_kernel(X, Residual, Weight, Bias, Out, stride_x, stride_r, stride_o, hidden, eps,
                       HAS_RESIDUAL: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr,
                       USE_PDL: tl.constexpr):
    row, cols, ok, x = _norm_input(X, Residual, Weight, stride_x, stride_r, hidden, eps, HAS_RESIDUAL, False, BLOCK,
                                   USE_PDL, False)
    xf = x.to(tl.float32)
    mean = tl.sum(xf, 0) / hidden
    centred = tl.where(ok, xf - mean, 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(centred * centred, 0) / hidden + eps)
    # The affine step stays in float32 and the result is rounded once, as torch's layer_norm does.
    out = centred * rstd * tl.load(Weight + cols, mask=ok, other=0.0).to(tl.float32)
    if HAS_BIAS:
        out += tl.load(Bias + cols, mask=ok, other=0.0).to(tl.float32)
    tl.store(Out + row * stride_o + cols, out.to(Out.dtype.element_ty), mask=ok)


@opaque_to_compiler
def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float,
               residual: torch.Tensor | None = None) -> torch.Tensor:
    """``layer_norm(x) * weight + bias``; with ``residual``, first ``residual += x`` (in place) and
    normalise that. The result has ``x``'s dtype, as ``torch.nn.functional.layer_norm``."""
    x2 = x.reshape(-1, x.shape[-1])
    out = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
    res2 = residual.view(-1, x.shape[-1]) if residual is not None else x2
    hidden = x2.shape[1]
    block = triton.next_power_of_2(hidden)
    _layer_norm_kernel[(x2.shape[0],)](x2, res2, weight, bias if bias is not None else weight, out, x2.stride(0),
                                       res2.stride(0), out.stride(0), hidden, eps,
                                       HAS_RESIDUAL=residual is not None, HAS_BIAS=bias is not None, BLOCK=block,
                                       num_warps=min(max(block // 256, 1), 8), **launch_options(x))
    return out.view(x.shape)


@triton.jit
def _gelu(x, APPROXIMATE_TANH: tl.constexpr):
    """GELU of float32 ``x``: exact (erf) or torch's tanh approximation."""
    if APPROXIMATE_TANH:
        inner = 0.7978845608028654 * (x + 0.044715 * x * x * x)  # sqrt(2 / pi) * (x + 0.044715 x^3)
        # tanh from exp (no tl.tanh on every backend), of -|inner| so that it cannot overflow
        decay = tl.exp(-2.0 * tl.abs(inner))
        tanh = (1.0 - decay) / (1.0 + decay)
        return 0.5 * x * (1.0 + tl.where(inner >= 0, tanh, -tanh))
    else:
        return 0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))


@triton.jit
def _act_and_mul_kernel(X, Out, stride_x, stride_o, width, ACTIVATION: tl.constexpr, BLOCK: tl.constexpr,
                        USE_PDL: tl.constexpr):
    pdl_enter(USE_PDL)
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < width
    gate = tl.load(X + row * stride_x + cols, mask=ok, other=0.0).to(tl.float32)
    up = tl.load(X + row * stride_x + width + cols, mask=ok, other=0.0)
    if ACTIVATION == "silu":
        act = gate / (1.0 + tl.exp(-gate))
    elif ACTIVATION == "gelu_tanh":
        act = _gelu(gate, True)
    else:
        act = _gelu(gate, False)
    # The activation is rounded to the input dtype before the product, as the PyTorch path rounds.
    act = act.to(up.dtype)
    tl.store(Out + row * stride_o + cols, (act.to(tl.float32) * up.to(tl.float32)).to(Out.dtype.element_ty),
             mask=ok)


def _act_and_mul(x: torch.Tensor, activation: str) -> torch.Tensor:
    x2 = x.reshape(-1, x.shape[-1])
    width = x2.shape[1] // 2
    out = torch.empty((x2.shape[0], width), dtype=x.dtype, device=x.device)
    block = 1024
    _act_and_mul_kernel[(x2.shape[0], triton.cdiv(width, block))](x2, out, x2.stride(0), out.stride(0), width,
                                                                  ACTIVATION=activation, BLOCK=block, num_warps=4,
                                                                  **launch_options(x))
    return out.view(*x.shape[:-1], width)


@opaque_to_compiler
def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """``silu(x[..., :w]) * x[..., w:]`` with ``w`` half the last dimension."""
    return _act_and_mul(x, "silu")


@opaque_to_compiler
def gelu_and_mul(x: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    """``gelu(x[..., :w], approximate) * x[..., w:]`` with ``w`` half the last dimension;
    ``approximate`` is ``"none"`` (erf) or ``"tanh"``, as in ``torch.nn.functional.gelu``."""
    if approximate not in ("none", "tanh"):
        raise ValueError(f"approximate: must be 'none' or 'tanh', not {approximate!r}")
    return _act_and_mul(x, "gelu_tanh" if approximate == "tanh" else "gelu")


@triton.jit
def _pair_offsets(token, heads, half, stride_t, stride_h, HALF: tl.constexpr, INTERLEAVED: tl.constexpr):
    """Offsets of each frequency's pair: (i, i + HALF) in the "rotate half" (GPT-NeoX) layout,
    (2i, 2i + 1) in the interleaved (GPT-J) one."""
    if INTERLEAVED:
        first = token * stride_t + heads[:, None] * stride_h + 2 * half[None, :]
        return first, first + 1
    first = token * stride_t + heads[:, None] * stride_h + half[None, :]
    return first, first + HALF


@triton.jit
def _rotate_heads(X, Out, token, pos, Cos, Sin, stride_xt, stride_xh, stride_ot, stride_oh, stride_c, num_heads,
                  HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr, INTERLEAVED: tl.constexpr):
    heads = tl.arange(0, BLOCK_H)
    half = tl.arange(0, BLOCK_HALF)
    ok = (heads[:, None] < num_heads) & (half[None, :] < HALF)
    cos = tl.load(Cos + pos * stride_c + half, mask=half < HALF, other=0.0)
    sin = tl.load(Sin + pos * stride_c + half, mask=half < HALF, other=0.0)
    first, second = _pair_offsets(token, heads, half, stride_xt, stride_xh, HALF, INTERLEAVED)
    x1 = tl.load(X + first, mask=ok, other=0.0)
    x2 = tl.load(X + second, mask=ok, other=0.0)
    a, b = x1.to(tl.float32), x2.to(tl.float32)
    # (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin)
    first, second = _pair_offsets(token, heads, half, stride_ot, stride_oh, HALF, INTERLEAVED)
    tl.store(Out + first, (a * cos[None, :] - b * sin[None, :]).to(x1.dtype), mask=ok)
    tl.store(Out + second, (b * cos[None, :] + a * sin[None, :]).to(x1.dtype), mask=ok)


@triton.jit
def _rope_kernel(X, XOut, Y, Positions, Cos, Sin, stride_xt, stride_xh, stride_ot, stride_oh, stride_yt, stride_yh,
                 stride_c, x_heads, y_heads, HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr,
                 INTERLEAVED: tl.constexpr, USE_PDL: tl.constexpr):
    """One token's heads of ``X`` into ``XOut`` (program 0 along axis 1) or of ``Y`` in place (program 1)."""
    pdl_enter(USE_PDL)
    token = tl.program_id(0)
    pos = tl.load(Positions + token)
    if tl.program_id(1) == 0:
        _rotate_heads(X, XOut, token, pos, Cos, Sin, stride_xt, stride_xh, stride_ot, stride_oh, stride_c, x_heads,
                      HALF, BLOCK_H, BLOCK_HALF, INTERLEAVED)
    else:
        _rotate_heads(Y, Y, token, pos, Cos, Sin, stride_yt, stride_yh, stride_yt, stride_yh, stride_c, y_heads,
                      HALF, BLOCK_H, BLOCK_HALF, INTERLEAVED)


@opaque_to_compiler
def rotary_inplace(x: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                   rotary_dim: int, interleaved: bool = False, other: torch.Tensor | None = None,
                   x_out: torch.Tensor | None = None) -> None:
    """Rotate the first ``rotary_dim`` dims of every head of ``x`` [T, heads, head_dim] in place,
    in the "rotate half" layout or, with ``interleaved``, GPT-J's pairs of neighbours; ``other``
    (the same tokens' keys: [T, kv_heads, any head_dim], anywhere in memory) in the same launch.
    ``cos``/``sin``: [max_position, >= rotary_dim // 2] float32, one column per frequency.
    ``x_out`` (x's shape, anywhere in memory): takes x's rotated dims instead of ``x``, which is
    left as it was (its other dims are not copied)."""
    tokens, heads, _ = x.shape
    if tokens == 0:
        return
    for name, tensor in (("x", x), ("other", other), ("x_out", x_out)):
        if tensor is not None and tensor.stride(2) != 1:
            raise ValueError(f"rotary_inplace: {name}'s head dimension must be contiguous")
    if other is not None and other.shape[0] != tokens:
        raise ValueError(f"rotary_inplace: other has {other.shape[0]} tokens, x {tokens}")
    if x_out is not None and x_out.shape != x.shape:
        raise ValueError(f"rotary_inplace: x_out's shape {tuple(x_out.shape)} is not x's {tuple(x.shape)}")
    y = x if other is None else other
    out = x if x_out is None else x_out
    half = rotary_dim // 2
    _rope_kernel[(tokens, 1 if other is None else 2)](
        x, out, y, positions, cos, sin, x.stride(0), x.stride(1), out.stride(0), out.stride(1), y.stride(0),
        y.stride(1), cos.stride(0), heads, y.shape[1], HALF=half,
        BLOCK_H=triton.next_power_of_2(max(heads, y.shape[1])), BLOCK_HALF=triton.next_power_of_2(half),
        INTERLEAVED=interleaved, num_warps=4, **launch_options(x))


@triton.jit
def _store_kv_kernel(K, V, KBuf, VBuf, Slots, stride_k, stride_v, stride_kb, stride_vb, width,
                     BLOCK: tl.constexpr, USE_PDL: tl.constexpr):
    pdl_enter(USE_PDL)
    token = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < width
    slot = tl.load(Slots + token)
    k = tl.load(K + token * stride_k + cols, mask=ok)
    v = tl.load(V + token * stride_v + cols, mask=ok)
    tl.store(KBuf + slot * stride_kb + cols, k.to(KBuf.dtype.element_ty), mask=ok)
    tl.store(VBuf + slot * stride_vb + cols, v.to(VBuf.dtype.element_ty), mask=ok)


@opaque_to_compiler
def store_kv(k: torch.Tensor, v: torch.Tensor, k_buffer: torch.Tensor, v_buffer: torch.Tensor,
             slots: torch.Tensor) -> None:
    """``k_buffer[slots] = k; v_buffer[slots] = v`` in one launch. k/v: [T, kv_heads, head_dim]
    (any token stride); buffers: [slots, kv_heads, head_dim] contiguous."""
    tokens = k.shape[0]
    if tokens == 0:
        return
    k2, v2 = k.reshape(tokens, -1), v.reshape(tokens, -1)
    width = k2.shape[1]
    block = min(triton.next_power_of_2(width), 1024)
    _store_kv_kernel[(tokens, triton.cdiv(width, block))](
        k2, v2, k_buffer, v_buffer, slots, k2.stride(0), v2.stride(0), k_buffer.stride(0), v_buffer.stride(0),
        width, BLOCK=block, num_warps=4, **launch_options(k))

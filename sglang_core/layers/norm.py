"""RMSNorm and LayerNorm, each optionally fused with the residual add that precedes it, a
LayerNorm per attention head and an RMSNorm over heads split across ranks (q/k norms)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sglang_core.kernels import use_fused
from sglang_core.kernels.rows_out import RowsOut
from sglang_core.layers.parallel import SINGLE, TPGroup, copy_checked


class RMSNorm(nn.Module):
    """``weight * x / rms(x)``. ``weight_offset``: the checkpoint stores ``weight - offset``
    (Gemma's ``(1 + w)`` scale: offset 1); it is added once as the weight loads, so the forward
    pass and its fused kernel stay those of a plain RMSNorm.

    ``scale_in_float32``: the weight multiplies the float32 normalised row and the product rounds
    once to the input dtype (OLMo 2's order); by default the normalised row rounds to the input
    dtype first and the weight multiplies that (Llama's). In float32 the two are the same."""

    def __init__(self, hidden_size: int, eps: float = 1e-6, params_dtype: torch.dtype = torch.float32,
                 weight_offset: float = 0.0, scale_in_float32: bool = False):
        super().__init__()
        self.eps = eps
        self.scale_in_float32 = scale_in_float32
        self.weight = nn.Parameter(torch.ones(hidden_size, dtype=params_dtype), requires_grad=False)
        self.weight_offset = weight_offset
        if weight_offset:
            self.weight.weight_loader = self._load_offset_weight  # type: ignore[attr-defined]

    def _load_offset_weight(self, param: torch.Tensor, loaded: torch.Tensor, shard_id: object = None) -> None:
        # Sum in float32, one rounding to the parameter's dtype.
        copy_checked(param.data, (loaded.float() + self.weight_offset).to(param.dtype))

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None, out: torch.Tensor | None = None,
        rows_out: RowsOut | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """``norm(x)``, or with ``residual``: ``(norm(x + residual), x + residual)``.
        On CUDA the fused kernel writes ``x + residual`` into ``residual`` and returns it.
        ``out``: the tensor the norm is written into and returned as (``x`` itself may be it: a
        row laid out where a later step reads it, with no copy launched on CUDA). ``rows_out``:
        the rows written a second time, at indexed rows of another buffer (same launch on CUDA)."""
        if use_fused(x):
            from sglang_core.kernels.fused import rms_norm

            normed = rms_norm(x, self.weight, self.eps, residual, scale_in_float32=self.scale_in_float32, out=out,
                              rows_out=rows_out)
            return normed if residual is None else (normed, residual)
        if residual is not None:
            x = x + residual
            residual = x
        # Normalise in float32 as the reference implementations do.
        xf = x.float()
        normed = self._scale(xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps), x.dtype)
        if out is not None:
            normed = out.copy_(normed)
        if rows_out is not None:
            rows_out.write(normed)
        return normed if residual is None else (normed, residual)

    def _scale(self, normed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """The weight times the float32 ``normed``, rounded to ``dtype`` in this norm's order."""
        if self.scale_in_float32:
            return (self.weight * normed).to(dtype)
        return self.weight * normed.to(dtype)


class LayerNorm(nn.Module):
    """``torch.nn.LayerNorm`` over the last dimension (weight, optional bias), as Hugging Face's
    GPT-J, Phi, StableLM and others use it: statistics and the affine step in float32, one rounding
    to the input dtype at the end."""

    def __init__(self, hidden_size: int, eps: float = 1e-5, bias: bool = True,
                 params_dtype: torch.dtype = torch.float32):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size, dtype=params_dtype), requires_grad=False)
        self.bias = (nn.Parameter(torch.zeros(hidden_size, dtype=params_dtype), requires_grad=False)
                     if bias else None)

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """``norm(x)``, or with ``residual``: ``(norm(x + residual), x + residual)``, as RMSNorm.
        On CUDA the fused kernel writes ``x + residual`` into ``residual`` and returns it."""
        if use_fused(x):
            from sglang_core.kernels.fused import layer_norm

            out = layer_norm(x, self.weight, self.bias, self.eps, residual)
            return out if residual is None else (out, residual)
        if residual is not None:
            x = x + residual
            residual = x
        out = F.layer_norm(x, self.weight.shape, self.weight, self.bias, self.eps)
        return out if residual is None else (out, residual)


class SplitHeadsRMSNorm(RMSNorm):
    """RMSNorm over every attention head of a projection at once (OLMo 2's q/k norms: one
    ``[heads * head_dim]`` vector), its weight split across ranks as ``QKVParallelLinear`` splits
    the heads (each head replicated on ``tp.size / total_heads`` ranks when there are fewer heads
    than ranks). Input ``[tokens, local heads * head_dim]``; the mean square adds up every rank's
    heads (one all-reduce), counting a replicated head once."""

    def __init__(self, total_heads: int, head_dim: int, eps: float = 1e-6,
                 params_dtype: torch.dtype = torch.float32, tp: TPGroup = SINGLE, scale_in_float32: bool = False):
        if total_heads % tp.size and tp.size % total_heads:
            raise ValueError(f"num_heads={total_heads} and tp_size={tp.size}: neither divides the other")
        heads = max(1, total_heads // tp.size)
        super().__init__(heads * head_dim, eps, params_dtype, scale_in_float32=scale_in_float32)
        self.tp, self.total_size = tp, total_heads * head_dim
        self.replicas = max(1, tp.size // total_heads)
        self.first = tp.rank // self.replicas * heads * head_dim
        self.weight.weight_loader = self._load_rank_piece  # type: ignore[attr-defined]

    def _load_rank_piece(self, param: torch.Tensor, loaded: torch.Tensor, shard_id: object = None) -> None:
        if loaded.shape != (self.total_size,):
            raise ValueError(f"norm weight of shape {tuple(loaded.shape)} is not [{self.total_size}]")
        copy_checked(param.data, loaded[self.first:self.first + param.shape[0]])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return super().forward(x)
        xf = x.float()
        square_sum = self.tp.all_reduce(xf.pow(2).sum(-1, keepdim=True))
        return self._scale(xf * torch.rsqrt(square_sum / (self.replicas * self.total_size) + self.eps), x.dtype)


def norm_add_norm(first: nn.Module, second: nn.Module, x: torch.Tensor,
                  residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(second(first(x) + residual), first(x) + residual)``: a sublayer's output norm, the
    residual add and the next norm (Gemma 2's post-attention and pre-feed-forward norms). Two
    RMSNorms that round alike on CUDA are one fused launch; any other pair runs as the two modules."""
    if (type(first) is RMSNorm and type(second) is RMSNorm and first.scale_in_float32 == second.scale_in_float32
            and use_fused(x)):
        from sglang_core.kernels.fused import rms_norm

        return rms_norm(x, second.weight, second.eps, residual, pre_norm=(first.weight, first.eps),
                        scale_in_float32=second.scale_in_float32), residual
    return second(first(x), residual)


class HeadwiseLayerNorm(nn.Module):
    """LayerNorm over each attention head's ``head_dim``, with a scale of its own per head and no
    bias (Cohere's ``use_qk_norm``, StableLM's ``qk_layernorm``). Input ``[tokens, heads, head_dim]``;
    statistics and scale in float32, one rounding to the input dtype at the end.

    The weight is ``[heads, head_dim]`` for this rank's heads, split across ranks as
    ``QKVParallelLinear`` splits them: ``total_heads`` over ``tp.size`` ranks, or, with more ranks
    than heads, each head replicated on ``tp.size / total_heads`` consecutive ranks. Its loader takes
    either every head's scale at once (``[total_heads, head_dim]``, Cohere's checkpoints) or one
    head's (``[head_dim]``) with the head index as ``shard_id`` (StableLM's ``norms.<h>.weight``).
    """

    def __init__(self, total_heads: int, head_dim: int, eps: float = 1e-5, params_dtype: torch.dtype = torch.float32,
                 tp: TPGroup = SINGLE):
        super().__init__()
        if total_heads % tp.size and tp.size % total_heads:
            raise ValueError(f"num_heads={total_heads} and tp_size={tp.size}: neither divides the other")
        self.eps = eps
        self.num_heads = max(1, total_heads // tp.size)
        self.first_head = tp.rank // max(1, tp.size // total_heads) * self.num_heads
        self.weight = nn.Parameter(torch.ones(self.num_heads, head_dim, dtype=params_dtype), requires_grad=False)
        self.weight.weight_loader = self.weight_loader

    def weight_loader(self, param: torch.Tensor, loaded: torch.Tensor, shard_id: int | None = None) -> None:
        heads = range(self.first_head, self.first_head + self.num_heads)
        if shard_id is None:
            if loaded.dim() != 2 or loaded.shape[0] < heads.stop:
                raise ValueError(f"per-head norm weight of shape {tuple(loaded.shape)} lacks heads {heads.start}.."
                                 f"{heads.stop - 1} of width {param.shape[1]}")
            copy_checked(param.data, loaded[heads.start:heads.stop])
        elif shard_id in heads:  # one head's scale; other ranks' heads are skipped
            copy_checked(param.data[shard_id - heads.start], loaded)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.layer_norm(x.float(), x.shape[-1:], eps=self.eps) * self.weight.float()
        return out.to(x.dtype)

"""RMSNorm and LayerNorm, each optionally fused with the residual add that precedes it."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sglang_core.kernels import use_fused
from sglang_core.layers.parallel import copy_checked


class RMSNorm(nn.Module):
    """``weight * x / rms(x)``. ``weight_offset``: the checkpoint stores ``weight - offset``
    (Gemma's ``(1 + w)`` scale: offset 1); it is added once as the weight loads, so the forward
    pass and its fused kernel stay those of a plain RMSNorm."""

    def __init__(self, hidden_size: int, eps: float = 1e-6, params_dtype: torch.dtype = torch.float32,
                 weight_offset: float = 0.0):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size, dtype=params_dtype), requires_grad=False)
        self.weight_offset = weight_offset
        if weight_offset:
            self.weight.weight_loader = self._load_offset_weight  # type: ignore[attr-defined]

    def _load_offset_weight(self, param: torch.Tensor, loaded: torch.Tensor, shard_id: object = None) -> None:
        # Sum in float32, one rounding to the parameter's dtype.
        copy_checked(param.data, (loaded.float() + self.weight_offset).to(param.dtype))

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """``norm(x)``, or with ``residual``: ``(norm(x + residual), x + residual)``.
        On CUDA the fused kernel writes ``x + residual`` into ``residual`` and returns it."""
        if use_fused(x):
            from sglang_core.kernels.fused import rms_norm

            out = rms_norm(x, self.weight, self.eps, residual)
            return out if residual is None else (out, residual)
        if residual is not None:
            x = x + residual
            residual = x
        dtype = x.dtype
        # Normalise in float32 as the reference implementations do, then scale in the input dtype.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        out = self.weight * xf.to(dtype)
        return out if residual is None else (out, residual)


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

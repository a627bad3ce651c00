"""The e4m3 number format the fp8 plugin stores weights and rounds activations in."""

from __future__ import annotations

import torch

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max
# The smallest scale used: an all-zero row or token quantizes to zeros instead of NaNs.
MIN_SCALE = 1e-12


def quantize(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``x / scale`` rounded to e4m3, saturating at its largest finite value."""
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8)


def token_scale(x: torch.Tensor) -> torch.Tensor:
    """Dynamic activation scale: each token's (last dim's) largest magnitude over e4m3's."""
    return x.abs().amax(dim=-1, keepdim=True).float().clamp(min=MIN_SCALE * FP8_MAX) / FP8_MAX


def round_trip(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``x`` rounded to e4m3 by ``scale`` and back to ``x``'s dtype: what an FP8 matmul sees of it."""
    return (quantize(x, scale).float() * scale).to(x.dtype)

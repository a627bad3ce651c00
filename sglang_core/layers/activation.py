"""Gated activations."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sglang_core.kernels import use_fused


class SiluAndMul(nn.Module):
    """``silu(gate) * up`` for a fused ``[gate | up]`` projection output."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if use_fused(x):
            from sglang_core.kernels.fused import silu_and_mul

            return silu_and_mul(x)
        gate, up = x.chunk(2, dim=-1)
        return F.silu(gate) * up

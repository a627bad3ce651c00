"""GPU kernels the core layers use on CUDA when Triton is installed (``fused.py``, ``gemv.py``)."""

from __future__ import annotations

import importlib.util

import torch
import torch.nn.functional as F

_HAS_TRITON = importlib.util.find_spec("triton") is not None


def use_fused(x: torch.Tensor) -> bool:
    """Whether a layer should run its fused Triton kernel on ``x`` (CUDA tensors only: on CPU
    the PyTorch path is as fast and needs no compiler)."""
    return x.is_cuda and _HAS_TRITON


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear``; a one-row product on CUDA (batch-1 decode) goes through ``gemv.py``, which
    streams the weight faster than cuBLAS's kernels for that shape."""
    if use_fused(x):
        from sglang_core.kernels import gemv

        if gemv.fits(x, weight):
            return gemv.gemv(x, weight, bias)
    return F.linear(x, weight, bias)

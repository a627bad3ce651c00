"""Fused GPU kernels the core layers use on CUDA when Triton is installed (see ``fused.py``)."""

from __future__ import annotations

import importlib.util

import torch

_HAS_TRITON = importlib.util.find_spec("triton") is not None


def use_fused(x: torch.Tensor) -> bool:
    """Whether a layer should run its fused Triton kernel on ``x`` (CUDA tensors only: on CPU
    the PyTorch path is as fast and needs no compiler)."""
    return x.is_cuda and _HAS_TRITON

"""Programmatic dependent launch (Hopper and later) for the kernels of a decode step.

A decode step at small batch is a chain of short kernels, and each boundary costs the next
kernel's launch and its first memory round trip. Launched with ``launch_pdl``, a kernel may start
while the previous one is still finishing; it must then wait (``gdc_wait``) before it touches
anything an earlier kernel reads or writes. Weights are written by no kernel of the step, so a
matmul may read its first weight tile before waiting. Each kernel here lets its successor launch
as soon as it starts (``gdc_launch_dependents``); the successor's wait still holds it until this
one has finished and its writes are visible, so the order of effects is unchanged.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

ENABLED = True  # benchmarks switch it off to measure the plain launches beside it


@functools.lru_cache(maxsize=None)
def _capable(device_index: int) -> bool:
    from triton.language.extra import cuda

    return torch.cuda.get_device_capability(device_index)[0] >= 9 and hasattr(cuda, "gdc_wait")


def launch_options(x: torch.Tensor) -> dict:
    """Keyword arguments for launching a kernel that takes ``USE_PDL`` on ``x``'s device."""
    if ENABLED and x.is_cuda:
        index = x.device.index if x.device.index is not None else torch.cuda.current_device()
        if _capable(index):
            return {"USE_PDL": True, "launch_pdl": True}
    return {"USE_PDL": False}


@triton.jit
def pdl_launch_next(USE_PDL: tl.constexpr):
    """Allow the next kernel in the stream to launch now."""
    if USE_PDL:
        tl.extra.cuda.gdc_launch_dependents()


@triton.jit
def pdl_wait(USE_PDL: tl.constexpr):
    """Wait until the previous kernel has finished and its writes are visible."""
    if USE_PDL:
        tl.extra.cuda.gdc_wait()


@triton.jit
def pdl_enter(USE_PDL: tl.constexpr):
    """The start of a kernel that reads nothing before waiting: let the next launch, then wait."""
    pdl_launch_next(USE_PDL)
    pdl_wait(USE_PDL)

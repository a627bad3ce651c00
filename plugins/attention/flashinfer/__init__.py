"""Built-in attention plugin: FlashInfer's paged decode and prefill kernels over the KV pool (CUDA,
``pip install 'sglang-core[flashinfer]'``)."""

from __future__ import annotations

import torch

from sglang_core.hookspecs import hookimpl
from sglang_core.layers.attention import available_on_cuda


def is_available(device: torch.device) -> bool:
    return available_on_cuda(device, "flashinfer")


@hookimpl
def register_attention_backends(register):
    # Above Triton: "auto" takes FlashInfer wherever it is installed.
    register("flashinfer", "sglang_plugins.attention.flashinfer.backend:FlashInferBackend", priority=60,
             is_available="sglang_plugins.attention.flashinfer:is_available")

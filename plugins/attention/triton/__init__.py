"""Built-in attention plugin: our own Triton decode and extend kernels over the KV pool (CUDA)."""

from __future__ import annotations

import torch

from sglang_core.hookspecs import hookimpl
from sglang_core.layers.attention import available_on_cuda


def is_available(device: torch.device) -> bool:
    return available_on_cuda(device, "triton")


@hookimpl
def register_attention_backends(register):
    # Below FlashInfer, above torch_native: "auto" takes it on a GPU without FlashInfer.
    register("triton", "sglang_plugins.attention.triton.backend:TritonBackend", priority=50,
             is_available="sglang_plugins.attention.triton:is_available")

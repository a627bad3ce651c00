"""Built-in attention plugin: our own Triton decode and extend kernels over the KV pool (CUDA)."""

from __future__ import annotations

import importlib.util

import torch

from sglang_core.hookspecs import hookimpl


def is_available(device: torch.device) -> bool:
    return device.type == "cuda" and importlib.util.find_spec("triton") is not None


@hookimpl
def register_attention_backends(register):
    # Below FlashInfer, above torch_native: "auto" takes it on a GPU without FlashInfer.
    register("triton", "sglang_plugins.attention.triton.backend:TritonBackend", priority=50,
             is_available="sglang_plugins.attention.triton:is_available")

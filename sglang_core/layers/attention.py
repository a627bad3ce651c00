"""The attention-backend interface and the attention layer models call.

Models call ``Attention(q, k, v, forward_batch)`` and nothing else; the backend behind it is a
plugin (hook ``register_attention_backends``). A backend plans its metadata once per batch in
``plan`` and every layer reuses it.
"""

from __future__ import annotations

import abc
import importlib.util
from dataclasses import dataclass

import torch
from torch import nn

from sglang_core.kernels.opaque import opaque_to_compiler
from sglang_core.model_executor.forward_batch import ForwardBatch, ForwardMode


@dataclass(frozen=True)
class AttentionSpec:
    """Shapes a backend needs to size its work space (this rank's heads)."""

    num_heads: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype
    device: torch.device
    max_batch_size: int = 256  # most requests in one batch (sizes per-batch work space once)
    cascade_decode: bool = False  # decode reads each ForwardBatch.shared_prefixes group's prefix once
    kv_dtype: torch.dtype | None = None  # the pool's K/V element type (FP8 may be narrower); None: ``dtype``


class UnsupportedSpecError(ValueError):
    """Raised by a backend's ``__init__`` for shapes or dtypes it has no kernels for; ``auto``
    then takes the next backend by priority, an explicit choice reports it."""


def available_on_cuda(device: torch.device, module: str) -> bool:
    """``is_available`` of a CUDA-only backend whose kernels come from ``module``."""
    return device.type == "cuda" and importlib.util.find_spec(module) is not None


class AttentionBackend(abc.ABC):
    """Computes attention over the paged KV pool for every layer of one model."""

    # True when a decode step can be captured once per batch size as a CUDA graph and replayed for
    # any sequence lengths: ``forward_decode`` reads the batch only through its device tensors and
    # its batch size, and so does ``plan`` unless ``plan_before_replay`` is set.
    cuda_graph_decode: bool = False
    # True when ``plan`` must run on the host before each replay of a captured decode step (it
    # reads host-side lengths and refills fixed device buffers the graph reads); the graph runner
    # then calls it with the step's batch, padded to the captured size.
    plan_before_replay: bool = False

    def __init__(self, spec: AttentionSpec):
        self.spec = spec

    @abc.abstractmethod
    def plan(self, batch: ForwardBatch) -> None:
        """Prepare per-batch metadata (index tables, masks, kernel plans) shared by all layers."""

    @abc.abstractmethod
    def forward_extend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: "Attention",
                       batch: ForwardBatch) -> torch.Tensor:
        """Causal attention of each request's new tokens over its prefix and themselves."""

    @abc.abstractmethod
    def forward_decode(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: "Attention",
                       batch: ForwardBatch) -> torch.Tensor:
        """One new token per request over its whole cached sequence."""

    @staticmethod
    def store_kv(k: torch.Tensor, v: torch.Tensor, layer: "Attention",
                 batch: ForwardBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the batch's new K/V ([T, kv_heads*head_dim]) into the pool at
        ``batch.out_cache_loc``; return them as [T, kv_heads, head_dim]."""
        shape = (k.shape[0], layer.num_kv_heads, layer.head_dim)
        k3, v3 = k.view(shape), v.view(shape)
        batch.kv_pool.store(layer.layer_id, batch.out_cache_loc, k3, v3)
        return k3, v3

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: "Attention",
                batch: ForwardBatch) -> torch.Tensor:
        """q: [T, heads*head_dim], k/v: [T, kv_heads*head_dim] -> [T, heads*head_dim].
        Writes the new K/V into the pool, then attends."""
        if batch.mode is ForwardMode.DECODE:
            return self.forward_decode(q, k, v, layer, batch)
        return self.forward_extend(q, k, v, layer, batch)


class Attention(nn.Module):
    """One layer's attention: its shape and scale, delegating the work to the batch's backend."""

    def __init__(self, layer_id: int, num_heads: int, num_kv_heads: int, head_dim: int, scaling: float,
                 sliding_window: int | None = None):
        super().__init__()
        self.layer_id = layer_id
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scaling = scaling
        self.sliding_window = sliding_window

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        return _run_backend(q, k, v, self, batch)


@opaque_to_compiler  # a backend's kernels (any plugin's) run as they are inside compiled code
def _run_backend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: Attention,
                 batch: ForwardBatch) -> torch.Tensor:
    return batch.attn_backend.forward(q, k, v, layer, batch)

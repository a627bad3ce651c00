"""The attention-backend interface and the attention layer models call.

Models build ``Attention(layer_id, ...)`` modules, which declare their shape as an
``AttentionLayerSpec``, and call ``attention(q, k, v, forward_batch)``. A model that attends over
keys and values it derives from the cached ones (Multi-head Latent Attention expanding its latents
for a long prefill) calls ``store_and_read_kv`` and ``extend_given_kv`` instead. The runner
collects the specs from the built model, sizes the KV pool from them, builds a backend (a plugin,
hook ``register_attention_backends``) for them and binds it to every layer. A backend plans
its metadata once per batch in ``plan`` and every layer reuses it.
"""

from __future__ import annotations

import abc
import importlib.util

import torch
from torch import nn

from sglang_core.kernels.opaque import opaque_to_compiler
from sglang_core.layers.attention_spec import AttentionLayerSpec, AttentionSpec, KVLayout, UnsupportedSpecError
from sglang_core.mem.kv_pool import TokenKVPool, row_prefixes
from sglang_core.model_executor.forward_batch import ForwardBatch, ForwardMode

__all__ = ["Attention", "AttentionBackend", "AttentionLayerSpec", "AttentionSpec", "KVLayout",
           "UnsupportedSpecError", "available_on_cuda"]


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
    # True when ``forward_extend_given_kv`` runs (attention over K/V the layer gives, not the pool's).
    attends_given_kv: bool = False
    # True when ``forward_decode`` honours ``batch.row_chunks`` (an extend step replayed as decode
    # rows: each chunk's rows attended together, causally, over the request's prefix) reading the
    # chunks only through their device tensors; the graph runner then captures graphs with them.
    attends_row_chunks: bool = False
    # True when ``forward`` takes ``k=None`` (a latent layout's, so no V either) to mean the layer
    # wrote the step's new K into the pool itself, where and as ``store_kv`` would have
    # (``Attention.new_kv_rows``); the backend then stores nothing before attending.
    takes_stored_kv: bool = False

    def __init__(self, spec: AttentionSpec, kv_pool: TokenKVPool):
        """Raise ``UnsupportedSpecError`` here for any layer kind (``spec.distinct()``) the
        backend has no kernels for."""
        self.spec = spec
        self.kv_pool = kv_pool

    @abc.abstractmethod
    def plan(self, batch: ForwardBatch) -> None:
        """Prepare per-batch metadata (index tables, masks, kernel plans) shared by all layers."""

    @abc.abstractmethod
    def forward_extend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor | None, layer: "Attention",
                       batch: ForwardBatch) -> torch.Tensor:
        """Causal attention of each request's new tokens over its prefix and themselves."""

    @abc.abstractmethod
    def forward_decode(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor | None, layer: "Attention",
                       batch: ForwardBatch) -> torch.Tensor:
        """One new token per request over its whole cached sequence."""

    def store_kv(self, k: torch.Tensor, v: torch.Tensor | None, layer: "Attention",
                 batch: ForwardBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the batch's new K ([T, kv_heads*head_dim]) and V ([T, kv_heads*v_head_dim];
        None for a latent layout, whose V is part of K) into the pool at
        ``batch.out_cache_loc``; return them as [T, kv_heads, width]."""
        spec = layer.spec
        k3 = k.view(k.shape[0], spec.num_kv_heads, spec.head_dim)
        v3 = None if v is None else v.view(v.shape[0], spec.num_kv_heads, spec.v_head_dim)
        self.kv_pool.store(layer.layer_id, batch.out_cache_loc, k3, v3)
        return k3, (k3[..., :spec.v_head_dim] if v3 is None else v3)

    def read_kv(self, layer: "Attention", batch: ForwardBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """K [S, kv_heads, head_dim] and V [S, kv_heads, v_head_dim] of every token of the batch's
        sequences as the pool holds them, in the compute dtype: request by request, each one's
        cached prefix then its new tokens (S = sum of ``seq_lens``). The new tokens must be stored."""
        slots = sequence_slots(batch)
        keys = self.kv_pool.k_buffer(layer.layer_id)[slots].to(self.spec.dtype)
        if layer.spec.kv_layout is KVLayout.LATENT:  # the values are the latents' first columns
            return keys, keys[..., :layer.spec.v_head_dim]
        return keys, self.kv_pool.v_buffer(layer.layer_id)[slots].to(self.spec.dtype)

    def forward_extend_given_kv(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: AttentionLayerSpec,
                                batch: ForwardBatch) -> torch.Tensor:
        """Causal attention of each request's new tokens (q: [T, heads*head_dim]) over K
        [S, kv_heads, head_dim] and V [S, kv_heads, v_head_dim] given for every token of its
        sequence, laid out as ``read_kv`` returns them; ``spec`` gives heads, widths, scale, window
        and soft-cap, which need not be any cached layer's. Reads and writes no pool. Returns
        [T, heads*v_head_dim]. Backends that run it set ``attends_given_kv``."""
        raise NotImplementedError(f"the {type(self).__name__} attention backend cannot attend over given K/V")

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor | None, layer: "Attention",
                batch: ForwardBatch) -> torch.Tensor:
        """q: [T, heads*head_dim], k: [T, kv_heads*head_dim], v: [T, kv_heads*v_head_dim] (None
        for a latent layout) -> [T, heads*v_head_dim]. Writes the new K/V into the pool, then attends."""
        if batch.mode is ForwardMode.DECODE:
            return self.forward_decode(q, k, v, layer, batch)
        return self.forward_extend(q, k, v, layer, batch)


class Attention(nn.Module):
    """One layer's attention: its spec (shape, scale, window, soft-cap, KV layout), delegating
    the work to the backend the runner binds to it."""

    def __init__(self, layer_id: int, num_heads: int, num_kv_heads: int, head_dim: int, scaling: float,
                 sliding_window: int | None = None, *, v_head_dim: int | None = None,
                 logit_cap: float | None = None, kv_layout: KVLayout = KVLayout.SEPARATE):
        super().__init__()
        self.layer_id = layer_id
        self.spec = AttentionLayerSpec(num_heads, num_kv_heads, head_dim, v_head_dim or head_dim, scaling,
                                       sliding_window, logit_cap, kv_layout)
        self.backend: AttentionBackend | None = None

    def forward(self, q: torch.Tensor, k: torch.Tensor | None, v: torch.Tensor | None,
                batch: ForwardBatch) -> torch.Tensor:
        if self.backend is None:
            raise RuntimeError(f"attention layer {self.layer_id} has no backend: the model runner binds one "
                               "after building the KV pool")
        if k is None and not self.backend.takes_stored_kv:
            raise ValueError(f"k: the {type(self.backend).__name__} attention backend stores the new K itself; "
                             "pass it (new_kv_rows said None)")
        return _run_backend(q, k, v, self, batch)

    def new_kv_rows(self, batch: ForwardBatch, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Where this step's new latents go, ``(k_buffer [slots, head_dim], batch.out_cache_loc)``,
        for a layer that writes them there itself (in the same launch as it computes them) and then
        calls ``forward`` with ``k=None``; None where the layer must pass them instead: a layout
        with separate V, a backend that stores its own way (``takes_stored_kv`` unset), or a pool
        in another dtype than ``dtype`` (FP8: its store converts)."""
        pool = self.backend.kv_pool
        if (self.spec.kv_layout is not KVLayout.LATENT or not self.backend.takes_stored_kv
                or pool.dtype != dtype):
            return None
        k_buffer = pool.k_buffer(self.layer_id)
        return k_buffer.view(k_buffer.shape[0], -1), batch.out_cache_loc

    def store_and_read_kv(self, k: torch.Tensor, v: torch.Tensor | None,
                          batch: ForwardBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the new tokens' K/V into the pool, as ``forward`` does, and return K and V of
        every token of the batch's sequences as stored (``AttentionBackend.read_kv``)."""
        return _store_and_read(k, v, self, batch)

    def extend_given_kv(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: AttentionLayerSpec,
                        batch: ForwardBatch) -> torch.Tensor:
        """Causal attention of an extend batch's new tokens over K/V the caller derived for every
        token of their sequences (``AttentionBackend.forward_extend_given_kv``)."""
        if batch.mode is not ForwardMode.EXTEND:
            raise ValueError(f"batch: attention over given K/V runs extend batches, not {batch.mode.value}")
        return _run_given_kv(q, k, v, spec, self, batch)

    @property
    def attends_given_kv(self) -> bool:
        """Whether the bound backend runs ``extend_given_kv``."""
        return self.backend is not None and self.backend.attends_given_kv


def attention_layers(model: nn.Module) -> list[Attention]:
    """The model's attention layers in layer-id order; ids must be 0..n-1, each once."""
    layers = sorted((m for m in model.modules() if isinstance(m, Attention)), key=lambda m: m.layer_id)
    ids = [m.layer_id for m in layers]
    if ids != list(range(len(ids))):
        raise ValueError(f"layer_id: a model's Attention layers must be numbered 0..n-1 once each, got {ids}")
    return layers


@opaque_to_compiler  # a backend's kernels (any plugin's) run as they are inside compiled code
def _run_backend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor | None, layer: Attention,
                 batch: ForwardBatch) -> torch.Tensor:
    return layer.backend.forward(q, k, v, layer, batch)


@opaque_to_compiler
def _store_and_read(k: torch.Tensor, v: torch.Tensor | None, layer: Attention,
                    batch: ForwardBatch) -> tuple[torch.Tensor, torch.Tensor]:
    layer.backend.store_kv(k, v, layer, batch)
    return layer.backend.read_kv(layer, batch)


@opaque_to_compiler
def _run_given_kv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: AttentionLayerSpec, layer: Attention,
                  batch: ForwardBatch) -> torch.Tensor:
    return layer.backend.forward_extend_given_kv(q, k, v, spec, batch)


def sequence_slots(batch: ForwardBatch) -> torch.Tensor:
    """The KV slot of every token of the batch's sequences, request by request (prefix, then new
    tokens): [sum of seq_lens]. Built on the device; only the total comes from the host lengths."""
    return batch.req_to_token[row_prefixes(batch.req_pool_indices, batch.seq_lens, sum(batch.seq_lens_cpu))]

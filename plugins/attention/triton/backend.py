"""Attention backend on our Triton kernels (``kernels.py``): the GPU fallback when FlashInfer is
absent, and the backend whose decode is CUDA-graph safe (it reads only device tensors)."""

from __future__ import annotations

import itertools

import torch

from sglang_core.layers.attention import Attention, AttentionBackend, AttentionSpec
from sglang_core.model_executor.forward_batch import ForwardBatch, ForwardMode

from .kernels import decode_attention, extend_attention

# Split-KV programs wanted per decode launch: enough to fill an H100's 132 SMs about twice.
TARGET_PROGRAMS = 264
MAX_SPLITS = 16


def decode_splits(batch_size: int, num_kv_heads: int) -> int:
    """Key splits per request: many for small batches (else few SMs work), one for large ones.
    It depends only on shapes, so a captured CUDA graph stays valid for any sequence lengths."""
    wanted = -(-TARGET_PROGRAMS // (batch_size * num_kv_heads))
    return min(MAX_SPLITS, 1 << (wanted - 1).bit_length())


class TritonBackend(AttentionBackend):
    cuda_graph_decode = True

    def __init__(self, spec: AttentionSpec):
        super().__init__(spec)
        # Split partials by split count, sized for the largest batch and never reallocated:
        # captured CUDA graphs keep their addresses.
        self._partials: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def plan(self, batch: ForwardBatch) -> None:
        if batch.mode is ForwardMode.DECODE:
            splits = decode_splits(batch.input_ids.shape[0], self.spec.num_kv_heads)
            if splits not in self._partials:
                s = self.spec
                self._partials[splits] = (
                    torch.empty(s.max_batch_size, s.num_heads, splits, s.head_dim, dtype=torch.float32, device=s.device),
                    torch.empty(s.max_batch_size, s.num_heads, splits, dtype=torch.float32, device=s.device))
            self.num_splits = splits
        else:
            lens = batch.extend_lens_cpu
            self.max_extend_len = max(lens)
            starts = list(itertools.accumulate(lens, initial=0))[:-1]
            self.extend_start = torch.tensor(starts, dtype=torch.int64, device=batch.seq_lens.device)

    @staticmethod
    def _begin(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: Attention, batch: ForwardBatch):
        """Write the new K/V into the pool; return q as [T, heads, dim], the output, K and V buffers."""
        n, heads, kv_heads, dim = q.shape[0], layer.num_heads, layer.num_kv_heads, layer.head_dim
        pool = batch.kv_pool
        pool.store(layer.layer_id, batch.out_cache_loc, k.view(n, kv_heads, dim), v.view(n, kv_heads, dim))
        out = torch.empty((n, heads, dim), dtype=q.dtype, device=q.device)
        return q.view(n, heads, dim), out, pool.k_buffers[layer.layer_id], pool.v_buffers[layer.layer_id]

    def forward_decode(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: Attention,
                       batch: ForwardBatch) -> torch.Tensor:
        q3, out, k_buffer, v_buffer = self._begin(q, k, v, layer, batch)
        decode_attention(q3, k_buffer, v_buffer, out, batch.req_to_token, batch.req_pool_indices, batch.seq_lens,
                         layer.scaling, layer.sliding_window or 0, self.num_splits, *self._partials[self.num_splits])
        return out.view(q.shape[0], -1)

    def forward_extend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: Attention,
                       batch: ForwardBatch) -> torch.Tensor:
        q3, out, k_buffer, v_buffer = self._begin(q, k, v, layer, batch)
        extend_attention(q3, k_buffer, v_buffer, out, batch.req_to_token, batch.req_pool_indices, batch.seq_lens,
                         batch.prefix_lens, self.extend_start, self.max_extend_len, layer.scaling,
                         layer.sliding_window or 0)
        return out.view(q.shape[0], -1)

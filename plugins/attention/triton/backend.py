"""Attention backend on our Triton kernels (``kernels.py``): the GPU fallback when FlashInfer is
absent, and the backend whose decode is CUDA-graph safe (it reads only device tensors).

An extend step replayed as decode rows (``ForwardBatch.row_chunks``) runs both kernels in its
graph: the extend kernel over the step's prefill chunks (fixed tables, its launch sized for the
graph's rows), the decode kernel over the other rows, skipping the chunks'. Every layer option
either kernel honours (window, soft-cap, scale, V width, GQA, latent layout, FP8 pool) so holds there.

Extend over given K/V runs the extend kernel unchanged: it finds keys through a request table, and
a table whose row b reads ``first_b, first_b + 1, ...`` (request b's rows of the given K/V) makes
the given tensors look like a pool."""

from __future__ import annotations

import itertools

import torch

from sglang_core.layers.attention import Attention, AttentionBackend, AttentionLayerSpec, AttentionSpec
from sglang_core.mem.kv_pool import TokenKVPool
from sglang_core.model_executor.forward_batch import ForwardBatch, ForwardMode

from .kernels import SHARED_MEMBERS, SHARED_SPLITS, SharedPrefixes, decode_attention, extend_attention

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
    attends_given_kv = True
    attends_row_chunks = True
    takes_stored_kv = True

    def __init__(self, spec: AttentionSpec, kv_pool: TokenKVPool):
        # Every layer kind runs: any head sizes, V narrower or wider than K, a latent layout (V is
        # a strided view of the K buffer; the kernels read every stride), soft-capping.
        super().__init__(spec, kv_pool)
        # Split partials by split count, sized for the largest batch and never reallocated:
        # captured CUDA graphs keep their addresses.
        self._partials: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._shared: SharedPrefixes | None = None
        if spec.cascade_decode:  # the groups change every step: planned on the host before each replay
            self.plan_before_replay = True
            groups = max(1, spec.max_batch_size // 2)
            self._shared = SharedPrefixes(
                torch.zeros(spec.max_batch_size, dtype=torch.int32, device=spec.device),
                torch.zeros(groups, dtype=torch.int32, device=spec.device),
                torch.full((groups, SHARED_MEMBERS), -1, dtype=torch.int32, device=spec.device))

    def plan(self, batch: ForwardBatch) -> None:
        if batch.mode is ForwardMode.DECODE:
            splits = decode_splits(batch.input_ids.shape[0], self.spec.num_kv_heads)
            if splits not in self._partials:
                s = self.spec
                total = splits + (SHARED_SPLITS if self._shared is not None else 0)
                self._partials[splits] = (
                    torch.empty(s.max_batch_size, s.num_heads, total, s.v_head_dim, dtype=torch.float32, device=s.device),
                    torch.empty(s.max_batch_size, s.num_heads, total, dtype=torch.float32, device=s.device))
            self.num_splits = splits
            if self._shared is not None:
                self._plan_shared(batch)
        else:
            lens = batch.extend_lens_cpu
            self.max_extend_len = max(lens)
            starts = list(itertools.accumulate(lens, initial=0))[:-1]
            self.extend_start = torch.tensor(starts, dtype=torch.int64, device=batch.seq_lens.device)
            self._given_kv_table = None  # built by the first layer that attends over given K/V

    def _given_kv_rows(self, batch: ForwardBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """A request table over given K/V laid out request by request, and the batch's rows in it."""
        if self._given_kv_table is None:
            device = batch.seq_lens.device
            firsts = torch.cumsum(batch.seq_lens, 0) - batch.seq_lens
            positions = torch.arange(max(batch.seq_lens_cpu), device=device)
            self._given_kv_table = (firsts.unsqueeze(1) + positions, torch.arange(batch.batch_size, device=device))
        return self._given_kv_table

    def _plan_shared(self, batch: ForwardBatch) -> None:
        """Fill the cascade buffers from the batch's groups, in tiles of SHARED_MEMBERS requests."""
        shared = self._shared
        # Host staging buffers (device="cpu" said outright: a default device of cuda must not move them).
        host = dict(dtype=torch.int32, device="cpu", pin_memory=shared.kv_start.is_cuda)
        kv_start = torch.zeros(shared.kv_start.shape, **host)
        lens = torch.zeros(shared.lens.shape, **host)
        members = torch.full(shared.members.shape, -1, **host)
        tiles = [(length, rows[i:i + SHARED_MEMBERS]) for length, rows in batch.shared_prefixes
                 for i in range(0, len(rows), SHARED_MEMBERS)]
        tiles = [(length, rows) for length, rows in tiles if len(rows) > 1][:lens.shape[0]]
        for g, (length, rows) in enumerate(tiles):
            lens[g] = length
            members[g, :len(rows)] = torch.tensor(rows, dtype=torch.int32)
            kv_start[list(rows)] = length
        for dst, src in ((shared.kv_start, kv_start), (shared.lens, lens), (shared.members, members)):
            dst.copy_(src, non_blocking=True)

    def _begin(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor | None, layer: Attention, batch: ForwardBatch):
        """Write the new K/V into the pool (unless the layer did: k None); return q as [T, heads, dim],
        the output, K and V buffers."""
        spec = layer.spec
        n = q.shape[0]
        if k is not None:
            self.store_kv(k, v, layer, batch)
        out = torch.empty((n, spec.num_heads, spec.v_head_dim), dtype=q.dtype, device=q.device)
        return (q.view(n, spec.num_heads, spec.head_dim), out, self.kv_pool.k_buffer(layer.layer_id),
                self.kv_pool.v_buffer(layer.layer_id))

    def forward_decode(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor | None, layer: Attention,
                       batch: ForwardBatch) -> torch.Tensor:
        q3, out, k_buffer, v_buffer = self._begin(q, k, v, layer, batch)
        spec = layer.spec
        shared = None if spec.sliding_window else self._shared  # a window may not reach the prefix
        chunks = batch.row_chunks
        if chunks is not None:  # no chunk is longer than the batch: its rows bound the launch
            extend_attention(q3, k_buffer, v_buffer, out, batch.req_to_token, chunks.req_pool_indices,
                             chunks.seq_lens, chunks.prefix_lens, chunks.first_rows, q.shape[0], spec.scaling,
                             spec.sliding_window or 0, logit_cap=spec.logit_cap or 0.0)
        decode_attention(q3, k_buffer, v_buffer, out, batch.req_to_token, batch.req_pool_indices, batch.seq_lens,
                         spec.scaling, spec.sliding_window or 0, self.num_splits, *self._partials[self.num_splits],
                         shared, logit_cap=spec.logit_cap or 0.0, skip_rows=None if chunks is None else chunks.in_chunk)
        return out.view(q.shape[0], -1)

    def forward_extend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor | None, layer: Attention,
                       batch: ForwardBatch) -> torch.Tensor:
        q3, out, k_buffer, v_buffer = self._begin(q, k, v, layer, batch)
        extend_attention(q3, k_buffer, v_buffer, out, batch.req_to_token, batch.req_pool_indices, batch.seq_lens,
                         batch.prefix_lens, self.extend_start, self.max_extend_len, layer.spec.scaling,
                         layer.spec.sliding_window or 0, logit_cap=layer.spec.logit_cap or 0.0)
        return out.view(q.shape[0], -1)

    def forward_extend_given_kv(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: AttentionLayerSpec,
                                batch: ForwardBatch) -> torch.Tensor:
        n = q.shape[0]
        out = torch.empty((n, spec.num_heads, spec.v_head_dim), dtype=q.dtype, device=q.device)
        table, rows = self._given_kv_rows(batch)
        extend_attention(q.view(n, spec.num_heads, spec.head_dim), k, v, out, table, rows, batch.seq_lens,
                         batch.prefix_lens, self.extend_start, self.max_extend_len, spec.scaling,
                         spec.sliding_window or 0, logit_cap=spec.logit_cap or 0.0)
        return out.view(n, -1)

"""Attention with ``torch.nn.functional.scaled_dot_product_attention`` over the paged KV pool.

``plan`` splits the batch into groups once per step and, for each group, builds a padded
``[group, max_len]`` table of KV slots and, where needed, a boolean mask (causal offset by the
cached prefix, padding, sliding window). Each layer runs one SDPA per group.

- Extend: one group per request, so no request is padded to another's length. A request with no
  cached prefix attends over its own new K/V with SDPA's causal kernel (no gather, no mask, the
  upper triangle skipped); one with a prefix gathers its keys from the pool and uses a mask.
- Decode: the batch is sorted by length and cut into a few groups, so short requests are not
  padded to the longest. The query heads sharing a KV head become that head's query rows.

Extend over given K/V (``forward_extend_given_kv``) runs the same per-request groups over rows of
the given tensors instead of the pool's.

Every layer kind runs here: value heads narrower or wider than key heads, a latent layout (the
values are the first columns of the stored latents), logit soft-capping (which SDPA has no
argument for, so a capped layer computes its softmax in plain torch).

On CPU the gather, not the attention math, is the decode cost; gathers land in a reused work
space because a fresh multi-MB tensor per layer costs more in page faults than the copy itself.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from sglang_core.layers.attention import Attention, AttentionBackend, AttentionLayerSpec, AttentionSpec, KVLayout
from sglang_core.mem.kv_pool import TokenKVPool
from sglang_core.model_executor.forward_batch import ForwardBatch, ForwardMode

# A decode group is never smaller than this, so small batches stay one SDPA call.
MIN_DECODE_GROUP = 16
MAX_DECODE_GROUPS = 4


@dataclass
class _Group:
    rows: torch.Tensor | None  # positions in the batch, or None for the whole batch in order
    kv_index: torch.Tensor | None  # [b, max_len] KV slot of each key position (slot 0 pads); None: own K/V
    q_pos: torch.Tensor  # [b, max_q] position of each query
    seq_lens: torch.Tensor  # [b]
    uniform: bool  # every row has the same length and one query: no mask needed
    new_tokens: tuple[int, int] = (0, 0)  # extend: (first row in the batch's new tokens, count)
    masks: dict[int | None, torch.Tensor | None] = field(default_factory=dict)  # by sliding window

    def mask(self, window: int | None) -> torch.Tensor | None:
        if window not in self.masks:
            self.masks[window] = None if (self.uniform and window is None) else self._build(window)
        return self.masks[window]

    def _build(self, window: int | None) -> torch.Tensor:
        q_pos = self.q_pos.unsqueeze(2)  # [b, max_q, 1]
        key_len = self.kv_index.shape[1] if self.kv_index is not None else int(self.seq_lens.max())
        k_pos = torch.arange(key_len, device=q_pos.device).view(1, 1, -1)
        mask = (k_pos <= q_pos) & (k_pos < self.seq_lens.view(-1, 1, 1))
        if window is not None:
            mask &= k_pos > q_pos - window
        # A padded query row must see at least one key, or SDPA returns NaN for it.
        mask[..., 0] |= ~mask.any(-1)
        return mask.unsqueeze(1)  # [b, 1, max_q, max_len]


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: AttentionLayerSpec, mask: torch.Tensor | None,
           causal: bool = False) -> torch.Tensor:
    """Softmax attention of q [b, heads, L, head_dim] over k [b, kv_heads, S, head_dim] and
    v [b, kv_heads, S, v_head_dim] -> [b, heads, L, v_head_dim]: SDPA, or with a soft-cap
    the same math written out (SDPA cannot cap logits)."""
    gqa = q.shape[1] != k.shape[1]
    if layer.logit_cap is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=layer.scaling,
                                              enable_gqa=gqa)
    if gqa:
        group = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    logits = (q @ k.transpose(-1, -2)).float() * layer.scaling
    logits = layer.logit_cap * torch.tanh(logits / layer.logit_cap)
    if causal:
        length, keys = logits.shape[-2:]
        mask = torch.ones(length, keys, dtype=torch.bool, device=q.device).tril(keys - length)
    if mask is not None:
        logits = logits.masked_fill(~mask, float("-inf"))
    return (logits.softmax(-1).to(v.dtype) @ v)


class TorchNativeBackend(AttentionBackend):
    attends_given_kv = True

    def __init__(self, spec: AttentionSpec, kv_pool: TokenKVPool):
        super().__init__(spec, kv_pool)
        empty = torch.empty(0, device=spec.device, dtype=kv_pool.dtype)
        self._workspace = (empty, empty)
        # Features per gathered K row and V row, the widest layer's: the work space serves every layer.
        self._widths = (max(layer.num_kv_heads * layer.head_dim for layer in spec.layers),
                        max(layer.num_kv_heads * layer.v_head_dim for layer in spec.layers))

    def as_stored(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` rounded as the pool stores it (FP8), so every key and value attended to is the
        stored one, as when it is read back from the pool."""
        pool_dtype = self.kv_pool.dtype
        return x if pool_dtype == x.dtype else x.to(pool_dtype).to(x.dtype)

    def plan(self, batch: ForwardBatch) -> None:
        rows_of_batch = batch.req_to_token[batch.req_pool_indices]
        if batch.mode is ForwardMode.DECODE:
            self.q_index = None
            self.max_q = 1
            self.groups = [self._decode_group(batch, rows, rows_of_batch) for rows in self._split(batch)]
        else:
            firsts = [0, *itertools.accumulate(batch.extend_lens_cpu)]
            self.groups = [self._extend_group(batch, i, firsts[i], rows_of_batch) for i in range(batch.batch_size)]
        largest = max((g.kv_index.numel() for g in self.groups if g.kv_index is not None), default=0)
        if any(space.numel() < largest * width for space, width in zip(self._workspace, self._widths)):
            # flat, so each layer carves its own shape out of it
            self._workspace = tuple(torch.empty(largest * width, dtype=self.kv_pool.dtype, device=self.spec.device)
                                    for width in self._widths)

    @staticmethod
    def _split(batch: ForwardBatch) -> list[list[int] | None]:
        """Batch positions of each decode group, shortest requests first; [None] for one group."""
        size = batch.batch_size
        count = min(MAX_DECODE_GROUPS, size // MIN_DECODE_GROUP)
        if count <= 1:
            return [None]
        order = sorted(range(size), key=batch.seq_lens_cpu.__getitem__)
        step = -(-size // count)
        return [order[i:i + step] for i in range(0, size, step)]

    @staticmethod
    def _decode_group(batch: ForwardBatch, rows: list[int] | None, rows_of_batch: torch.Tensor) -> _Group:
        lens = batch.seq_lens_cpu if rows is None else [batch.seq_lens_cpu[r] for r in rows]
        index = None if rows is None else torch.tensor(rows, device=batch.seq_lens.device)
        seq_lens = batch.seq_lens if index is None else batch.seq_lens[index]
        table = rows_of_batch if index is None else rows_of_batch[index]
        return _Group(index, table[:, :max(lens)], (seq_lens - 1).unsqueeze(1), seq_lens,
                      uniform=min(lens) == max(lens))

    @staticmethod
    def _extend_group(batch: ForwardBatch, i: int, first: int, rows_of_batch: torch.Tensor) -> _Group:
        """One request of an extend batch. Without a cached prefix its keys are its own new tokens
        (no gather, and SDPA's causal kernel skips the masked half)."""
        start, end = batch.prefix_lens_cpu[i], batch.seq_lens_cpu[i]
        device = batch.seq_lens.device
        table = rows_of_batch[i:i + 1, :end] if start else None
        q_pos = torch.arange(start, end, device=device).unsqueeze(0)
        return _Group(None, table, q_pos, batch.seq_lens[i:i + 1], uniform=False, new_tokens=(first, end - start))

    def _gather(self, layer: Attention, group: _Group) -> tuple[torch.Tensor, torch.Tensor]:
        """K [b, kv_heads, max_len, head_dim] and V [b, kv_heads, max_len, v_head_dim] of the
        group's requests, in the work space."""
        spec, pool = layer.spec, self.kv_pool
        b, max_len = group.kv_index.shape
        flat = group.kv_index.reshape(-1)
        kvh = spec.num_kv_heads
        latent = spec.kv_layout is KVLayout.LATENT
        buffers = (pool.k_buffer(layer.layer_id),) if latent else (pool.k_buffer(layer.layer_id),
                                                                   pool.v_buffer(layer.layer_id))
        out = []
        for buffer, space in zip(buffers, self._workspace):
            width = buffer.shape[-1]
            gathered = torch.index_select(buffer.view(-1, kvh * width), 0, flat,
                                          out=space[:flat.numel() * kvh * width].view(-1, kvh * width))
            # .to: the pool may store K/V narrower than the compute dtype.
            out.append(gathered.view(b, max_len, kvh, width).transpose(1, 2).to(self.spec.dtype))
        if latent:  # the values are the latents' first columns
            out.append(out[0][..., :spec.v_head_dim])
        return out[0], out[1]

    def forward_decode(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor | None, layer: Attention,
                       batch: ForwardBatch) -> torch.Tensor:
        self.store_kv(k, v, layer, batch)
        spec = layer.spec
        kvh, group_size = spec.num_kv_heads, spec.num_heads // spec.num_kv_heads
        out = q.new_empty(q.shape[0], spec.num_heads * spec.v_head_dim)
        for group in self.groups:
            q_group = q if group.rows is None else q[group.rows]
            keys, values = self._gather(layer, group)
            # One query per request: plain attention with the query heads of each KV head as its rows.
            result = attend(q_group.view(-1, kvh, group_size, spec.head_dim), keys, values, spec,
                            group.mask(spec.sliding_window)).reshape(q_group.shape[0], -1)
            if group.rows is None:
                return result
            out[group.rows] = result
        return out

    def forward_extend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor | None, layer: Attention,
                       batch: ForwardBatch) -> torch.Tensor:
        k3, v3 = self.store_kv(k, v, layer, batch)

        def keys_values(i: int, group: _Group) -> tuple[torch.Tensor, torch.Tensor]:
            if group.kv_index is not None:
                return self._gather(layer, group)
            first, count = group.new_tokens  # no cached prefix: its own new K/V, as stored
            return tuple(self.as_stored(x[first:first + count]).transpose(0, 1).unsqueeze(0) for x in (k3, v3))

        return self._extend(q, layer.spec, keys_values)

    def forward_extend_given_kv(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: AttentionLayerSpec,
                                batch: ForwardBatch) -> torch.Tensor:
        firsts = list(itertools.accumulate(batch.seq_lens_cpu, initial=0))  # request i's rows: firsts[i:i+2]

        def keys_values(i: int, group: _Group) -> tuple[torch.Tensor, torch.Tensor]:
            rows = slice(firsts[i], firsts[i + 1])
            return k[rows].transpose(0, 1).unsqueeze(0), v[rows].transpose(0, 1).unsqueeze(0)

        return self._extend(q, spec, keys_values)

    def _extend(self, q: torch.Tensor, spec: AttentionLayerSpec,
                keys_values: Callable[[int, _Group], tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """Each request's new tokens over the keys and values ``keys_values`` gives for it (its
        index and group -> [1, kv_heads, keys, width]: the cached prefix and the new tokens, or
        these alone)."""
        heads, d = spec.num_heads, spec.head_dim
        out = q.new_empty(q.shape[0], heads * spec.v_head_dim)
        for i, group in enumerate(self.groups):
            first, count = group.new_tokens
            q_req = q[first:first + count].view(count, heads, d).transpose(0, 1).unsqueeze(0)
            keys, values = keys_values(i, group)
            # A prefix shifts the causal diagonal (SDPA's is_causal aligns it top-left): a mask.
            needs_mask = group.kv_index is not None or spec.sliding_window is not None
            mask = group.mask(spec.sliding_window) if needs_mask else None
            result = attend(q_req, keys, values, spec, mask, causal=mask is None)
            out[first:first + count] = result[0].transpose(0, 1).reshape(count, -1)
        return out

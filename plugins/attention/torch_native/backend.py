"""Attention with ``torch.nn.functional.scaled_dot_product_attention`` over the paged pool.

``plan`` builds, once per batch, a padded ``[batch, max_len]`` table of each request's KV slots
and the boolean mask (causal offset by the cached prefix, padding, sliding window); each layer
then gathers its K/V through that table and runs one batched SDPA call.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sglang_core.layers.attention import Attention, AttentionBackend
from sglang_core.model_executor.forward_batch import ForwardBatch, ForwardMode


class TorchNativeBackend(AttentionBackend):
    def plan(self, batch: ForwardBatch) -> None:
        device = batch.seq_lens.device
        max_len = max(batch.seq_lens_cpu)
        self.kv_index = batch.req_to_token[batch.req_pool_indices, :max_len]
        key_pos = torch.arange(max_len, device=device)
        if batch.mode is ForwardMode.DECODE:
            self.max_q = 1
            self.q_pos = (batch.seq_lens - 1).unsqueeze(1)  # [B, 1]
            self.q_index = None
        else:
            extend_lens = batch.seq_lens - batch.prefix_lens
            self.max_q = max(batch.extend_lens_cpu)
            offsets = torch.arange(self.max_q, device=device)
            self.q_pos = batch.prefix_lens.unsqueeze(1) + offsets  # [B, max_q]
            q_real = offsets.unsqueeze(0) < extend_lens.unsqueeze(1)
            # Position of each ragged new token inside the padded [B * max_q] layout.
            self.q_index = q_real.flatten().nonzero().squeeze(1)
        self.key_pos = key_pos
        self.mask = self._mask(None, batch)
        self.window_masks: dict[int, torch.Tensor] = {}

    def _mask(self, window: int | None, batch: ForwardBatch) -> torch.Tensor:
        q_pos = self.q_pos.unsqueeze(2)  # [B, max_q, 1]
        k_pos = self.key_pos.view(1, 1, -1)
        mask = (k_pos <= q_pos) & (k_pos < batch.seq_lens.view(-1, 1, 1))
        if window is not None:
            mask &= k_pos > q_pos - window
        # A padded query row must see at least one key, or SDPA returns NaN for it.
        mask[..., 0] |= ~mask.any(-1)
        return mask.unsqueeze(1)  # [B, 1, max_q, max_len]

    def _layer_mask(self, layer: Attention, batch: ForwardBatch) -> torch.Tensor:
        if layer.sliding_window is None:
            return self.mask
        if layer.sliding_window not in self.window_masks:
            self.window_masks[layer.sliding_window] = self._mask(layer.sliding_window, batch)
        return self.window_masks[layer.sliding_window]

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: Attention,
                batch: ForwardBatch) -> torch.Tensor:
        pool = batch.kv_pool
        n_tokens = q.shape[0]
        pool.store(layer.layer_id, batch.out_cache_loc,
                   k.view(n_tokens, layer.num_kv_heads, layer.head_dim),
                   v.view(n_tokens, layer.num_kv_heads, layer.head_dim))
        keys = pool.k_buffers[layer.layer_id][self.kv_index].transpose(1, 2)  # [B, kv_heads, L, D]
        values = pool.v_buffers[layer.layer_id][self.kv_index].transpose(1, 2)
        bsz = batch.batch_size
        q = q.view(n_tokens, layer.num_heads, layer.head_dim)
        if self.q_index is None:
            padded = q.unsqueeze(1)
        else:
            padded = q.new_zeros(bsz * self.max_q, layer.num_heads, layer.head_dim)
            padded[self.q_index] = q
            padded = padded.view(bsz, self.max_q, layer.num_heads, layer.head_dim)
        out = F.scaled_dot_product_attention(
            padded.transpose(1, 2), keys.to(q.dtype), values.to(q.dtype),
            attn_mask=self._layer_mask(layer, batch), scale=layer.scaling,
            enable_gqa=layer.num_heads != layer.num_kv_heads,
        )
        out = out.transpose(1, 2).reshape(bsz * self.max_q, layer.num_heads * layer.head_dim)
        return out if self.q_index is None else out[self.q_index]

    forward_extend = _attend
    forward_decode = _attend

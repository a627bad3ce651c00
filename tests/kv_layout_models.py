"""A test-only model plugin whose attention layers use KV layouts no built-in model uses.

- ``KVLayoutWideValueForCausalLM``: value heads wider than key heads (``v_head_dim`` !=
  ``head_dim``), GQA, rotary on the first ``rotary_dim`` dims of q and k.
- ``KVLayoutLatentForCausalLM``: one latent vector per token (``kv_layout: latent``), read whole
  as the key and its first ``v_head_dim`` values as the value, shared by all query heads, as
  Multi-head Latent Attention's absorbed decode does; rotary on the latent's first dims.

Each layer: ``h += o_proj(attention(norm(h)))``; then a final norm and the LM head. Written only
on the core's public layers and ``Attention``: the point is that such a model needs no core edit.
``tests/test_kv_layouts.py`` registers it through a fake distribution's entry point and checks it
against a float64 model written out in the test.
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from sglang_core.hookspecs import hookimpl
from sglang_core.layers.attention import Attention, KVLayout
from sglang_core.layers.norm import RMSNorm
from sglang_core.layers.parallel import ColumnParallelLinear, ParallelLMHead, RowParallelLinear, VocabParallelEmbedding
from sglang_core.layers.rotary import RotaryEmbedding, rope_from_config
from sglang_core.model_executor.forward_batch import ForwardBatch
from sglang_core.model_executor.model_api import ModelContext, load_by_name


class _Layer(nn.Module):
    def __init__(self, config, ctx: ModelContext, layer_id: int, rotary: RotaryEmbedding, latent: bool):
        super().__init__()
        hidden, heads = config.hidden_size, config.num_attention_heads
        self.latent = latent
        self.kv_heads = 1 if latent else config.num_key_value_heads
        self.head_dim, self.v_head_dim = config.head_dim, config.v_head_dim
        linear = dict(bias=False, tp=ctx.tp, params_dtype=ctx.dtype)
        self.norm = RMSNorm(hidden, config.rms_norm_eps, ctx.dtype)
        self.q_proj = ColumnParallelLinear(hidden, heads * self.head_dim, **linear)
        self.k_proj = ColumnParallelLinear(hidden, self.kv_heads * self.head_dim, **linear)
        self.v_proj = None if latent else ColumnParallelLinear(hidden, self.kv_heads * self.v_head_dim, **linear)
        self.o_proj = RowParallelLinear(heads * self.v_head_dim, hidden, **linear)
        self.rotary = rotary
        self.attn = Attention(layer_id, heads, self.kv_heads, self.head_dim, self.head_dim**-0.5,
                              v_head_dim=self.v_head_dim, kv_layout=KVLayout.LATENT if latent else KVLayout.SEPARATE)

    def forward(self, positions: torch.Tensor, h: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        x = self.norm(h)
        n = x.shape[0]
        q, k = self.rotary(positions, self.q_proj(x).view(n, -1, self.head_dim),
                           self.k_proj(x).view(n, -1, self.head_dim))
        v = None if self.latent else self.v_proj(x)
        return h + self.o_proj(self.attn(q.reshape(n, -1), k.reshape(n, -1), v, batch))


class _KVLayoutLM(nn.Module):
    latent = False

    def __init__(self, config, ctx: ModelContext):
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size, ctx.tp, ctx.dtype)
        rotary = rope_from_config(config, config.head_dim)  # config.rotary_dim: the first dims only
        self.layers = nn.ModuleList(_Layer(config, ctx, i, rotary, self.latent)
                                    for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, ctx.dtype)
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size, ctx.tp, ctx.dtype)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        h = self.embed_tokens(input_ids)
        for layer in self.layers:
            h = layer(positions, h, batch)
        return self.norm(h)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head.project(hidden).float()

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        params = dict(self.named_parameters())
        missing = set(params) - load_by_name(params, weights, stacked={})
        if missing:
            raise ValueError(f"checkpoint lacks {sorted(missing)}")


class KVLayoutWideValueForCausalLM(_KVLayoutLM):
    latent = False


class KVLayoutLatentForCausalLM(_KVLayoutLM):
    latent = True


@hookimpl
def register_models(register) -> None:
    register("KVLayoutWideValueForCausalLM", KVLayoutWideValueForCausalLM)
    register("KVLayoutLatentForCausalLM", KVLayoutLatentForCausalLM)

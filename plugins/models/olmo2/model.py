"""OLMo 2 (``Olmo2ForCausalLM``): Llama's blocks arranged post-norm, with q/k norms.

* Each layer normalises its sublayers' outputs, not their inputs:
  ``h = h + post_attention_layernorm(attn(h)); h = h + post_feedforward_layernorm(mlp(h))``;
  the final norm is as Llama's.
* q and k are RMS-normalised over the whole projection (all heads together: ``q_norm`` has
  ``num_attention_heads * head_dim`` weights, ``k_norm`` ``num_key_value_heads * head_dim``)
  before the rotary; eps ``rms_norm_eps`` everywhere.
* ``attention_bias``: biases on q/k/v/o or none; the MLP has none; no sliding window.
* Every norm (the two per layer, q/k and the final one) multiplies by its weight in float32 and
  rounds once, not Llama's rounding of the normalised input first (``scale_in_float32``).
"""

from __future__ import annotations

import torch
from torch import nn

from sglang_core.layers.attention_spec import HeadShape
from sglang_core.layers.norm import RMSNorm, SplitHeadsRMSNorm
from sglang_core.layers.rotary import RotaryEmbedding
from sglang_core.layers.transformer import DecoderLM
from sglang_core.model_executor.forward_batch import ForwardBatch
from sglang_core.model_executor.model_api import ModelContext


class PostNormDecoderLayer(nn.Module):
    """``h += post_attention_layernorm(attn(h)); h += post_feedforward_layernorm(mlp(h))``.

    It adds its outputs into ``h`` itself and returns residual None, so ``DecoderStack`` hands the
    next layer (and the final norm) the whole hidden state and no separate residual."""

    def __init__(self, self_attn: nn.Module, mlp: nn.Module, post_attention_layernorm: nn.Module,
                 post_feedforward_layernorm: nn.Module):
        super().__init__()
        self.self_attn, self.mlp = self_attn, mlp
        self.post_attention_layernorm = post_attention_layernorm
        self.post_feedforward_layernorm = post_feedforward_layernorm

    def forward(self, positions: torch.Tensor, h: torch.Tensor, residual: None,
                batch: ForwardBatch) -> tuple[torch.Tensor, None]:
        h = h + self.post_attention_layernorm(self.self_attn(positions, h, batch))
        return h + self.post_feedforward_layernorm(self.mlp(h)), None


class Olmo2ForCausalLM(DecoderLM):
    mlp_bias_field = None  # transformers' OLMo 2 MLP has no bias, whatever config.json says

    def make_attention(self, config, ctx: ModelContext, layer_id: int, rotary: RotaryEmbedding | None,
                       **overrides) -> nn.Module:
        shape = HeadShape.from_config(config)
        eps = config.rms_norm_eps

        def qk_norm(heads: int) -> SplitHeadsRMSNorm:
            return SplitHeadsRMSNorm(heads, shape.head_dim, eps, ctx.dtype, ctx.tp, scale_in_float32=True)

        options = {"sliding_window": None, "qk_norm_per_head": False,
                   "q_norm": qk_norm(shape.num_heads), "k_norm": qk_norm(shape.num_kv_heads), **overrides}
        return super().make_attention(config, ctx, layer_id, rotary, **options)

    def make_norm(self, config, ctx: ModelContext) -> nn.Module:
        return RMSNorm(config.hidden_size, config.rms_norm_eps, ctx.dtype, scale_in_float32=True)

    def make_layer(self, config, ctx: ModelContext, layer_id: int, rotary: RotaryEmbedding | None) -> nn.Module:
        return PostNormDecoderLayer(self.make_attention(config, ctx, layer_id, rotary),
                                    self.make_mlp(config, ctx, layer_id), self.make_norm(config, ctx),
                                    self.make_norm(config, ctx))

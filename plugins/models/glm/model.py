"""GLM-4 in transformers' format: ``GlmForCausalLM`` (GLM-4-9B) and ``Glm4ForCausalLM``
(GLM-4-0414, GLM-Z1).

Llama's pre-norm layers with RMSNorm and three differences: biases on q, k and v (``attention_bias``;
never on the output projection or the MLP); rotary only on the first ``partial_rotary_factor`` of
each head (a half in every GLM-4 checkpoint), turning interleaved pairs of dims (GPT-J's layout);
and the MLP's gate and up projections stored as one ``gate_up_proj`` tensor, gate first, which
loads straight into the fused projection.

``Glm4ForCausalLM`` adds "sandwich" norms: ``post_self_attn_layernorm`` over the attention output
and ``post_mlp_layernorm`` over the MLP output, each before its residual add.
"""

from __future__ import annotations

import torch
from torch import nn

from sglang_core.layers.attention_spec import HeadShape
from sglang_core.layers.rotary import rope_from_config
from sglang_core.layers.transformer import DecoderLM, GatedMLP, layer_prefix, norm_with_residual
from sglang_core.model_executor.forward_batch import ForwardBatch


class GlmForCausalLM(DecoderLM):
    def make_rotary(self, config, ctx):
        return rope_from_config(config, HeadShape.from_config(config).head_dim, interleaved=True,
                                max_position=ctx.max_position)

    def make_attention(self, config, ctx, layer_id, rotary, **overrides):
        options = {"qkv_bias": config.attention_bias, "o_bias": False, "sliding_window": None}
        return super().make_attention(config, ctx, layer_id, rotary, **{**options, **overrides})

    def make_mlp(self, config, ctx, layer_id):
        return GatedMLP(ctx, f"{layer_prefix(layer_id)}.mlp", config.hidden_size, config.intermediate_size,
                        config.hidden_act)


class SandwichNormLayer(nn.Module):
    """``h += post_attn_norm(attn(norm1(h))); h += post_mlp_norm(mlp(norm2(h)))``, GLM-4-0414's
    layer; the residual add stays fused into the next norm as in ``DecoderLayer``."""

    def __init__(self, self_attn: nn.Module, mlp: nn.Module, input_layernorm: nn.Module,
                 post_self_attn_layernorm: nn.Module, post_attention_layernorm: nn.Module,
                 post_mlp_layernorm: nn.Module):
        super().__init__()
        self.self_attn, self.mlp = self_attn, mlp
        self.input_layernorm, self.post_self_attn_layernorm = input_layernorm, post_self_attn_layernorm
        self.post_attention_layernorm, self.post_mlp_layernorm = post_attention_layernorm, post_mlp_layernorm

    def forward(self, positions: torch.Tensor, x: torch.Tensor, residual: torch.Tensor | None,
                batch: ForwardBatch) -> tuple[torch.Tensor, torch.Tensor]:
        x, residual = norm_with_residual(self.input_layernorm, x, residual)
        x = self.post_self_attn_layernorm(self.self_attn(positions, x, batch))
        x, residual = self.post_attention_layernorm(x, residual)
        return self.post_mlp_layernorm(self.mlp(x)), residual


class Glm4ForCausalLM(GlmForCausalLM):
    def make_layer(self, config, ctx, layer_id, rotary):
        return SandwichNormLayer(self.make_attention(config, ctx, layer_id, rotary),
                                 self.make_mlp(config, ctx, layer_id), *(self.make_norm(config, ctx) for _ in range(4)))

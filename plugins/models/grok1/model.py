"""Grok-1 (``Grok1ModelForCausalLM``, custom code shipped with the PyTorch checkpoints as
modeling_grok1.py, hpcai-tech/grok-1; transformers has no class for it).

Every layer is a sandwich (``SandwichDecoderLayer``): RMSNorms before and after attention and
before and after the MoE block, whose output is normed again before each residual add. Beyond
that:

* the token embeddings are multiplied by ``embedding_multiplier_scale`` and the logits by
  ``output_multiplier_scale``;
* attention logits are ``q.k * attn_output_multiplier`` (which replaces ``1 / sqrt(head_dim)``),
  soft-capped to ``max_attn_value * tanh(logits / max_attn_value)``;
* every MLP is an MoE block of ``num_experts`` GeGLU experts (erf GELU whatever ``hidden_act``
  says) of width ``intermediate_size``; the router's softmax top ``num_experts_per_tok``
  probabilities weight them as they are, not renormalised;
* rotary is Llama's with base 10000: modeling_grok1.py reads neither ``rope_theta`` nor
  ``rope_scaling``.

Checkpoint names: ``attn`` for the attention, ``moe_block`` for the MoE with experts'
``linear`` (gate), ``linear_v`` (up), ``linear_1`` (down), and norms ``{pre,post}_{attn,moe}_norm``
whose weights are named ``scale``.
"""

from __future__ import annotations

from torch import nn

from sglang_core.layers.attention_spec import HeadShape
from sglang_core.layers.moe import MoE
from sglang_core.layers.moe_router import Routing
from sglang_core.layers.rotary import RotaryEmbedding
from sglang_core.layers.transformer import DecoderLM, SandwichDecoderLayer, layer_prefix
from sglang_core.model_executor.model_api import ModelContext

ROPE_BASE = 10000.0


class Grok1ModelForCausalLM(DecoderLM):
    # Grok1Config's defaults (configuration_grok1.py), for fields a config.json may omit.
    config_defaults = {"attn_output_multiplier": 0.08838834764831845, "max_attn_value": 30.0,
                       "embedding_multiplier_scale": 78.38367176906169, "output_multiplier_scale": 0.5773502691896257,
                       "rms_norm_eps": 1e-5, "tie_word_embeddings": True, "num_experts": 8, "num_experts_per_tok": 2,
                       "num_key_value_heads": 8, "max_position_embeddings": 8192}
    checkpoint_renames = (
        (r"\.attn\.", ".self_attn."),
        (r"\.moe_block\.", ".mlp."),
        (r"\.pre_attn_norm\.", ".input_layernorm."),
        (r"\.post_attn_norm\.", ".post_attention_layernorm."),
        (r"\.pre_moe_norm\.", ".pre_feedforward_layernorm."),
        (r"\.post_moe_norm\.", ".post_feedforward_layernorm."),
        (r"norm\.scale$", "norm.weight"),
    )
    expert_parts = {"linear": "gate", "linear_v": "up", "linear_1": "down"}

    def __init__(self, config, ctx: ModelContext):
        super().__init__(config, ctx)
        self.model.embedding_multiplier = float(config.embedding_multiplier_scale)
        self.logit_scale = float(config.output_multiplier_scale)

    def make_rotary(self, config, ctx: ModelContext) -> RotaryEmbedding:
        return RotaryEmbedding(HeadShape.from_config(config).head_dim,
                               ctx.max_position or config.max_position_embeddings, ROPE_BASE)

    def make_attention(self, config, ctx, layer_id, rotary, **overrides):
        cap = float(config.max_attn_value)
        if cap <= 0:
            raise ValueError(f"max_attn_value: the attention logit cap must be positive, got {cap}")
        # No biases and no sliding window: modeling_grok1.py has neither, whatever the config says.
        return super().make_attention(config, ctx, layer_id, rotary, qkv_bias=False, o_bias=False,
                                      sliding_window=None, scaling=float(config.attn_output_multiplier),
                                      logit_cap=cap, **overrides)

    def make_mlp(self, config, ctx: ModelContext, layer_id: int) -> nn.Module:
        routing = Routing(config.num_experts_per_tok, renormalize=False)
        return MoE(config.hidden_size, config.num_experts, config.intermediate_size, routing, "gelu", ctx.tp,
                   ctx.dtype, quant_method=ctx.experts_method_for(f"{layer_prefix(layer_id)}.mlp.experts"))

    def make_layer(self, config, ctx, layer_id, rotary):
        return SandwichDecoderLayer(self.make_attention(config, ctx, layer_id, rotary),
                                    self.make_mlp(config, ctx, layer_id),
                                    *(self.make_norm(config, ctx) for _ in range(4)))

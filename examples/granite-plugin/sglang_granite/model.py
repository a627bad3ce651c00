"""IBM Granite on sglang-core, built from the core's decoder.

Granite (``GraniteForCausalLM`` in transformers) is Llama plus four scalars from its config:

* ``embedding_multiplier``: token embeddings are multiplied by it before the first layer;
* ``residual_multiplier``: each sublayer's output (attention, MLP) is multiplied by it before it
  is added to the residual stream: ``h = h + m * sublayer(norm(h))``;
* ``attention_multiplier``: the softmax scale, used instead of ``1 / sqrt(head_dim)``;
* ``logits_scaling``: the LM head's logits are divided by it.

The core's ``DecoderLM`` builds Llama's arrangement by default and has a place for each scalar;
weight names are Llama's, which its loader maps by default.
"""

from __future__ import annotations

from sglang_core.layers.transformer import DecoderLM
from sglang_core.model_executor.model_api import ModelContext


class GraniteForCausalLM(DecoderLM):
    def __init__(self, config, ctx: ModelContext):
        super().__init__(config, ctx)
        self.model.embedding_multiplier = float(config.embedding_multiplier)
        self.logit_scale = 1.0 / float(config.logits_scaling)

    def make_attention(self, config, ctx, layer_id, rotary, **overrides):
        return super().make_attention(config, ctx, layer_id, rotary, scaling=float(config.attention_multiplier),
                                      **overrides)

    def make_layer(self, config, ctx, layer_id, rotary):
        layer = super().make_layer(config, ctx, layer_id, rotary)
        layer.residual_multiplier = float(config.residual_multiplier)
        return layer

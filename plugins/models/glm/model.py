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

from sglang_core.layers.attention_spec import HeadShape
from sglang_core.layers.rotary import rope_from_config
from sglang_core.layers.transformer import DecoderLM, GatedMLP, SandwichDecoderLayer, layer_prefix


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


class Glm4ForCausalLM(GlmForCausalLM):
    # GLM-4-0414's norm names onto the core's sandwich layer's (the first rename before the second
    # reuses its target name).
    checkpoint_renames = ((r"\.post_attention_layernorm\.", ".pre_feedforward_layernorm."),
                          (r"\.post_self_attn_layernorm\.", ".post_attention_layernorm."),
                          (r"\.post_mlp_layernorm\.", ".post_feedforward_layernorm."))

    def make_layer(self, config, ctx, layer_id, rotary):
        return SandwichDecoderLayer(self.make_attention(config, ctx, layer_id, rotary),
                                 self.make_mlp(config, ctx, layer_id), *(self.make_norm(config, ctx) for _ in range(4)))

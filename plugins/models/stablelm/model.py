"""StableLM (``StableLmForCausalLM``): Llama's layers with LayerNorm (weight and bias) instead of
RMSNorm and rotary on the first ``partial_rotary_factor`` of each head, plus three config switches:

* ``use_qkv_bias``: biases on the q/k/v projections (StableLM 2 1.6B); the output projection and
  the MLP have none;
* ``qk_layernorm``: a LayerNorm without bias over each head of q and of k, one per head, before
  rotary (StableLM 2 12B); checkpoints store each head's scale as ``q_layernorm.norms.<h>.weight``;
* ``use_parallel_residual``: attention and MLP read the same normed input and add to the residual
  together (``h += attn(ln(h)) + mlp(ln(h))``), with no ``post_attention_layernorm``.
"""

from __future__ import annotations

from sglang_core.layers.attention_spec import HeadShape
from sglang_core.layers.norm import LayerNorm
from sglang_core.layers.transformer import (
    QKV_GATE_UP,
    DecoderLM,
    GatedMLP,
    ParallelDecoderLayer,
    headwise_qk_norms,
    layer_prefix,
)
from sglang_core.model_executor.model_api import ModelContext


class StableLmForCausalLM(DecoderLM):
    partial_rotary = True

    def __init__(self, config, ctx: ModelContext):
        super().__init__(config, ctx)
        if config.qk_layernorm:
            # Head h's scale ``<q|k>_layernorm.norms.<h>.weight`` loads into row h of ``<q|k>_norm.weight``.
            shape = HeadShape.from_config(config)
            per_head = {f"{which}_layernorm.norms.{h}": (f"{which}_norm", h)
                        for which, heads in (("q", shape.num_heads), ("k", shape.num_kv_heads)) for h in range(heads)}
            self.stacked_params = {**QKV_GATE_UP, **per_head}

    def make_norm(self, config, ctx):
        return LayerNorm(config.hidden_size, config.layer_norm_eps, bias=True, params_dtype=ctx.dtype)

    def make_attention(self, config, ctx, layer_id, rotary, **overrides):
        options = {"qkv_bias": config.use_qkv_bias, "o_bias": False, "sliding_window": None}
        if config.qk_layernorm:
            options.update(headwise_qk_norms(config, ctx, config.layer_norm_eps))
        return super().make_attention(config, ctx, layer_id, rotary, **{**options, **overrides})

    def make_mlp(self, config, ctx, layer_id):
        return GatedMLP(ctx, f"{layer_prefix(layer_id)}.mlp", config.hidden_size, config.intermediate_size,
                        config.hidden_act)

    def make_layer(self, config, ctx, layer_id, rotary):
        if not config.use_parallel_residual:
            return super().make_layer(config, ctx, layer_id, rotary)
        return ParallelDecoderLayer(self.make_attention(config, ctx, layer_id, rotary),
                                    self.make_mlp(config, ctx, layer_id), self.make_norm(config, ctx))

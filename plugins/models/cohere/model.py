"""Cohere's Command-R family: ``CohereForCausalLM`` (Command-R, R+) and ``Cohere2ForCausalLM``
(Command R7B, Command A).

Both: each layer runs attention and the gated MLP side by side on one LayerNorm (weight only, no
bias) and adds both to the residual; rotary turns interleaved pairs of dims (GPT-J's layout) over
the whole head; ``attention_bias`` puts biases on q, k, v and the output projection; the logits
are multiplied by ``logit_scale``; the LM head is tied to the embedding by default.

``CohereForCausalLM`` adds ``use_qk_norm``: a LayerNorm without bias over each head of q and k
before rotary, with a scale per head (``q_norm.weight`` is ``[heads, head_dim]``).

``Cohere2ForCausalLM`` interleaves sliding-window and full layers (``layer_types``): a
``sliding_attention`` layer attends over the last ``sliding_window`` tokens with rotary, a
``full_attention`` layer over every token with no position encoding at all. A sliding layer needs a
``sliding_window`` (transformers cannot build its mask without one).
"""

from __future__ import annotations

from sglang_core.layers.attention_spec import HeadShape
from sglang_core.layers.norm import LayerNorm
from sglang_core.layers.rotary import rope_from_config
from sglang_core.layers.transformer import DecoderLM, GatedMLP, ParallelDecoderLayer, headwise_qk_norms, layer_prefix
from sglang_core.model_executor.model_api import ModelContext

LAYER_TYPES = ("sliding_attention", "full_attention")


class CommandR(DecoderLM):
    """What Cohere and Cohere2 share (module docstring)."""

    def __init__(self, config, ctx: ModelContext):
        super().__init__(config, ctx)
        if not isinstance(config.logit_scale, (int, float)):
            raise ValueError(f"logit_scale: expected a number, got {config.logit_scale!r}")
        self.logit_scale = float(config.logit_scale)

    def make_rotary(self, config, ctx):
        return rope_from_config(config, HeadShape.from_config(config).head_dim, interleaved=True,
                                max_position=ctx.max_position, partial_rotary=False)

    def make_norm(self, config, ctx):
        return LayerNorm(config.hidden_size, config.layer_norm_eps, bias=False, params_dtype=ctx.dtype)

    def make_mlp(self, config, ctx, layer_id):
        return GatedMLP(ctx, f"{layer_prefix(layer_id)}.mlp", config.hidden_size, config.intermediate_size,
                        config.hidden_act)

    def make_layer(self, config, ctx, layer_id, rotary):
        return ParallelDecoderLayer(self.make_attention(config, ctx, layer_id, rotary),
                                    self.make_mlp(config, ctx, layer_id), self.make_norm(config, ctx))


class CohereForCausalLM(CommandR):
    def make_attention(self, config, ctx, layer_id, rotary, **overrides):
        options = {"sliding_window": None}
        if config.use_qk_norm:
            options.update(headwise_qk_norms(config, ctx, config.layer_norm_eps))
        return super().make_attention(config, ctx, layer_id, rotary, **{**options, **overrides})


class Cohere2ForCausalLM(CommandR):
    def make_attention(self, config, ctx, layer_id, rotary, **overrides):
        kind = config.layer_types[layer_id]
        if kind not in LAYER_TYPES:
            raise ValueError(f"layer_types: layer {layer_id} is {kind!r}, expected one of {', '.join(LAYER_TYPES)}")
        window = config.sliding_window if kind == "sliding_attention" else None
        if kind == "sliding_attention" and window is None:
            raise ValueError(f"sliding_window: layer {layer_id} is a sliding_attention layer but the config has no "
                             "sliding_window")
        return super().make_attention(config, ctx, layer_id, rotary if window is not None else None,
                                      **{"sliding_window": window, **overrides})

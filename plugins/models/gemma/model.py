"""The Gemma family on the core's decoder blocks.

- Gemma 1 (``GemmaForCausalLM``): Llama's arrangement with RMSNorms that scale by ``1 + w``,
  a GeGLU MLP (``hidden_act``), token embeddings times ``sqrt(hidden_size)`` and a tied head.
- Gemma 2 (``Gemma2ForCausalLM``): each sublayer's output is normed again before it joins the
  residual (four norms a layer), ``layer_types`` picks the layers that attend within
  ``sliding_window``, the softmax scale is ``query_pre_attn_scalar ** -0.5``, attention logits
  and final logits are soft-capped, the MLP's activation is ``hidden_activation``.
- Gemma 3 text (``Gemma3ForCausalLM``): Gemma 2 plus a ``1 + w`` RMSNorm over each q and k head,
  and rope parameters per layer type (a local and a global base). transformers reads its
  ``attn_logit_softcapping`` but never applies it, so neither does this.

None of them serves ``use_bidirectional_attention`` (an encoder's mask, not a causal LM's).
"""

from __future__ import annotations

import torch
from torch import nn

from sglang_core.layers.attention_spec import HeadShape
from sglang_core.layers.norm import RMSNorm
from sglang_core.layers.rotary import RotaryEmbedding, rope_from_config
from sglang_core.layers.transformer import DecoderLM, GatedMLP, SandwichDecoderLayer, layer_prefix
from sglang_core.model_executor.model_api import ModelContext

LAYER_TYPES = ("sliding_attention", "full_attention")


def embedding_normalizer(hidden_size: int, dtype: torch.dtype) -> float:
    """``sqrt(hidden_size)`` rounded to the model dtype, as transformers scales Gemma's embeddings
    (in bfloat16, Gemma 7B's ``sqrt(3072) = 55.43`` becomes 55.5)."""
    return torch.tensor(hidden_size**0.5, dtype=torch.float32).to(dtype).item()


def check_causal(config) -> None:
    if getattr(config, "use_bidirectional_attention", False):
        raise ValueError("use_bidirectional_attention: bidirectional attention is not served (causal LMs only)")


def check_layer_types(config) -> None:
    """``layer_types``: one of ``LAYER_TYPES`` per layer (the config fills it in from older fields),
    and a ``sliding_window`` for the sliding ones."""
    kinds = list(config.layer_types)
    if len(kinds) != config.num_hidden_layers or any(kind not in LAYER_TYPES for kind in kinds):
        raise ValueError(f"layer_types: need one of {LAYER_TYPES} for each of the {config.num_hidden_layers} layers, "
                         f"got {kinds}")
    if "sliding_attention" in kinds and config.sliding_window is None:
        # transformers cannot build a sliding layer's mask without a window either.
        raise ValueError(f"sliding_window: layer {kinds.index('sliding_attention')} is a sliding_attention layer but "
                         "the config has no sliding_window")


class GemmaForCausalLM(DecoderLM):
    # The config field naming the MLP's activation (Gemma 2 and 3 renamed it).
    activation_field = "hidden_act"

    def __init__(self, config, ctx: ModelContext):
        check_causal(config)
        super().__init__(config, ctx)
        self.model.embedding_multiplier = embedding_normalizer(config.hidden_size, ctx.dtype)

    def make_norm(self, config, ctx: ModelContext, size: int | None = None) -> nn.Module:
        """A ``1 + w`` RMSNorm over ``size`` features (default ``hidden_size``)."""
        return RMSNorm(size or config.hidden_size, config.rms_norm_eps, ctx.dtype, weight_offset=1.0)

    def make_attention(self, config, ctx: ModelContext, layer_id: int, rotary: RotaryEmbedding | None,
                       **overrides) -> nn.Module:
        """Gemma 1 attends over the whole sequence (transformers' Gemma reads no ``sliding_window``);
        Gemma 2 and 3 pass each layer's window."""
        return super().make_attention(config, ctx, layer_id, rotary, **{"sliding_window": None, **overrides})

    def make_mlp(self, config, ctx: ModelContext, layer_id: int) -> nn.Module:
        return GatedMLP(ctx, f"{layer_prefix(layer_id)}.mlp", config.hidden_size, config.intermediate_size,
                        getattr(config, self.activation_field))


class Gemma2ForCausalLM(GemmaForCausalLM):
    activation_field = "hidden_activation"

    def __init__(self, config, ctx: ModelContext):
        check_layer_types(config)
        super().__init__(config, ctx)
        self.final_logit_softcap = config.final_logit_softcapping

    def make_attention(self, config, ctx: ModelContext, layer_id: int, rotary: RotaryEmbedding | None,
                       **overrides) -> nn.Module:
        sliding = config.layer_types[layer_id] == "sliding_attention"
        options = {"scaling": config.query_pre_attn_scalar**-0.5, "logit_cap": config.attn_logit_softcapping,
                   "sliding_window": config.sliding_window if sliding else None, **overrides}
        return super().make_attention(config, ctx, layer_id, rotary, **options)

    def make_layer(self, config, ctx: ModelContext, layer_id: int, rotary: RotaryEmbedding | None) -> nn.Module:
        return SandwichDecoderLayer(self.make_attention(config, ctx, layer_id, rotary),
                                    self.make_mlp(config, ctx, layer_id),
                                    *(self.make_norm(config, ctx) for _ in range(4)))


class Gemma3ForCausalLM(Gemma2ForCausalLM):
    def make_rotary(self, config, ctx: ModelContext) -> dict[str, RotaryEmbedding]:
        """One table per layer type (``rope_parameters[layer_type]``), shared by its layers."""
        head_dim = HeadShape.from_config(config).head_dim
        return {kind: rope_from_config(config, head_dim, max_position=ctx.max_position, layer_type=kind,
                                       partial_rotary=False)
                for kind in sorted(set(config.layer_types))}

    def make_attention(self, config, ctx: ModelContext, layer_id: int, rotary: dict[str, RotaryEmbedding],
                       **overrides) -> nn.Module:
        """``rotary``: ``make_rotary``'s tables; the layer takes its type's. No attention soft-cap:
        transformers reads ``attn_logit_softcapping`` for Gemma 3 but never passes it on."""
        head_dim = HeadShape.from_config(config).head_dim
        options = {"logit_cap": None, "q_norm": self.make_norm(config, ctx, head_dim),
                   "k_norm": self.make_norm(config, ctx, head_dim), **overrides}
        return super().make_attention(config, ctx, layer_id, rotary[config.layer_types[layer_id]], **options)

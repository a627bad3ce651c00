"""Microsoft's Phi family, built from the core's decoder blocks.

``PhiForCausalLM`` (Phi-1, Phi-1.5, Phi-2): parallel layers (attention and MLP both read one
LayerNorm of the residual stream), multi-head attention with biased q/k/v and output (``dense``)
projections, partial rotary (``partial_rotary_factor``), optional per-head LayerNorms of q and k
(``qk_layernorm``), an ungated biased MLP (``fc1``/``fc2``), a final LayerNorm and an LM head with
a bias of its own.

``Phi3ForCausalLM`` (Phi-3, Phi-3.5-mini, Phi-4-mini): Llama's arrangement with q/k/v and
gate/up stored fused in the checkpoint (``qkv_proj``, ``gate_up_proj``: the fused parameters'
own names, so they load as they are), LongRoPE scaling (short factors for a sequence within
``original_max_position_embeddings``, long ones past it, as transformers' ``generate`` turns them:
see ``LongRopeRotaryEmbedding`` and ``kv_recompute_length``), partial rotary and a sliding window
where the config sets them.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from sglang_core.layers.attention_spec import HeadShape
from sglang_core.layers.norm import LayerNorm
from sglang_core.layers.parallel import VocabParallelEmbedding
from sglang_core.layers.rotary import LongRopeRotaryEmbedding, RotaryEmbedding
from sglang_core.layers.transformer import QKV_GATE_UP, MLP, DecoderLM, ParallelDecoderLayer, layer_prefix
from sglang_core.model_executor.model_api import ModelContext


class PhiForCausalLM(DecoderLM):
    partial_rotary = True
    stacked_params = {part: QKV_GATE_UP[part] for part in ("q_proj", "k_proj", "v_proj")}
    checkpoint_renames = (
        (r"\.self_attn\.dense\.", ".self_attn.o_proj."),
        (r"\.self_attn\.q_layernorm\.", ".self_attn.q_norm."),
        (r"\.self_attn\.k_layernorm\.", ".self_attn.k_norm."),
        (r"\.mlp\.fc1\.", ".mlp.up_proj."),
        (r"\.mlp\.fc2\.", ".mlp.down_proj."),
        (r"^model\.final_layernorm\.", "model.norm."),
    )

    def make_lm_head(self, config, ctx: ModelContext, bias: bool = True) -> VocabParallelEmbedding:
        return super().make_lm_head(config, ctx, bias=bias)

    def make_norm(self, config, ctx: ModelContext, size: int | None = None) -> nn.Module:
        """A LayerNorm of ``size`` features (default: the hidden size; the q/k norms': a head's)."""
        return LayerNorm(size or config.hidden_size, config.layer_norm_eps, params_dtype=ctx.dtype)

    def make_attention(self, config, ctx: ModelContext, layer_id: int, rotary: RotaryEmbedding | None,
                       **overrides: Any) -> nn.Module:
        qk_norms = {}
        if config.qk_layernorm:
            head_dim = HeadShape.from_config(config).head_dim
            qk_norms = {name: self.make_norm(config, ctx, head_dim) for name in ("q_norm", "k_norm")}
        # Phi's attention has no sliding window (transformers ignores one in the config).
        return super().make_attention(config, ctx, layer_id, rotary, qkv_bias=True, o_bias=True, sliding_window=None,
                                      **qk_norms, **overrides)

    def make_mlp(self, config, ctx: ModelContext, layer_id: int) -> nn.Module:
        return MLP(ctx, f"{layer_prefix(layer_id)}.mlp", config.hidden_size, config.intermediate_size,
                   config.hidden_act, bias=True)

    def make_layer(self, config, ctx: ModelContext, layer_id: int, rotary: RotaryEmbedding | None) -> nn.Module:
        return ParallelDecoderLayer(self.make_attention(config, ctx, layer_id, rotary),
                                    self.make_mlp(config, ctx, layer_id), self.make_norm(config, ctx))


class Phi3ForCausalLM(DecoderLM):
    """Everything Phi-3 differs in from Llama is read by the core's defaults (module docstring),
    LongRoPE's per-token choice of factors included (``LongRopeRotaryEmbedding``); it has no
    biases (transformers' Phi-3 reads no ``attention_bias`` or ``mlp_bias``).

    ``kv_recompute_length`` (``scheduler/length_regimes.py``): with LongRoPE served past the
    original length, transformers' ``generate`` drops its KV cache when a sequence grows past that
    length and turns every token again by the long factors; the engine prefills such a request
    again, and keeps short- and long-factor tokens apart in its prefix cache."""

    attention_bias_field = None
    mlp_bias_field = None
    partial_rotary = True
    kv_recompute_length: int | None = None

    def make_rotary(self, config, ctx: ModelContext) -> RotaryEmbedding | None:
        rotary = super().make_rotary(config, ctx)
        if isinstance(rotary, LongRopeRotaryEmbedding):
            self.kv_recompute_length = rotary.original_max_position
        return rotary

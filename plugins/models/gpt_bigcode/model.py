"""BigCode's GPTBigCode (StarCoder 1, SantaCoder), built from the core's decoder blocks.

GPT-2's arrangement: a learned absolute position embedding (``wpe``) added to the token
embedding and no rotary; pre-norm layers with LayerNorms (``ln_1``, ``ln_2``, final ``ln_f``);
attention from one fused biased projection (``c_attn``), multi-query (one k/v head shared by
every query head) when ``multi_query``, else multi-head; softmax scale ``1/sqrt(head_dim)``, or 1
without ``scale_attn_weights``; an ungated biased MLP (``c_fc``, ``c_proj``) of width ``n_inner``
(default ``4 * hidden``); an LM head tied to the embedding unless ``tie_word_embeddings`` is off.
"""

from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import nn

from sglang_core.layers.activation import act_fn
from sglang_core.layers.attention_spec import HeadShape
from sglang_core.layers.norm import LayerNorm
from sglang_core.layers.parallel import VocabParallelEmbedding, ungroup_qkv
from sglang_core.layers.rotary import RotaryEmbedding
from sglang_core.layers.transformer import MLP, DecoderLM, DecoderStack, SelfAttention, layer_prefix
from sglang_core.model_executor.forward_batch import ForwardBatch
from sglang_core.model_executor.model_api import ModelContext


class PositionEmbeddingStack(DecoderStack):
    """A ``DecoderStack`` whose input is the token embedding plus a learned embedding of each
    token's absolute position (``embed_positions``, one row per position)."""

    def __init__(self, stack: DecoderStack, embed_positions: VocabParallelEmbedding):
        super().__init__(stack.embed_tokens, stack.layers, stack.norm, stack.embedding_multiplier)
        self.embed_positions = embed_positions

    def embed(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return super().embed(input_ids, positions) + self.embed_positions(positions)


def head_shape(config) -> HeadShape:
    """``n_head`` query heads over one k/v head (``multi_query``) or one each, of ``n_embd / n_head`` dims."""
    heads = config.num_attention_heads
    if config.hidden_size % heads:
        raise ValueError(f"n_head: {heads} does not divide n_embd {config.hidden_size}")
    return HeadShape(heads, 1 if config.multi_query else heads, config.hidden_size // heads)


class GPTBigCodeForCausalLM(DecoderLM):
    stacked_params = {}  # c_attn is stored fused (see load_weights for its row order)
    checkpoint_renames = (
        (r"^transformer\.wte\.", "model.embed_tokens."),
        (r"^transformer\.wpe\.", "model.embed_positions."),
        (r"^transformer\.ln_f\.", "model.norm."),
        (r"^transformer\.h\.", "model.layers."),
        (r"\.ln_1\.", ".input_layernorm."),
        (r"\.ln_2\.", ".post_attention_layernorm."),
        (r"\.attn\.c_attn\.", ".self_attn.qkv_proj."),
        (r"\.attn\.c_proj\.", ".self_attn.o_proj."),
        (r"\.mlp\.c_fc\.", ".mlp.up_proj."),
        (r"\.mlp\.c_proj\.", ".mlp.down_proj."),
    )

    def __init__(self, config, ctx: ModelContext):
        if config.add_cross_attention:
            raise ValueError("add_cross_attention: cross-attention layers (an encoder-decoder use) are not supported")
        super().__init__(config, ctx)
        self.model = PositionEmbeddingStack(
            self.model, VocabParallelEmbedding(config.max_position_embeddings, config.hidden_size, ctx.tp, ctx.dtype))

    def make_rotary(self, config, ctx: ModelContext) -> RotaryEmbedding | None:
        return None

    def make_norm(self, config, ctx: ModelContext) -> nn.Module:
        return LayerNorm(config.hidden_size, config.layer_norm_epsilon, params_dtype=ctx.dtype)

    def make_attention(self, config, ctx: ModelContext, layer_id: int, rotary: RotaryEmbedding | None,
                       **overrides: Any) -> nn.Module:
        shape = head_shape(config)
        scaling = shape.head_dim**-0.5 if config.scale_attn_weights else 1.0
        return SelfAttention(ctx, f"{layer_prefix(layer_id)}.self_attn", layer_id, config.hidden_size, shape, rotary,
                             **{"qkv_bias": True, "o_bias": True, "scaling": scaling, **overrides})

    def make_mlp(self, config, ctx: ModelContext, layer_id: int) -> nn.Module:
        inner = config.n_inner if config.n_inner is not None else 4 * config.hidden_size
        return MLP(ctx, f"{layer_prefix(layer_id)}.mlp", config.hidden_size, inner, config.activation_function,
                   bias=True)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        super().load_weights((name, self._fused_qkv_rows(name, tensor)) for name, tensor in weights)

    def _fused_qkv_rows(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """Multi-head ``c_attn`` rows are stored per head (head 0's q, k, v, then head 1's, ...);
        reordered to all q, all k, all v. Multi-query ``c_attn`` is stored in that order already."""
        shape = head_shape(self.config)
        if ".attn.c_attn." not in name or self.config.multi_query:
            return tensor
        return ungroup_qkv(tensor, shape.num_heads, shape.num_kv_heads, shape.head_dim)

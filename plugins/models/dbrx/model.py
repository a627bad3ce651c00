"""DBRX: a pre-norm decoder of LayerNorms without bias, one fused ``Wqkv`` projection (GQA with
``attn_config.kv_n_heads`` KV heads) clamped to ``[-clip_qkv, clip_qkv]`` when ``clip_qkv`` is
set, and every MLP a sparse MoE block.

The config nests its options: ``attn_config`` (``kv_n_heads``, ``clip_qkv``, ``rope_theta``) and
``ffn_config`` (``moe_num_experts`` gated MLPs of ``ffn_hidden_size`` with ``ffn_act_fn["name"]``;
a softmax router taking ``moe_top_k``, the chosen weights divided by their
``moe_normalize_expert_weights``-norm when that is set; ``moe_jitter_eps`` only jitters training
inputs). The rope base is ``attn_config.rope_theta``, what DBRX's checkpoints state
(transformers 5's rotary reads only a top-level ``rope_parameters``, default 10000).

Checkpoints store each block's experts all at once, ``ffn.experts.mlp.w1`` (gate), ``v1`` (up),
``w2`` (down), each ``[experts * ffn_hidden_size, d_model]``: w2 holds each expert's down
projection transposed. The router is ``ffn.router.layer``.
"""

from __future__ import annotations

from torch import nn

from sglang_core.layers.attention_spec import HeadShape
from sglang_core.layers.moe import MoE
from sglang_core.layers.moe_router import Routing
from sglang_core.layers.norm import LayerNorm
from sglang_core.layers.rotary import RotaryEmbedding
from sglang_core.layers.transformer import DecoderLM, SelfAttention, layer_prefix
from sglang_core.model_executor.model_api import ExpertMapping, ModelContext


def head_shape(config) -> HeadShape:
    """DBRX's heads: ``n_heads`` of ``d_model / n_heads``, ``attn_config.kv_n_heads`` KV heads."""
    if config.d_model % config.n_heads:
        raise ValueError(f"n_heads: {config.n_heads} does not divide d_model {config.d_model}")
    kv_heads = config.attn_config.kv_n_heads
    if config.n_heads % kv_heads:
        raise ValueError(f"attn_config.kv_n_heads: {kv_heads} does not divide n_heads {config.n_heads}")
    return HeadShape(config.n_heads, kv_heads, config.d_model // config.n_heads)


class DbrxForCausalLM(DecoderLM):
    checkpoint_renames = (
        (r"^transformer\.wte\.", "model.embed_tokens."),
        (r"^transformer\.norm_f\.", "model.norm."),
        (r"^transformer\.blocks\.", "model.layers."),
        (r"\.norm_attn_norm\.norm_1\.", ".input_layernorm."),
        (r"\.norm_attn_norm\.norm_2\.", ".post_attention_layernorm."),
        (r"\.norm_attn_norm\.attn\.Wqkv\.", ".self_attn.qkv_proj."),
        (r"\.norm_attn_norm\.attn\.out_proj\.", ".self_attn.o_proj."),
        (r"\.ffn\.router\.layer\.", ".mlp.gate."),
        (r"\.ffn\.experts\.mlp\.", ".mlp.experts."),
    )
    expert_layouts = (
        ExpertMapping(r"(?P<prefix>.+\.experts)\.w1", r"\g<prefix>.w13_weight", "gate"),
        ExpertMapping(r"(?P<prefix>.+\.experts)\.v1", r"\g<prefix>.w13_weight", "up"),
        ExpertMapping(r"(?P<prefix>.+\.experts)\.w2", r"\g<prefix>.w2_weight", "down", transposed=True),
    )

    def __init__(self, config, ctx: ModelContext):
        if getattr(config, "tie_word_embeddings", False):
            raise ValueError("tie_word_embeddings: DBRX has no tied LM head (transformers refuses it too)")
        theta = getattr(config.attn_config, "rope_theta", None)
        if theta is None:
            raise ValueError("attn_config.rope_theta: DBRX's rope base is missing")
        # The rope base lives here (rope_from_config reads rope_parameters): attn_config's is the one
        # DBRX states; transformers 5 also writes a top-level default of 10000 that it does not mean.
        config.rope_parameters = {**(getattr(config, "rope_parameters", None) or {"rope_type": "default"}),
                                  "rope_theta": float(theta)}
        super().__init__(config, ctx)

    def make_norm(self, config, ctx: ModelContext) -> nn.Module:
        return LayerNorm(config.d_model, bias=False, params_dtype=ctx.dtype)

    def make_attention(self, config, ctx: ModelContext, layer_id: int, rotary: RotaryEmbedding | None,
                       **overrides) -> nn.Module:
        return SelfAttention(ctx, f"{layer_prefix(layer_id)}.self_attn", layer_id, config.d_model,
                             head_shape(config), rotary, clip_qkv=config.attn_config.clip_qkv, **overrides)

    def make_mlp(self, config, ctx: ModelContext, layer_id: int) -> nn.Module:
        ffn = config.ffn_config
        p = ffn.moe_normalize_expert_weights
        routing = Routing(ffn.moe_top_k, renormalize=p is not None, renormalize_p=1.0 if p is None else float(p))
        act = (ffn.ffn_act_fn or {}).get("name", "silu")
        return MoE(config.d_model, ffn.moe_num_experts, ffn.ffn_hidden_size, routing, act, ctx.tp, ctx.dtype,
                   quant_method=ctx.experts_method_for(f"{layer_prefix(layer_id)}.mlp.experts"))

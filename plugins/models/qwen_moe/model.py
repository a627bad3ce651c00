"""Qwen's MoE models: Qwen1.5-MoE / Qwen2-MoE (``Qwen2MoeForCausalLM``) and Qwen3-MoE
(``Qwen3MoeForCausalLM``).

Both are Qwen's dense decoder with some MLPs replaced by a sparse block: ``num_experts`` gated
MLPs of ``moe_intermediate_size``, a softmax router taking ``num_experts_per_tok``, renormalised
when ``norm_topk_prob``. Layer ``i`` is sparse unless it is in ``mlp_only_layers`` or
``(i + 1) % decoder_sparse_step != 0`` (or ``num_experts`` is 0); the others keep a dense MLP of
``intermediate_size``.

* Qwen2-MoE: q/k/v biases as ``qkv_bias`` says (default on), none on o_proj; sliding windows on
  the layers ``layer_types`` marks; each sparse block adds a shared expert (a gated MLP of
  ``shared_expert_intermediate_size``) weighted per token by ``sigmoid(shared_expert_gate(x))``.
* Qwen3-MoE: ``attention_bias`` on all four projections or none, per-head q/k RMSNorm before the
  rotary (as Qwen3), ``sliding_window`` on every layer when ``use_sliding_window``; no shared expert.
"""

from __future__ import annotations

from torch import nn

from sglang_core.layers.moe import MoE
from sglang_core.layers.moe_router import Routing
from sglang_core.layers.rotary import RotaryEmbedding
from sglang_core.layers.transformer import DecoderLM, GatedMLP, layer_prefix, rms_qk_norms
from sglang_core.model_executor.model_api import ModelContext


def is_sparse(config, layer_id: int) -> bool:
    """Whether layer ``layer_id``'s MLP is the MoE block (transformers' rule for both models)."""
    if config.decoder_sparse_step < 1:
        raise ValueError(f"decoder_sparse_step: {config.decoder_sparse_step} is not a positive layer interval")
    return (layer_id not in config.mlp_only_layers and config.num_experts > 0
            and (layer_id + 1) % config.decoder_sparse_step == 0)


def sliding_window_of(config, layer_id: int) -> int | None:
    """Qwen2-MoE's window for a layer: ``sliding_window`` where ``layer_types`` says sliding."""
    kind = config.layer_types[layer_id]
    if kind == "full_attention":
        return None
    if kind != "sliding_attention":
        raise ValueError(f"layer_types: layer {layer_id} is {kind!r}, not full_attention or sliding_attention")
    if not config.sliding_window:  # transformers sets it to 0 when use_sliding_window is off
        raise ValueError(f"sliding_window: layer {layer_id} is a sliding_attention layer but no window is set "
                         "(is use_sliding_window false?)")
    return config.sliding_window


class QwenMoeLM(DecoderLM):
    """What both have in common: the sparse layers' MoE block, the checkpoints' expert names."""

    expert_parts = {"gate_proj": "gate", "up_proj": "up", "down_proj": "down"}

    def make_mlp(self, config, ctx: ModelContext, layer_id: int) -> nn.Module:
        if not is_sparse(config, layer_id):
            return super().make_mlp(config, ctx, layer_id)
        shared = self.make_shared_expert(config, ctx, layer_id)
        return MoE(config.hidden_size, config.num_experts, config.moe_intermediate_size,
                   Routing(config.num_experts_per_tok, renormalize=config.norm_topk_prob), config.hidden_act,
                   ctx.tp, ctx.dtype, shared_expert=shared, shared_expert_gate=shared is not None,
                   quant_method=ctx.experts_method_for(f"{layer_prefix(layer_id)}.mlp.experts"))

    def make_shared_expert(self, config, ctx: ModelContext, layer_id: int) -> nn.Module | None:
        return None


class Qwen2MoeForCausalLM(QwenMoeLM):
    """Qwen1.5-MoE-A2.7B, Qwen2-57B-A14B: sparse blocks with a gated shared expert; none when
    ``shared_expert_intermediate_size`` is 0 (transformers' zero-wide one adds 0), its gate's
    checkpoint weight then skipped."""

    def __init__(self, config, ctx: ModelContext):
        super().__init__(config, ctx)
        if not config.shared_expert_intermediate_size:
            self.ignored_weights = (*self.ignored_weights, ".mlp.shared_expert_gate.")

    def make_attention(self, config, ctx: ModelContext, layer_id: int, rotary: RotaryEmbedding | None,
                       **overrides) -> nn.Module:
        options = {"qkv_bias": config.qkv_bias, "o_bias": False,
                   "sliding_window": sliding_window_of(config, layer_id), **overrides}
        return super().make_attention(config, ctx, layer_id, rotary, **options)

    def make_shared_expert(self, config, ctx: ModelContext, layer_id: int) -> nn.Module | None:
        if not config.shared_expert_intermediate_size:
            return None
        return GatedMLP(ctx, f"{layer_prefix(layer_id)}.mlp.shared_expert", config.hidden_size,
                        config.shared_expert_intermediate_size, config.hidden_act)


class Qwen3MoeForCausalLM(QwenMoeLM):
    """Qwen3-30B-A3B, Qwen3-235B-A22B: Qwen3's attention, sparse blocks without a shared expert."""

    def make_attention(self, config, ctx: ModelContext, layer_id: int, rotary: RotaryEmbedding | None,
                       **overrides) -> nn.Module:
        bias = config.attention_bias
        options = {"qkv_bias": bias, "o_bias": bias, **rms_qk_norms(config, ctx), **overrides}
        return super().make_attention(config, ctx, layer_id, rotary, **options)

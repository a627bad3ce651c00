"""Mixtral: Mistral's decoder (GQA, a sliding window on every layer if ``sliding_window`` is set)
with every MLP a sparse MoE block: ``num_local_experts`` gated MLPs of ``intermediate_size``, the
softmax router's ``num_experts_per_tok`` best renormalised to sum to one.

Checkpoints name the block ``block_sparse_moe`` and each expert's projections ``w1`` (gate),
``w3`` (up), ``w2`` (down); transformers 5 names it ``mlp`` with the experts stacked.
"""

from __future__ import annotations

from torch import nn

from sglang_core.layers.moe import MoE
from sglang_core.layers.moe_router import Routing
from sglang_core.layers.transformer import DecoderLM, layer_prefix
from sglang_core.model_executor.model_api import ModelContext


class MixtralForCausalLM(DecoderLM):
    checkpoint_renames = ((r"\.block_sparse_moe\.", ".mlp."),)
    expert_parts = {"w1": "gate", "w3": "up", "w2": "down"}
    attention_bias_field = None  # transformers' Mixtral reads no attention_bias: never biased

    def make_mlp(self, config, ctx: ModelContext, layer_id: int) -> nn.Module:
        routing = Routing(config.num_experts_per_tok, renormalize=True)
        return MoE(config.hidden_size, config.num_local_experts, config.intermediate_size, routing,
                   config.hidden_act, ctx.tp, ctx.dtype,
                   quant_method=ctx.experts_method_for(f"{layer_prefix(layer_id)}.mlp.experts"))

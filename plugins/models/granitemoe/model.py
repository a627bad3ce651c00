"""IBM Granite MoE: Granite's decoder (Llama's, plus four scalars from the config) with every MLP
a sparse MoE block.

* ``embedding_multiplier`` scales the token embeddings; ``residual_multiplier`` each sublayer's
  output before its residual add; ``attention_multiplier`` is the softmax scale; the logits are
  divided by ``logits_scaling``.
* The MoE block: ``num_local_experts`` gated MLPs of ``intermediate_size``; the router keeps the
  ``num_experts_per_tok`` largest logits and softmaxes them (the top-k of the softmax,
  renormalised to sum to one).
* ``GraniteMoeSharedForCausalLM`` adds, when ``shared_intermediate_size`` is not 0, a gated
  ``shared_mlp`` every token also goes through, summed with the experts' output.

Released checkpoints name the block ``block_sparse_moe`` with every expert stored at once:
``input_linear`` ``[E, 2I, H]`` (each expert's gate rows, then its up rows), ``output_linear``
``[E, H, I]``, and the router ``router.layer``; the shared MLP's ``input_linear`` / ``output_linear``
are one fused gate/up and the down projection. transformers 5 names them ``experts.gate_up_proj``,
``experts.down_proj`` and ``router.weight``.
"""

from __future__ import annotations

from torch import nn

from sglang_core.layers.moe import MoE
from sglang_core.layers.moe_router import Routing
from sglang_core.layers.rotary import RotaryEmbedding
from sglang_core.layers.transformer import DecoderLM, GatedMLP, layer_prefix
from sglang_core.model_executor.model_api import ExpertMapping, ModelContext


class GraniteMoeForCausalLM(DecoderLM):
    # After the renames below: the experts of a released checkpoint, all at once.
    expert_layouts = (
        ExpertMapping(r"(?P<prefix>.+\.mlp)\.input_linear\.weight", r"\g<prefix>.experts.w13_weight", "gate_up"),
        ExpertMapping(r"(?P<prefix>.+\.mlp)\.output_linear\.weight", r"\g<prefix>.experts.w2_weight", "down"),
    )
    checkpoint_renames = (
        (r"\.block_sparse_moe\.router\.(layer\.)?", ".mlp.gate."),
        (r"\.block_sparse_moe\.", ".mlp."),
        (r"\.shared_mlp\.input_linear\.", ".mlp.shared_expert.gate_up_proj."),
        (r"\.shared_mlp\.output_linear\.", ".mlp.shared_expert.down_proj."),
    )

    def __init__(self, config, ctx: ModelContext):
        super().__init__(config, ctx)
        self.model.embedding_multiplier = float(config.embedding_multiplier)
        self.logit_scale = 1.0 / float(config.logits_scaling)

    def make_attention(self, config, ctx: ModelContext, layer_id: int, rotary: RotaryEmbedding | None,
                       **overrides) -> nn.Module:
        # Full attention on every layer: transformers' Granite MoE reads no sliding_window.
        options = {"scaling": float(config.attention_multiplier), "sliding_window": None, **overrides}
        return super().make_attention(config, ctx, layer_id, rotary, **options)

    def make_layer(self, config, ctx: ModelContext, layer_id: int, rotary: RotaryEmbedding | None) -> nn.Module:
        layer = super().make_layer(config, ctx, layer_id, rotary)
        layer.residual_multiplier = float(config.residual_multiplier)
        return layer

    def make_mlp(self, config, ctx: ModelContext, layer_id: int) -> nn.Module:
        return MoE(config.hidden_size, config.num_local_experts, config.intermediate_size,
                   Routing(config.num_experts_per_tok, renormalize=True), config.hidden_act, ctx.tp, ctx.dtype,
                   shared_expert=self.make_shared_mlp(config, ctx, layer_id),
                   quant_method=ctx.experts_method_for(f"{layer_prefix(layer_id)}.mlp.experts"))

    def make_shared_mlp(self, config, ctx: ModelContext, layer_id: int) -> nn.Module | None:
        return None


class GraniteMoeSharedForCausalLM(GraniteMoeForCausalLM):
    def make_shared_mlp(self, config, ctx: ModelContext, layer_id: int) -> nn.Module | None:
        if not config.shared_intermediate_size:
            return None
        return GatedMLP(ctx, f"{layer_prefix(layer_id)}.mlp.shared_expert", config.hidden_size,
                        config.shared_intermediate_size, config.hidden_act)

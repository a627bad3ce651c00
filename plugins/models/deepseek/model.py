"""DeepSeek-V2 (``DeepseekV2ForCausalLM``) and DeepSeek-V3 (``DeepseekV3ForCausalLM``).

Llama's pre-norm arrangement with Multi-head Latent Attention (``mla.py``; its K/V cached per
head with ``--disable-mla``) in every layer, and rotary on the ``qk_rope_head_dim`` part of q and
k only. V2 rotates interleaved pairs; V3 too unless ``rope_interleave`` is false (then "rotate
half").

MoE: layers from ``first_k_dense_replace`` on are MoE layers when ``n_routed_experts`` is set: the
core's ``MoE`` with ``n_routed_experts`` experts of ``moe_intermediate_size``, a float32 router
taking ``num_experts_per_tok`` scaled by ``routed_scaling_factor``, and ``n_shared_experts`` shared
experts as one ungated MLP of ``n_shared_experts * moe_intermediate_size`` (checkpoints call it
``shared_experts``). Where the core allows (``can_stack_shared_experts``: float experts, no expert
parallelism) and the MLP has no biases, the shared MLP is held as ``n_shared_experts`` experts
stacked after the routed ones (its checkpoint tensors cut into theirs at load time), so the
experts' fused launches compute it too; else it is a ``GatedMLP`` beside them. V2 routes by softmax, ``topk_method`` ``greedy`` or ``group_limited_greedy``
(best ``topk_group`` of ``n_group`` groups by their best expert), never renormalised (transformers'
V2 reads no ``norm_topk_prob``); V3 by sigmoid with ``e_score_correction_bias`` for the choice
only, groups scored by their two best, renormalised when ``norm_topk_prob``. Options of DeepSeek's
own code that transformers does not read are refused unless set as released (``scoring_func``
softmax for V2, sigmoid for V3; V3's ``topk_method`` ``noaux_tc``; ``moe_layer_freq`` 1).

Where every layer allows it (``mla.merges_input_projections``), the checkpoints' ``q_proj`` (or
``q_a_proj``) and ``kv_a_proj_with_mqa`` load as the two shards of each layer's ``fused_qkv_a_proj``.

Multi-token-prediction layers (``num_nextn_predict_layers``) follow the ``num_hidden_layers``
decoder layers in the checkpoint (``model.layers.<n>.`` and beyond); they are not served and their
weights are skipped.
"""

from __future__ import annotations

import re
from typing import Iterable

import torch
from torch import nn

from sglang_core.layers.moe import MoE, can_stack_shared_experts, shared_expert_pieces
from sglang_core.layers.moe_router import Routing
from sglang_core.layers.rotary import RotaryEmbedding, rope_from_config
from sglang_core.layers.transformer import DecoderLM, GatedMLP, layer_prefix
from sglang_core.model_executor.model_api import ModelContext

from sglang_plugins.models.deepseek.mla import MultiHeadLatentAttention, merges_input_projections

_LAYER_INDEX = re.compile(r"^model\.layers\.(\d+)\.")


def refuse_other_than(config, field: str, served: object) -> None:
    """A ValueError naming ``field`` where the config sets it to anything but ``served``: options of
    DeepSeek's own model code that transformers (the reference) and this plugin do not read."""
    value = getattr(config, field, served)
    if value != served:
        raise ValueError(f"{field}: only {served!r} is served (DeepSeek's released configs), not {value!r}")


_SHARED_EXPERTS = re.compile(r"^(?P<mlp>model\.layers\.(?P<layer>\d+)\.mlp)\.shared_experts\.(?P<proj>\w+)\.weight$")


class DeepseekV2ForCausalLM(DecoderLM):
    """DeepSeek-V2 / V2-Lite / V2.5. ``q_lora_rank`` null: one ``q_proj``; ``mlp_bias`` on the
    dense MLPs and the shared experts."""

    # q_proj is MLA's own projection, not a piece of a fused qkv.
    stacked_params = {"gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1)}
    expert_parts = {"gate_proj": "gate", "up_proj": "up", "down_proj": "down"}
    checkpoint_renames = ((r"\.mlp\.shared_experts\.", ".mlp.shared_expert."),)
    # Where the input projections are merged (every layer's): the checkpoint's two, as its shards.
    merged_input_params = {"q_proj": ("fused_qkv_a_proj", 0), "q_a_proj": ("fused_qkv_a_proj", 0),
                           "kv_a_proj_with_mqa": ("fused_qkv_a_proj", 1)}

    def __init__(self, config, ctx: ModelContext):
        self._merged_input = all(merges_input_projections(config, ctx, f"{layer_prefix(i)}.self_attn")
                                 for i in range(config.num_hidden_layers))
        super().__init__(config, ctx)
        if self._merged_input:
            self.stacked_params = {**self.stacked_params, **self.merged_input_params}

    def make_rotary(self, config, ctx: ModelContext) -> RotaryEmbedding:
        # All qk_rope_head_dim dims turn, whatever partial_rotary_factor says (transformers ignores it).
        return rope_from_config(config, config.qk_rope_head_dim, interleaved=self.rope_interleaved(config),
                                max_position=ctx.max_position, partial_rotary=False)

    def rope_interleaved(self, config) -> bool:
        """Whether rotary turns interleaved pairs (V2 always does) rather than halves."""
        return True

    def dense_mlp_bias(self, config) -> bool:
        return bool(getattr(config, "mlp_bias", False))

    def make_attention(self, config, ctx: ModelContext, layer_id: int, rotary: RotaryEmbedding | None,
                       **overrides) -> nn.Module:
        return MultiHeadLatentAttention(config, ctx, f"{layer_prefix(layer_id)}.self_attn", layer_id, rotary,
                                        self._merged_input)

    def make_mlp(self, config, ctx: ModelContext, layer_id: int) -> nn.Module:
        prefix = f"{layer_prefix(layer_id)}.mlp"
        experts = getattr(config, "n_routed_experts", None)
        if experts is None or layer_id < (getattr(config, "first_k_dense_replace", None) or 0):
            return GatedMLP(ctx, prefix, config.hidden_size, config.intermediate_size, config.hidden_act,
                            self.dense_mlp_bias(config))
        # DeepSeek's code makes every moe_layer_freq-th layer sparse; transformers, every layer.
        refuse_other_than(config, "moe_layer_freq", 1)
        shared, stacked = None, 0
        experts_method = ctx.experts_method_for(f"{prefix}.experts")
        # n_shared_experts 0: none (transformers keeps a zero-wide MLP; its empty tensors are not loaded).
        count = getattr(config, "n_shared_experts", None) or 0
        if count and self._stacks_shared_experts(config, ctx, prefix, experts_method):
            stacked = count
        elif count:
            shared = GatedMLP(ctx, f"{prefix}.shared_expert", config.hidden_size, config.moe_intermediate_size * count,
                              config.hidden_act, self.dense_mlp_bias(config))
        return MoE(config.hidden_size, experts, config.moe_intermediate_size, self.routing(config), config.hidden_act,
                   ctx.tp, ctx.dtype, shared_expert=shared, router_dtype=torch.float32, quant_method=experts_method,
                   stacked_shared_experts=stacked)

    def _stacks_shared_experts(self, config, ctx: ModelContext, prefix: str, experts_method) -> bool:
        """Whether the shared MLP joins the routed experts' stack: the core allows it, it has no
        biases, and no quantization method claims its projections."""
        shared_quantized = any(ctx.quant_method_for(f"{prefix}.shared_expert.{proj}") is not None
                               for proj in ("gate_up_proj", "down_proj"))
        return (can_stack_shared_experts(ctx.tp, experts_method) and not self.dense_mlp_bias(config)
                and not shared_quantized)

    def routing(self, config) -> Routing:
        """V2: softmax scores, ``greedy`` or ``group_limited_greedy`` top-k, not renormalised."""
        refuse_other_than(config, "scoring_func", "softmax")
        method = getattr(config, "topk_method", "greedy")
        if method not in ("greedy", "group_limited_greedy"):
            raise ValueError(f"topk_method: DeepSeek-V2 routes by 'greedy' or 'group_limited_greedy', not {method!r}")
        grouped = method == "group_limited_greedy"
        return Routing(config.num_experts_per_tok, "softmax", num_groups=config.n_group if grouped else 1,
                       topk_groups=config.topk_group if grouped else 1, group_score="max",
                       scaling_factor=config.routed_scaling_factor)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        super().load_weights(self._stack_shared_experts(
            (name, tensor) for name, tensor in weights if not self._is_mtp_weight(name)))

    def _stack_shared_experts(self, weights: Iterable[tuple[str, torch.Tensor]]) -> Iterable[tuple[str, torch.Tensor]]:
        """A layer with stacked shared experts gets its shared MLP's tensors as experts ``E ..``'s
        (``shared_experts.gate_proj`` -> ``experts.<E + j>.gate_proj``, one piece each)."""
        for name, tensor in weights:
            match = _SHARED_EXPERTS.match(name)
            mlp = self.model.layers[int(match["layer"])].mlp if match else None
            count = getattr(mlp, "stacked_shared_experts", 0)
            if not count:
                yield name, tensor
                continue
            routed = mlp.experts.num_experts - count
            for index, piece in enumerate(shared_expert_pieces(tensor, match["proj"], count)):
                yield f"{match['mlp']}.experts.{routed + index}.{match['proj']}.weight", piece

    def _is_mtp_weight(self, name: str) -> bool:
        """A tensor of a multi-token-prediction layer: a layer index past the decoder's."""
        match = _LAYER_INDEX.match(name)
        return match is not None and int(match.group(1)) >= self.config.num_hidden_layers


class DeepseekV3ForCausalLM(DeepseekV2ForCausalLM):
    """DeepSeek-V3 / R1: ``rope_interleave`` (default true) picks the rotary layout; the MLPs never
    have biases (transformers' V3 reads no ``mlp_bias``)."""

    def rope_interleaved(self, config) -> bool:
        return bool(getattr(config, "rope_interleave", True))

    def dense_mlp_bias(self, config) -> bool:
        return False

    def routing(self, config) -> Routing:
        """V3 ("noaux_tc"): sigmoid scores, the correction bias and grouping for the choice only."""
        refuse_other_than(config, "scoring_func", "sigmoid")
        refuse_other_than(config, "topk_method", "noaux_tc")
        return Routing(config.num_experts_per_tok, "sigmoid", renormalize=bool(config.norm_topk_prob),
                       num_groups=config.n_group or 1, topk_groups=config.topk_group or 1, group_score="top2_sum",
                       correction_bias=True, scaling_factor=config.routed_scaling_factor)

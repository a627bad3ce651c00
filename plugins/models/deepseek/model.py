"""DeepSeek-V2 (``DeepseekV2ForCausalLM``) and DeepSeek-V3 (``DeepseekV3ForCausalLM``).

Llama's pre-norm arrangement with Multi-head Latent Attention (``mla.py``) in every layer, and
rotary on the ``qk_rope_head_dim`` part of q and k only. V2 rotates interleaved pairs; V3 too
unless ``rope_interleave`` is false (then "rotate half").

MoE: layers from ``first_k_dense_replace`` on are MoE layers when ``n_routed_experts`` is set.
They are not wired yet: ``make_mlp``, the one place a layer's MLP comes from, refuses them with a
ValueError naming ``first_k_dense_replace``, so only configs whose layers are all dense
(``first_k_dense_replace >= num_hidden_layers``) load for now.

Multi-token-prediction layers (``num_nextn_predict_layers``) follow the ``num_hidden_layers``
decoder layers in the checkpoint (``model.layers.<n>.`` and beyond); they are not served and their
weights are skipped.
"""

from __future__ import annotations

import re
from typing import Iterable

import torch
from torch import nn

from sglang_core.layers.rotary import RotaryEmbedding, rope_from_config
from sglang_core.layers.transformer import DecoderLM, GatedMLP, layer_prefix
from sglang_core.model_executor.model_api import ModelContext

from sglang_plugins.models.deepseek.mla import MultiHeadLatentAttention

_LAYER_INDEX = re.compile(r"^model\.layers\.(\d+)\.")


class DeepseekV2ForCausalLM(DecoderLM):
    """DeepSeek-V2 / V2-Lite / V2.5 with dense layers only (see the module docstring for MoE).
    ``q_lora_rank`` null: one ``q_proj``; ``mlp_bias`` on the dense MLPs."""

    # q_proj is MLA's own projection, not a piece of a fused qkv.
    stacked_params = {"gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1)}

    def make_rotary(self, config, ctx: ModelContext) -> RotaryEmbedding:
        return rope_from_config(config, config.qk_rope_head_dim, interleaved=self.rope_interleaved(config),
                                max_position=ctx.max_position)

    def rope_interleaved(self, config) -> bool:
        """Whether rotary turns interleaved pairs (V2 always does) rather than halves."""
        return True

    def dense_mlp_bias(self, config) -> bool:
        return bool(getattr(config, "mlp_bias", False))

    def make_attention(self, config, ctx: ModelContext, layer_id: int, rotary: RotaryEmbedding | None,
                       **overrides) -> nn.Module:
        return MultiHeadLatentAttention(config, ctx, f"{layer_prefix(layer_id)}.self_attn", layer_id, rotary)

    def make_mlp(self, config, ctx: ModelContext, layer_id: int) -> nn.Module:
        experts = getattr(config, "n_routed_experts", None)
        first_dense = getattr(config, "first_k_dense_replace", None) or 0
        if experts is not None and layer_id >= first_dense:
            raise ValueError(f"first_k_dense_replace: layer {layer_id} is an MoE layer (first_k_dense_replace "
                             f"{first_dense} < num_hidden_layers {config.num_hidden_layers}, n_routed_experts "
                             f"{experts}); DeepSeek MoE layers are not supported yet")
        return GatedMLP(ctx, f"{layer_prefix(layer_id)}.mlp", config.hidden_size, config.intermediate_size,
                        config.hidden_act, self.dense_mlp_bias(config))

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        super().load_weights((name, tensor) for name, tensor in weights if not self._is_mtp_weight(name))

    def _is_mtp_weight(self, name: str) -> bool:
        """A tensor of a multi-token-prediction layer: a layer index past the decoder's."""
        match = _LAYER_INDEX.match(name)
        return match is not None and int(match.group(1)) >= self.config.num_hidden_layers


class DeepseekV3ForCausalLM(DeepseekV2ForCausalLM):
    """DeepSeek-V3 / R1 with dense layers only: ``rope_interleave`` (default true) picks the rotary
    layout; the dense MLPs never have biases (transformers' V3 reads no ``mlp_bias``)."""

    def rope_interleaved(self, config) -> bool:
        return bool(getattr(config, "rope_interleave", True))

    def dense_mlp_bias(self, config) -> bool:
        return False

"""The Llama family (Llama 2/3/3.x, Mistral, Mistral NeMo, Yi, SmolLM2): pre-norm layers of
grouped-query attention with rotary and a gated MLP, RMSNorm - the arrangement the core's
``DecoderLM`` builds by default. Llama and Mistral differ in one field: Mistral attends within
``sliding_window`` when its config sets one; Llama attends over the whole sequence whatever its
config says (llamafied Qwen or Mistral checkpoints carry a ``sliding_window`` transformers' Llama ignores)."""

from __future__ import annotations

from torch import nn

from sglang_core.layers.rotary import RotaryEmbedding
from sglang_core.layers.transformer import DecoderLM
from sglang_core.model_executor.model_api import ModelContext


class LlamaForCausalLM(DecoderLM):
    """``LlamaForCausalLM``: full attention on every layer."""

    def make_attention(self, config, ctx: ModelContext, layer_id: int, rotary: RotaryEmbedding | None,
                       **overrides) -> nn.Module:
        return super().make_attention(config, ctx, layer_id, rotary, **{"sliding_window": None, **overrides})


class MistralForCausalLM(DecoderLM):
    """``MistralForCausalLM``: ``sliding_window`` on every layer (None: full attention), as the core
    reads it; no biases (transformers' Mistral reads no ``attention_bias`` or ``mlp_bias``)."""

    attention_bias_field = None
    mlp_bias_field = None

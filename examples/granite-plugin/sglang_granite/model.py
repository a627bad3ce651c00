"""IBM Granite on sglang-core, written as a thin layer over the built-in Llama plugin.

Granite (``GraniteForCausalLM`` in transformers) is Llama plus four scalars from its config:

* ``embedding_multiplier``: token embeddings are multiplied by it before the first layer;
* ``residual_multiplier``: each sublayer's output (attention, MLP) is multiplied by it before it
  is added to the residual stream: ``h = h + m * sublayer(norm(h))``;
* ``attention_multiplier``: the softmax scale, used instead of ``1 / sqrt(head_dim)``;
* ``logits_scaling``: the LM head's logits are divided by it.

Weight names, the MLP, attention projections, rotary embedding and norms are Llama's, so the
weight loader, the fused q/k/v and gate/up tables and the tied-embedding handling are inherited.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from sglang_core.layers.rotary import RotaryEmbedding
from sglang_core.model_executor.forward_batch import ForwardBatch
from sglang_core.model_executor.model_api import ModelContext
from sglang_plugins.models.llama.model import LlamaDecoderLayer, LlamaForCausalLM, LlamaModel


class GraniteDecoderLayer(LlamaDecoderLayer):
    """Llama's layer with Granite's attention scale and scaled sublayer outputs.

    The Llama layer fuses each residual add into the following RMSNorm: it returns the MLP output
    and the residual *separately*, and the next norm computes ``norm(x + residual)``. So the
    multiplier is applied to each sublayer's output before it is handed on, which yields exactly
    ``residual + residual_multiplier * sublayer(...)`` inside the next fused norm.
    """

    def __init__(self, config, ctx: ModelContext, layer_id: int, prefix: str, rotary: RotaryEmbedding):
        super().__init__(config, ctx, layer_id, prefix, rotary)
        self.residual_multiplier = float(config.residual_multiplier)
        # Granite's softmax scale replaces 1/sqrt(head_dim). The layer's spec is read when the
        # engine builds its KV pool and attention backend, after the model is built.
        attn = self.self_attn.attn
        attn.spec = replace(attn.spec, scaling=float(config.attention_multiplier))

    def forward(self, positions: torch.Tensor, x: torch.Tensor, residual: torch.Tensor | None,
                batch: ForwardBatch) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            residual, x = x, self.input_layernorm(x)
        else:
            x, residual = self.input_layernorm(x, residual)
        x = self.self_attn(positions, x, batch) * self.residual_multiplier
        x, residual = self.post_attention_layernorm(x, residual)
        return self.mlp(x) * self.residual_multiplier, residual


class GraniteModel(LlamaModel):
    """Llama's decoder stack with Granite layers and scaled input embeddings."""

    decoder_layer_cls = GraniteDecoderLayer

    def __init__(self, config, ctx: ModelContext):
        super().__init__(config, ctx)
        self.embedding_multiplier = float(config.embedding_multiplier)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        # Scale the looked-up rows, not the table: with tied embeddings the same table is the
        # (unscaled) LM head.
        return self.embed_tokens(input_ids) * self.embedding_multiplier


class GraniteForCausalLM(LlamaForCausalLM):
    """``GraniteForCausalLM``: forward and load_weights are Llama's; logits are divided by
    ``logits_scaling``."""

    model_cls = GraniteModel

    def __init__(self, config, ctx: ModelContext):
        super().__init__(config, ctx)
        self.logits_scaling = float(config.logits_scaling)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return super().compute_logits(hidden) / self.logits_scaling

"""The Llama family (Llama 2/3/3.x, Mistral, Mistral NeMo, Yi, SmolLM2): pre-norm layers of
grouped-query attention with rotary and a gated MLP, RMSNorm - the arrangement the core's
``DecoderLM`` builds by default, so nothing here overrides it."""

from __future__ import annotations

from sglang_core.layers.transformer import DecoderLM


class LlamaForCausalLM(DecoderLM):
    """``LlamaForCausalLM`` and ``MistralForCausalLM`` (per-model ``sliding_window``)."""

"""The Qwen family: Qwen 1.5 / 2 / 2.5 (``Qwen2ForCausalLM``) and Qwen 3 (``Qwen3ForCausalLM``).

Both are Llama's arrangement with two differences:

* attention biases: Qwen2 always has q/k/v biases and no o_proj bias; Qwen3 has biases on all
  four projections or none, as ``attention_bias`` says, and RMS-normalises each head of q and k
  (``q_norm`` / ``k_norm`` over ``head_dim``, eps ``rms_norm_eps``) before the rotary;
* a sliding window on some layers only: transformers marks each layer in ``layer_types``
  (``"sliding_attention"`` or ``"full_attention"``), filled from the config when absent - with
  ``use_sliding_window`` the layers from ``max_window_layers`` on slide, and without it
  ``sliding_window`` is dropped, so no layer slides.
"""

from __future__ import annotations

from torch import nn

from sglang_core.layers.rotary import RotaryEmbedding
from sglang_core.layers.transformer import DecoderLM, rms_qk_norms
from sglang_core.model_executor.model_api import ModelContext

LAYER_TYPES = ("full_attention", "sliding_attention")


def layer_window(config, layer_id: int) -> int | None:
    """``sliding_window`` for a layer ``layer_types`` marks sliding, None for a full-attention one."""
    kind = config.layer_types[layer_id]
    if kind not in LAYER_TYPES:
        raise ValueError(f"layer_types: layer {layer_id} is {kind!r}; Qwen layers are one of {', '.join(LAYER_TYPES)}")
    if kind == "full_attention":
        return None
    if config.sliding_window is None:  # transformers drops it when use_sliding_window is off
        raise ValueError(f"sliding_window: layer {layer_id} is a sliding_attention layer but the config has no "
                         "sliding_window (is use_sliding_window false?)")
    return config.sliding_window


class Qwen2ForCausalLM(DecoderLM):
    """Qwen 1.5, 2 and 2.5: q/k/v biases, no o_proj bias, per-layer sliding windows; no MLP bias
    (nor in Qwen 3: transformers reads no ``mlp_bias`` for either)."""

    mlp_bias_field = None

    def make_attention(self, config, ctx: ModelContext, layer_id: int, rotary: RotaryEmbedding | None,
                       **overrides) -> nn.Module:
        options = {"qkv_bias": True, "o_bias": False, "sliding_window": layer_window(config, layer_id), **overrides}
        return super().make_attention(config, ctx, layer_id, rotary, **options)


class Qwen3ForCausalLM(Qwen2ForCausalLM):
    """Qwen 3: ``attention_bias`` on all four projections, per-head q/k RMSNorm."""

    def make_attention(self, config, ctx: ModelContext, layer_id: int, rotary: RotaryEmbedding | None,
                       **overrides) -> nn.Module:
        bias = config.attention_bias
        options = {"qkv_bias": bias, "o_bias": bias, **rms_qk_norms(config, ctx), **overrides}
        return super().make_attention(config, ctx, layer_id, rotary, **options)

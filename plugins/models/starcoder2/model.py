"""StarCoder2 (``Starcoder2ForCausalLM``): pre-norm layers like Llama's, but

* LayerNorm with a bias (eps ``norm_epsilon``) instead of RMSNorm;
* an ungated MLP ``c_proj(act(c_fc(x)))``, ``act`` from ``hidden_act``;
* ``use_bias``: biases on every linear layer (q/k/v/o, c_fc, c_proj) or none; the LM head has none;
* ``sliding_window`` on every layer (None: full attention);
* the LM head tied to the embedding by default (``tie_word_embeddings``).
"""

from __future__ import annotations

from torch import nn

from sglang_core.layers.norm import LayerNorm
from sglang_core.layers.rotary import RotaryEmbedding
from sglang_core.layers.transformer import MLP, QKV_GATE_UP, DecoderLM, layer_prefix
from sglang_core.model_executor.model_api import ModelContext


class Starcoder2ForCausalLM(DecoderLM):
    # The MLP's c_fc / c_proj are the core MLP's up_proj / down_proj; only q/k/v are fused.
    stacked_params = {name: QKV_GATE_UP[name] for name in ("q_proj", "k_proj", "v_proj")}
    checkpoint_renames = ((r"\.mlp\.c_fc\.", ".mlp.up_proj."), (r"\.mlp\.c_proj\.", ".mlp.down_proj."))

    def make_norm(self, config, ctx: ModelContext) -> nn.Module:
        return LayerNorm(config.hidden_size, config.norm_epsilon, bias=True, params_dtype=ctx.dtype)

    def make_attention(self, config, ctx: ModelContext, layer_id: int, rotary: RotaryEmbedding | None,
                       **overrides) -> nn.Module:
        options = {"qkv_bias": config.use_bias, "o_bias": config.use_bias, **overrides}
        return super().make_attention(config, ctx, layer_id, rotary, **options)

    def make_mlp(self, config, ctx: ModelContext, layer_id: int) -> nn.Module:
        return MLP(ctx, f"{layer_prefix(layer_id)}.mlp", config.hidden_size, config.intermediate_size,
                   config.hidden_act, config.use_bias)

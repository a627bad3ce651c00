"""MiniCPM 1, 2 and 4 (``MiniCPMForCausalLM``, custom code shipped with the checkpoints as
modeling_minicpm.py; transformers has no class for it. MiniCPM3 is another architecture,
``MiniCPM3ForCausalLM``).

Llama's arrangement and weight names with three scalars from the config (muP-style):

* ``scale_emb`` multiplies the token embeddings;
* ``scale_depth / sqrt(num_hidden_layers)`` multiplies each sublayer's output before the residual add;
* the LM head reads ``hidden / (hidden_size / dim_model_base)``;

and the LM head tied to the embeddings unless ``tie_word_embeddings`` is false (MiniCPMConfig's
default is True; MiniCPM 2's config.json leaves it out). Rope scaling: ``linear`` and ``dynamic``
(MiniCPM 1/2), ``longrope`` (MiniCPM 4, see ``make_rotary``).
"""

from __future__ import annotations

import math

from sglang_core.layers.attention_spec import HeadShape
from sglang_core.layers.rotary import RotaryEmbedding, rope_parameters
from sglang_core.layers.transformer import DecoderLM
from sglang_core.model_executor.model_api import ModelContext


class MiniCPMForCausalLM(DecoderLM):
    # MiniCPMConfig's defaults (configuration_minicpm.py) that differ from the core's, for fields
    # a config.json may omit.
    config_defaults = {"tie_word_embeddings": True, "rms_norm_eps": 1e-6, "scale_emb": 1, "dim_model_base": 1,
                       "scale_depth": 1}
    mlp_bias_field = None  # modeling_minicpm.py's MLP has no bias

    def __init__(self, config, ctx: ModelContext):
        _check_supported(config)
        super().__init__(config, ctx)
        self.model.embedding_multiplier = float(config.scale_emb)
        self.logit_scale = float(config.dim_model_base) / config.hidden_size

    def make_rotary(self, config, ctx: ModelContext) -> RotaryEmbedding:
        """The core's rotary for the rope types modeling_minicpm.py has, and LongRoPE as it builds
        it: one cos/sin table for ``max_position_embeddings`` positions, so its ``long_factor``
        whenever that exceeds ``original_max_position_embeddings`` (whatever the length served),
        scaled by ``sqrt(1 + ln(max_position_embeddings / original) / ln(original))``. The runner
        serves no more than ``max_position_embeddings`` tokens, so the table covers every position.
        Nothing changes when a sequence crosses the original length, so unlike Phi-3 the model
        declares no ``kv_recompute_length``."""
        params = rope_parameters(config)
        kind = params["rope_type"]
        if kind not in ("default", "linear", "dynamic", "longrope"):
            raise ValueError(f"rope_scaling: modeling_minicpm.py has no rope type {kind!r} "
                             "(it has linear, dynamic, longrope)")
        if kind != "longrope":
            return super().make_rotary(config, ctx)
        max_len, old_len = config.max_position_embeddings, params["original_max_position_embeddings"]
        scaling = {**params, "attention_factor": math.sqrt(1 + math.log(max_len / old_len) / math.log(old_len))}
        return RotaryEmbedding(HeadShape.from_config(config).head_dim, max_len, params["rope_theta"], scaling)

    def make_attention(self, config, ctx, layer_id, rotary, **overrides):
        # No sliding window: modeling_minicpm.py attends over the whole sequence whatever the config says.
        return super().make_attention(config, ctx, layer_id, rotary, sliding_window=None, **overrides)

    def make_layer(self, config, ctx, layer_id, rotary):
        layer = super().make_layer(config, ctx, layer_id, rotary)
        layer.residual_multiplier = float(config.scale_depth) / math.sqrt(config.num_hidden_layers)
        return layer


def _check_supported(config) -> None:
    """Refuse the MiniCPMForCausalLM variants this plugin does not implement."""
    if getattr(config, "num_experts", None):
        raise ValueError("num_experts: MiniCPM-MoE's expert layers are not supported")
    if getattr(config, "sparse_config", None) is not None:
        raise ValueError("sparse_config: InfLLM v2 sparse attention is not supported (without the field "
                         "MiniCPM 4 attends densely)")
    if getattr(config, "pretraining_tp", 1) != 1:
        # modeling_minicpm.py then splits the LM head and skips the dim_model_base scaling.
        raise ValueError(f"pretraining_tp: only 1 is supported, got {config.pretraining_tp}")

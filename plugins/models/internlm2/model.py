"""InternLM2 / InternLM2.5 (``InternLM2ForCausalLM``, custom code shipped with the checkpoints as
modeling_internlm2.py; transformers has no class for it).

Llama's arrangement under other names, with two differences:

* q, k and v are one checkpoint tensor ``attention.wqkv`` stored per KV group (each KV head's
  query heads, then its key head, then its value head), reordered to ``[q; k; v]`` on load;
* ``bias`` (default True) puts a bias on ``wqkv`` and ``wo`` (never on the MLP).

Rope scaling ``linear`` and ``dynamic`` (``{"type", "factor"}``, the original length being
``max_position_embeddings``) is the core's.
"""

from __future__ import annotations

from typing import Iterable, Iterator

import torch

from sglang_core.layers.attention_spec import HeadShape
from sglang_core.layers.parallel import ungroup_qkv
from sglang_core.layers.rotary import rope_parameters
from sglang_core.layers.transformer import DecoderLM


class InternLM2ForCausalLM(DecoderLM):
    # InternLM2Config's defaults (configuration_internlm2.py) that differ from the core's, for
    # fields a config.json may omit.
    config_defaults = {"bias": True, "rms_norm_eps": 1e-6}
    mlp_bias_field = None  # modeling_internlm2.py's MLP has no bias
    checkpoint_renames = (
        (r"^model\.tok_embeddings\.", "model.embed_tokens."),
        (r"\.attention\.wqkv\.", ".self_attn.qkv_proj."),
        (r"\.attention\.wo\.", ".self_attn.o_proj."),
        (r"\.feed_forward\.w1\.", ".mlp.gate_proj."),
        (r"\.feed_forward\.w3\.", ".mlp.up_proj."),
        (r"\.feed_forward\.w2\.", ".mlp.down_proj."),
        (r"\.attention_norm\.", ".input_layernorm."),
        (r"\.ffn_norm\.", ".post_attention_layernorm."),
        (r"^output\.", "lm_head."),
    )

    def make_rotary(self, config, ctx):
        kind = rope_parameters(config)["rope_type"]
        if kind not in ("default", "linear", "dynamic"):
            raise ValueError(f"rope_scaling: modeling_internlm2.py has no rope type {kind!r} (it has linear, dynamic)")
        return super().make_rotary(config, ctx)

    def make_attention(self, config, ctx, layer_id, rotary, **overrides):
        bias = bool(config.bias)
        # No sliding window: modeling_internlm2.py attends over the whole sequence whatever the config says.
        return super().make_attention(config, ctx, layer_id, rotary, qkv_bias=bias, o_bias=bias, sliding_window=None,
                                      **overrides)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        super().load_weights(self._ungrouped(weights, HeadShape.from_config(self.config)))

    @staticmethod
    def _ungrouped(weights: Iterable[tuple[str, torch.Tensor]],
                   shape: HeadShape) -> Iterator[tuple[str, torch.Tensor]]:
        """The checkpoint's tensors with each grouped ``wqkv`` weight and bias reordered to ``[q; k; v]``."""
        for name, tensor in weights:
            if ".attention.wqkv." in name:
                if not name.endswith((".wqkv.weight", ".wqkv.bias")):
                    # A quantized tensor packs rows its own way; reordering it by rows would scramble it.
                    raise ValueError(f"{name}: a grouped wqkv is reordered only as a plain weight or bias")
                tensor = ungroup_qkv(tensor, shape.num_heads, shape.num_kv_heads, shape.head_dim)
            yield name, tensor

"""The custom-code families (InternLM2, MiniCPM, Grok-1) beyond the contract suite: MiniCPM's
LongRoPE table against the reference for every relation of ``max_position_embeddings`` to the
original length, and the variants the plugins refuse, each with a ValueError naming the field.
Configs go through ``load_config`` from a saved config.json with ``auto_map``, as a checkpoint's do."""

from __future__ import annotations

import pytest
import torch

from custom_code_references import grok1, heads_of, internlm2, minicpm, rope_cos_sin
from model_contract import tiny
from sglang_core.model_executor.model_api import ModelContext
from sglang_core.weights.loader import load_config
from sglang_plugins.models.grok1.model import Grok1ModelForCausalLM
from sglang_plugins.models.internlm2.model import InternLM2ForCausalLM
from sglang_plugins.models.minicpm.model import MiniCPMForCausalLM

LONGROPE = {"rope_type": "longrope", "original_max_position_embeddings": 256, "short_factor": [1.0, 1.0, 1.1, 1.2, 1.4, 1.6, 1.9, 2.2],
            "long_factor": [1.0, 1.5, 2.5, 4.0, 6.0, 9.0, 13.0, 18.0]}
YARN = {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 256}


def _loaded(build, tmp_path, **fields):
    """The config ``build`` makes from ``fields``, saved and read back as the engine reads it."""
    config, _ = build(**tiny(**fields))
    config.save_pretrained(tmp_path)
    return config, load_config(tmp_path)


@pytest.mark.parametrize("original", [256, 512, 1024])
def test_minicpm_longrope_table_matches_reference(tmp_path, original):
    """Long factors and a magnified table above the original length, short ones and a plain table
    at it, short ones and a shrunk table below it; served context shorter than all of them."""
    reference, config = _loaded(minicpm, tmp_path,
                                rope_scaling={**LONGROPE, "original_max_position_embeddings": original})
    model = MiniCPMForCausalLM(config, ModelContext(max_position=100))
    rotary = model.model.layers[0].self_attn.rotary
    cos, sin = rope_cos_sin(reference, heads_of(reference)[2], reference.max_position_embeddings)
    half = cos.shape[1] // 2
    torch.testing.assert_close(rotary.cos_cache, cos[:, :half])
    torch.testing.assert_close(rotary.sin_cache, sin[:, :half])


@pytest.mark.parametrize("cls, build, fields, field", [
    (MiniCPMForCausalLM, minicpm, {"num_experts": 8, "num_experts_per_tok": 2}, "num_experts"),
    (MiniCPMForCausalLM, minicpm, {"sparse_config": {"topk": 64, "dense_len": 8192}}, "sparse_config"),
    (MiniCPMForCausalLM, minicpm, {"pretraining_tp": 2}, "pretraining_tp"),
    (MiniCPMForCausalLM, minicpm, {"rope_scaling": YARN}, "rope_scaling"),
    (InternLM2ForCausalLM, internlm2, {"rope_scaling": LONGROPE}, "rope_scaling"),
    (Grok1ModelForCausalLM, grok1, {"max_attn_value": 0.0}, "max_attn_value"),
])
def test_unsupported_variants_name_the_field(tmp_path, cls, build, fields, field):
    _, config = _loaded(build, tmp_path, **fields)
    with pytest.raises(ValueError, match=field):
        cls(config, ModelContext())


def test_internlm2_refuses_a_quantized_grouped_wqkv(tmp_path):
    """A packed tensor's rows are not heads: reordering them as if they were would scramble it."""
    _, config = _loaded(internlm2, tmp_path)
    model = InternLM2ForCausalLM(config, ModelContext())
    with pytest.raises(ValueError, match="wqkv.qweight"):
        model.load_weights([("model.layers.0.attention.wqkv.qweight", torch.zeros(8, 128, dtype=torch.int32))])

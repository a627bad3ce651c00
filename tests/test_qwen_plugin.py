"""Qwen configs that transformers accepts but cannot run as Qwen: refused with a ValueError naming
the field (the contract suite, tests/test_model_contract.py, covers the configs it runs)."""

from __future__ import annotations

import pytest
import transformers

from model_contract import tiny
from sglang_core.model_executor.model_api import ModelContext
from sglang_plugins.models.qwen2.model import Qwen2ForCausalLM, Qwen3ForCausalLM


@pytest.mark.parametrize("config_cls, model_cls", [(transformers.Qwen2Config, Qwen2ForCausalLM),
                                                   (transformers.Qwen3Config, Qwen3ForCausalLM)])
def test_layer_type_other_than_full_or_sliding_is_refused(config_cls, model_cls):
    # transformers knows chunked_attention (Llama 4), but its Qwen models have no mask for it.
    config = config_cls(**tiny(layer_types=["full_attention", "chunked_attention"]))
    with pytest.raises(ValueError, match=r"layer_types: layer 1 is 'chunked_attention'"):
        model_cls(config, ModelContext())


def test_sliding_layer_without_a_window_is_refused():
    # use_sliding_window false drops sliding_window; transformers' Qwen2 then fails on the sliding layer.
    config = transformers.Qwen2Config(**tiny(use_sliding_window=False, sliding_window=8,
                                             layer_types=["sliding_attention", "full_attention"]))
    with pytest.raises(ValueError, match=r"sliding_window: layer 0 is a sliding_attention layer"):
        Qwen2ForCausalLM(config, ModelContext())

"""Cohere configs that transformers accepts but cannot run: refused with a ValueError naming the
field (the contract suite, tests/test_model_contract.py, covers the configs it runs)."""

from __future__ import annotations

import pytest
import transformers

from model_contract import tiny
from sglang_core.model_executor.model_api import ModelContext
from sglang_plugins.models.cohere.model import Cohere2ForCausalLM


def test_sliding_layer_without_a_window_is_refused():
    # Without sliding_window transformers' Cohere2 fails building the sliding layer's mask.
    # (tiny() drops a None, leaving Cohere2Config's default window: the None goes in apart.)
    config = transformers.Cohere2Config(**tiny(layer_types=["full_attention", "sliding_attention"]), sliding_window=None)
    with pytest.raises(ValueError, match=r"^sliding_window: layer 1 is a sliding_attention layer"):
        Cohere2ForCausalLM(config, ModelContext())

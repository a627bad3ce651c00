"""GPTBigCode configs the plugin refuses: a ValueError naming the field (the contract suite,
tests/test_model_contract.py, covers what it serves)."""

from __future__ import annotations

import pytest
from transformers import GPTBigCodeConfig

from model_contract import BIGCODE_TINY
from sglang_core.model_executor.model_api import ModelContext
from sglang_plugins.models.gpt_bigcode.model import GPTBigCodeForCausalLM


def test_cross_attention_is_refused():
    with pytest.raises(ValueError, match="add_cross_attention"):
        GPTBigCodeForCausalLM(GPTBigCodeConfig(**BIGCODE_TINY, add_cross_attention=True), ModelContext())


def test_heads_must_divide_the_width():
    with pytest.raises(ValueError, match="n_head"):
        GPTBigCodeForCausalLM(GPTBigCodeConfig(**{**BIGCODE_TINY, "n_head": 5}), ModelContext())

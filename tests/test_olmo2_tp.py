"""OLMo 2 across two tensor-parallel ranks (gloo on the CPU): its q/k norms run over every head
of the projection, which each rank holds only part of (``ProjectionRMSNorm``). One KV head over
two ranks: the query heads split, the key head replicated on both."""

from __future__ import annotations

import random

import pytest
import transformers

from model_contract import tiny
from sglang_core.engine import Engine
from test_model_contract import CHUNK, _randomize, _reference_greedy, _save

NEW_TOKENS = 8


def test_two_ranks_match_reference(tmp_path):
    config = transformers.Olmo2Config(**tiny(num_key_value_heads=1, rms_norm_eps=0.05))
    model = transformers.Olmo2ForCausalLM(config).float().eval()
    _randomize(model, seed=2)
    _save(tmp_path, config, model)
    rng = random.Random(2)
    prompts = [[rng.randrange(3, config.vocab_size) for _ in range(n)] for n in (5, 40)]
    with Engine(str(tmp_path), device="cpu", chunked_prefill_size=CHUNK, tp_size=2) as engine:
        results = engine.generate(input_ids=prompts, return_logprob=True,
                                  sampling_params={"temperature": 0, "ignore_eos": True, "max_new_tokens": NEW_TOKENS})
        engine.check_memory()
    for prompt, result in zip(prompts, results):
        tokens, logprobs = _reference_greedy(model, prompt, NEW_TOKENS)
        assert result["output_ids"] == tokens, f"prompt of {len(prompt)} tokens"
        got = [logprob for logprob, _token, _text in result["meta_info"]["output_token_logprobs"]]
        assert got == pytest.approx(logprobs, abs=1e-4), f"prompt of {len(prompt)} tokens"

"""``Engine.select`` picks what an independent computation of the normalised logprobs picks:
HF transformers (float32, CPU) on the same weights and the same token ids."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from sglang_core.engine import Engine

CASES = [
    ("The capital of France is", [" Paris", " London", " a small village in Peru"]),
    ("2 + 2 =", [" 4", " 5", " twenty-two"]),
    ("My favourite colour is", [" blue", " green", " the colour of the sky at noon", " red"]),
]


@pytest.fixture(scope="module")
def engine():
    with Engine(device="cpu") as engine:
        yield engine


@pytest.fixture(scope="module")
def hf(default_model_folder):
    return AutoModelForCausalLM.from_pretrained(default_model_folder, dtype=torch.float32).eval()


def hf_choice_logprobs(hf, tokenizer, prompt: str, choice: str) -> list[float]:
    prompt_ids = tokenizer(prompt)["input_ids"]
    ids = tokenizer(prompt + choice)["input_ids"]
    start = next((i for i, (a, b) in enumerate(zip(prompt_ids, ids)) if a != b), min(len(prompt_ids), len(ids)))
    start = max(1, min(start, len(ids) - 1))
    with torch.no_grad():
        logprobs = torch.log_softmax(hf(torch.tensor([ids])).logits[0].float(), dim=-1)
    return [float(logprobs[p - 1, ids[p]]) for p in range(start, len(ids))]


@pytest.mark.parametrize("prompt, choices", CASES)
@pytest.mark.parametrize("method", ["token_length_normalized", "greedy_token_selection"])
def test_select_matches_hf(engine, hf, prompt, choices, method):
    expected = [hf_choice_logprobs(hf, engine.tokenizer, prompt, c) for c in choices]
    if method == "token_length_normalized":
        scores = [sum(lps) / len(lps) for lps in expected]
        best = max(range(len(choices)), key=scores.__getitem__)
    else:
        best = max(range(len(choices)), key=lambda i: expected[i])
    result = engine.select(prompt, choices, method=method)
    assert result["index"] == best and result["choice"] == choices[best]
    for got, want in zip(result["token_logprobs"], expected):
        assert got == pytest.approx(want, abs=2e-3)


@pytest.mark.parametrize("args, field", [(("", ["a"]), "prompt"), (("x", []), "choices"), (("x", ["a", ""]), "choices"),
                                         (("x", ["a"], "best"), "method")])
def test_select_bad_input(engine, args, field):
    with pytest.raises(ValueError, match=f"^{field}:"):
        engine.select(*args)

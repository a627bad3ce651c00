"""``Engine.select`` picks what an independent computation of each choices method picks:
HF transformers (float32, CPU) on the same weights and the same token ids."""

from __future__ import annotations

import pytest

from reference import expected_choice, hf_choice_logprobs
from sglang_core.choices import CHOICE_METHODS
from sglang_core.engine import Engine

CASES = [
    ("The capital of France is", [" Paris", " London", " a small village in Peru"]),
    ("2 + 2 =", [" 4", " 5", " twenty-two"]),
    ("My favourite colour is", [" blue", " green", " the colour of the sky at noon", " red"]),
    ("The capital of France is", [" Paris", " Antidisestablishmentarianism"]),
]


@pytest.fixture(scope="module")
def engine():
    with Engine(device="cpu") as engine:
        yield engine


@pytest.fixture(scope="module")
def hf(hf_model):
    return hf_model


@pytest.mark.parametrize("prompt, choices", CASES)
@pytest.mark.parametrize("method", CHOICE_METHODS)
def test_select_matches_hf(engine, hf, prompt, choices, method):
    expected = [hf_choice_logprobs(hf, engine.tokenizer, prompt, c) for c in choices]
    conditional, unconditional = [e[0] for e in expected], [e[1] for e in expected]
    best = expected_choice(method, conditional, unconditional)
    result = engine.select(prompt, choices, method=method)
    assert result["index"] == best and result["choice"] == choices[best]
    for got, want in zip(result["token_logprobs"], conditional):
        assert got == pytest.approx(want, abs=2e-3)
    if method == "unconditional_likelihood_normalized":
        for got, want in zip(result["unconditional_logprobs"], unconditional):
            assert [0.0 if g is None else g for g in got] == pytest.approx(want, abs=2e-3)


@pytest.mark.parametrize("args, field", [(("", ["a"]), "prompt"), (("x", []), "choices"), (("x", ["a", ""]), "choices"),
                                         (("x", ["a"], "best"), "method")])
def test_select_bad_input(engine, args, field):
    with pytest.raises(ValueError, match=f"^{field}:"):
        engine.select(*args)


def test_greedy_ties_survive_float_noise_between_batches():
    """' 4' and ' 5' both start with the token ' ': the same true logprob, computed in two
    requests whose last bits may differ. The tie goes to the second token, not to the noise."""
    from sglang_core.choices import pick_choice

    noisy = [[-0.14701232, -2.17030096], [-0.14701226, -2.77281713], [-14.02, -0.73, -0.71]]
    assert pick_choice("greedy_token_selection", noisy).index == 0
    assert pick_choice("greedy_token_selection", [[-0.5, -9.0], [-0.4, -0.1]]).index == 1  # a real difference

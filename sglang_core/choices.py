"""Choosing among fixed continuations by their logprobs: the one scoring rule that ``Engine.select``
and the frontend language's ``RuntimeEndpoint.select`` share.

Both split each ``prompt + choice`` into tokens the same way (:func:`choice_spans`), get the
model's logprob of every choice token, and pick with :func:`pick_choice`. This module imports
neither torch nor the engine, so a client process can use it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

from sglang_core.lang.backend import CHOICE_METHODS

__all__ = ["CHOICE_METHODS", "ChoiceSpan", "Decision", "check_select_args", "choice_spans", "pick_choice"]


# Logprobs closer than this (nats) are a tie for greedy_token_selection: float noise between
# batches is ~1e-6 in float32, and real differences between distinct tokens are far larger.
GREEDY_TIE = 1e-4


@dataclass(frozen=True)
class ChoiceSpan:
    """``ids`` is the tokenization of ``prompt + choice``; the choice's tokens are ``ids[start:]``."""

    ids: list[int]
    start: int

    @property
    def choice_ids(self) -> list[int]:
        return self.ids[self.start:]


@dataclass(frozen=True)
class Decision:
    index: int
    scores: list[float]  # one per choice, higher is better, by the method's own measure


def check_select_args(prompt: Any, choices: Any, method: Any) -> None:
    """``ValueError`` naming the field for a bad ``select`` call."""
    if not isinstance(prompt, str) or not prompt:
        raise ValueError("prompt: must be a non-empty string")
    if not isinstance(choices, list) or not choices or not all(isinstance(c, str) and c for c in choices):
        raise ValueError("choices: must be a non-empty list of non-empty strings")
    if method not in CHOICE_METHODS:
        raise ValueError(f"method: must be one of {', '.join(CHOICE_METHODS)}")


def choice_spans(encode: Callable[[list[str]], list[list[int]]], prompt: str,
                 choices: Sequence[str]) -> list[ChoiceSpan]:
    """Tokenize ``prompt + choice`` for each choice and find where the choice's tokens begin.

    ``encode`` maps texts to the token ids the engine would give each as a prompt (a local
    tokenizer, or a server's ``/tokenize``); it is called once, with the prompt first. The choice
    starts where the joint tokenization leaves the prompt's own (the last prompt token may merge
    with the choice's first characters, and then it is scored as part of the choice), never at
    position 0, which has no logprob, and never past the last token.
    """
    prompt_ids, *joint = encode([prompt] + [prompt + choice for choice in choices])
    spans = []
    for ids in joint:
        start = next((i for i, (a, b) in enumerate(zip(prompt_ids, ids)) if a != b), min(len(prompt_ids), len(ids)))
        spans.append(ChoiceSpan(ids, max(1, min(start, len(ids) - 1))))
    return spans


def pick_choice(method: str, logprobs: Sequence[Sequence[float]],
                unconditional: Sequence[Sequence[float | None]] | None = None) -> Decision:
    """Pick a choice from the logprobs of each choice's tokens after the prompt.

    - ``token_length_normalized``: the highest mean logprob per token.
    - ``greedy_token_selection``: the highest first-token logprob; ties (within ``GREEDY_TIE``:
      choices that start with the same tokens have the same true logprobs there, but requests
      computed in different batches differ in the last bits) go to the next token, a shorter
      choice continuing with its own mean logprob.
    - ``unconditional_likelihood_normalized``: the highest mean of (logprob after the prompt minus
      logprob of the same token in the choice alone, ``unconditional``); the choice's first token
      has no unconditional logprob and counts 0 there.

    Ties go to the earliest choice.
    """
    if method not in CHOICE_METHODS:
        raise ValueError(f"method: must be one of {', '.join(CHOICE_METHODS)}")
    means = [sum(lps) / len(lps) for lps in logprobs]
    if method == "token_length_normalized":
        scores = means
    elif method == "greedy_token_selection":
        width = max(len(lps) for lps in logprobs)
        padded = [list(lps) + [mean] * (width - len(lps)) for lps, mean in zip(logprobs, means)]
        remaining = list(range(len(padded)))
        for column in range(width):
            best = max(padded[i][column] for i in remaining)
            remaining = [i for i in remaining if padded[i][column] >= best - GREEDY_TIE]
            if len(remaining) == 1:
                break
        return Decision(remaining[0], [row[0] for row in padded])
    else:
        if unconditional is None:
            raise ValueError("method: unconditional_likelihood_normalized needs the choices' unconditional logprobs")
        scores = []
        for lps, base in zip(logprobs, unconditional):
            if len(base) != len(lps):
                raise ValueError("unconditional: one logprob per choice token expected")
            base = [0.0 if b is None else b for b in base]
            scores.append(sum(lp - b for lp, b in zip(lps, base)) / len(lps))
    return Decision(max(range(len(scores)), key=scores.__getitem__), scores)

"""The interface a grammar backend plugin implements (hook ``register_grammar_backends``).

A backend is built once per engine as ``cls(tokenizer, vocab_size, eos_token_id)`` and turns a
constraint (``"regex"``, ``"json_schema"`` or ``"ebnf"``, and its text) into a ``Grammar``: compiled once,
shared by every request with the same constraint. Each request walks it with its own
``GrammarState``.

A compile must not outlive its ``budget``: a backend whose compile time or memory is not bounded
by itself runs it where it can be stopped (``sglang_core.constrained.worker_process``).
"""

from __future__ import annotations

import abc

import torch

from sglang_core.constrained.limits import CompileBudget, check_constraint


class GrammarState(abc.ABC):
    """One request's position in a compiled grammar."""

    @abc.abstractmethod
    def fill_bitmask(self, out: torch.Tensor) -> None:
        """Write the allowed next tokens into ``out``, an int32 CPU tensor of ``ceil(vocab / 32)``
        words: bit ``t % 32`` of word ``t // 32`` set means token ``t`` is allowed."""

    @abc.abstractmethod
    def advance(self, token_id: int) -> None:
        """Consume the sampled token."""

    @abc.abstractmethod
    def is_finished(self) -> bool:
        """True once the output is complete: only end-of-sequence may follow."""

    def forced_tokens(self, limit: int) -> list[int]:
        """Jump-forward: the tokens of the text the grammar forces from here (at most ``limit``),
        already consumed by this state; [] when the next token is a real choice. The default
        forces nothing."""
        return []


class DeferredGrammarState(GrammarState):
    """A grammar that starts once the output holds ``after`` (token ids): a reasoning model
    thinks freely, and only its answer is constrained. Until then every token is allowed."""

    def __init__(self, state: GrammarState, after: list[int]):
        self.state = state
        self.after = after
        self.recent: list[int] = []  # the last tokens, as many as ``after`` has
        self.started = False

    def fill_bitmask(self, out: torch.Tensor) -> None:
        if self.started:
            self.state.fill_bitmask(out)
        else:
            out.fill_(-1)  # every bit set

    def advance(self, token_id: int) -> None:
        if self.started:
            self.state.advance(token_id)
            return
        self.recent = (self.recent + [token_id])[-len(self.after):]
        self.started = self.recent == self.after

    def is_finished(self) -> bool:
        return self.started and self.state.is_finished()

    def forced_tokens(self, limit: int) -> list[int]:
        return self.state.forced_tokens(limit) if self.started else []


class Grammar(abc.ABC):
    @abc.abstractmethod
    def new_state(self) -> GrammarState:
        """A fresh walker at the start of the grammar."""


class GrammarBackend(abc.ABC):
    budget = CompileBudget()

    def __init__(self, tokenizer, vocab_size: int, eos_token_id: int):
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.eos_token_id = eos_token_id

    def validate(self, kind: str, spec: str) -> None:
        """Cheap checks on the request side (before anything is queued); raise ``ValueError``
        naming the field (``"regex: ..."``, ``"json_schema: ..."``). The default refuses a
        constraint past the size bounds of ``sglang_core.constrained.limits``; a backend adding
        its own checks calls it first. A backend without EBNF grammars refuses kind ``"ebnf"``
        here."""
        check_constraint(kind, spec)

    @abc.abstractmethod
    def compile(self, kind: str, spec: str) -> Grammar:
        """Compile a constraint; may take seconds (it runs in a worker thread), never past
        ``self.budget``. Raise ``ValueError`` naming the field when it cannot be compiled."""

    def close(self) -> None:
        """Release what compiling holds (worker processes); the engine is shutting down."""

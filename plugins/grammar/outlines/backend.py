"""Regex and JSON Schema constraints with outlines-core.

A JSON Schema becomes a regex (rewritten first by ``schema`` into what outlines-core compiles soundly, then
``build_regex_from_schema``, compact: no optional whitespace); a regex becomes
an ``Index``: for each automaton state, the tokens that keep the text on a path to a match. The
vocabulary is read from our own tokenizer (``sglang_core.constrained.vocab``), never a hub.

Building an index is unbounded in outlines-core (a regex whose automaton blows up when made
deterministic runs for minutes and takes gigabytes), so it runs in a child process
(``index_worker``) that is killed when it overruns the engine's compile budget.
"""

from __future__ import annotations

import json
import os
import re
import uuid
from functools import cached_property

import torch

from sglang_core.constrained.grammar import Grammar, GrammarBackend, GrammarState
from sglang_core.constrained.limits import check_regex
from sglang_core.constrained.vocab import token_bytes
from sglang_core.constrained.worker_process import LazyWorkerPool
from sglang_plugins.grammar.outlines.schema import OutlinesSchema


# The regex outlines-core writes for a schema repeats an optional property's value for each place
# it may stand, so it grows faster than the schema: 30 optional strings of up to 50 characters
# spell out about 74,000 (a 30 s compile); nested arrays' counts multiply past this at once.
MAX_SCHEMA_REGEX_SIZE = 100_000

# A state with more allowed tokens than this is a free choice, not the start of forced text.
MAX_FORCED_BRANCHING = 64
MAX_FORCED_STEPS = 200


class OutlinesState(GrammarState):
    def __init__(self, guide, eos_token_id: int, grammar: "OutlinesGrammar"):
        self.guide = guide
        self.eos_token_id = eos_token_id
        self.grammar = grammar

    def fill_bitmask(self, out: torch.Tensor) -> None:
        self.guide.write_mask_into(out.data_ptr(), out.numel(), 4)

    def advance(self, token_id: int) -> None:
        if token_id != self.eos_token_id:  # EOS ends the output; outlines has no state after it
            self.guide.advance(token_id, return_tokens=False)

    def is_finished(self) -> bool:
        return self.guide.is_finished() and self.grammar.branching(self.guide) == 0

    def forced_tokens(self, limit: int) -> list[int]:
        """Walk the text every path agrees on (the longest common prefix of the allowed tokens'
        bytes, step by step), then re-tokenize it the way the tokenizer would, so the model sees
        canonical tokens; fall back to the walked tokens where those do not fit the grammar."""
        walked = self._walk_forced()
        if not walked:
            return []
        self.guide.rollback_state(len(walked))
        text = b"".join(self.grammar.token_bytes[t] for t in walked)
        try:
            canonical = self.grammar.tokenizer.encode(text.decode("utf-8"), add_special_tokens=False)
        except UnicodeDecodeError:  # forced text ends inside a character: keep the walked tokens
            canonical = walked
        for tokens in (canonical, walked):
            done = 0
            try:
                for token in tokens[:limit]:
                    self.guide.advance(token, return_tokens=False)
                    done += 1
                return tokens[:limit]
            except ValueError:
                self.guide.rollback_state(done)
        return []

    def _walk_forced(self) -> list[int]:
        walked: list[int] = []
        data = self.grammar.token_bytes
        while len(walked) < MAX_FORCED_STEPS:
            if self.guide.is_finished() or not 0 < self.grammar.branching(self.guide) <= MAX_FORCED_BRANCHING:
                break  # may end here, or a real choice
            allowed = self.guide.get_tokens()
            common = os.path.commonprefix([data[t] for t in allowed])
            steps = [t for t in allowed if common.startswith(data[t])]
            if not common or not steps:
                break
            token = max(steps, key=lambda t: len(data[t]))
            self.guide.advance(token, return_tokens=False)
            walked.append(token)
        return walked


class OutlinesGrammar(Grammar):
    def __init__(self, index, eos_token_id: int, tokenizer, token_bytes: list[bytes]):
        self.index = index
        self.eos_token_id = eos_token_id
        self.tokenizer = tokenizer
        self.token_bytes = token_bytes
        self._branching: dict[int, int] = {}

    def branching(self, guide) -> int:
        """How many tokens other than EOS the guide's state allows, cached by state: listing a
        free state's tokens costs about a millisecond, and decoding revisits the same states."""
        state = guide.get_state()
        count = self._branching.get(state)
        if count is None:
            allowed = guide.get_tokens()
            count = self._branching[state] = len(allowed) - (self.eos_token_id in allowed)
        return count

    def new_state(self) -> OutlinesState:
        from outlines_core import Guide

        return OutlinesState(Guide(self.index, max_rollback=MAX_FORCED_STEPS), self.eos_token_id, self)


class OutlinesBackend(GrammarBackend):
    def __init__(self, tokenizer, vocab_size: int, eos_token_id: int):
        super().__init__(tokenizer, vocab_size, eos_token_id)
        self._workers = LazyWorkerPool(f"{__package__}.index_worker", self._vocabulary_setup)

    def validate(self, kind: str, spec: str) -> None:
        if kind == "ebnf":
            raise ValueError("ebnf: the outlines grammar backend has no EBNF grammars; "
                             "use --grammar-backend xgrammar (GBNF) or llguidance (Lark)")
        super().validate(kind, spec)
        regex = self._regex(kind, spec)
        try:  # outlines' syntax is close to Python's; what only outlines rejects fails at compile
            re.compile(regex)
        except re.error as exc:
            raise ValueError(f"{kind}: invalid regular expression ({exc})") from None
        if kind == "json_schema":  # the schema's counts multiply where they nest
            check_regex(kind, regex, "as a regex, ", MAX_SCHEMA_REGEX_SIZE)

    def compile(self, kind: str, spec: str) -> OutlinesGrammar:
        from outlines_core import Index

        regex = self._regex(kind, spec)
        try:
            index = Index.from_binary(self._workers.call(regex.encode(), self.budget))
        except TimeoutError as exc:
            raise ValueError(f"{kind}: compiling {exc}; stopped") from None
        except (ValueError, ChildProcessError) as exc:  # outlines' own message, or the process died
            raise ValueError(f"{kind}: cannot be compiled ({exc})") from None
        return OutlinesGrammar(index, self.eos_token_id, self.tokenizer, self._token_bytes)

    def close(self) -> None:
        self._workers.close()

    @staticmethod
    def _regex(kind: str, spec: str) -> str:
        if kind == "regex":
            return spec
        from outlines_core.json_schema import build_regex_from_schema

        # Compact JSON (no optional whitespace): fixed keys and punctuation become forced
        # text that jump-forward can append without decoding it.
        def regex_of(schema: dict) -> str:
            try:
                return build_regex_from_schema(json.dumps(schema), "")
            except Exception as exc:
                raise ValueError(f"json_schema: unsupported or invalid schema ({exc})") from None

        rewritten = OutlinesSchema(json.loads(spec), f"sglangvalue{uuid.uuid4().hex}n")
        try:
            schema = rewritten.rewrite()
        except RecursionError:
            raise ValueError("json_schema: its references refer to each other without end") from None
        regex = regex_of(schema)
        for placeholder, value_regex in rewritten.regexes.items():
            regex = regex.replace(regex_of({"const": placeholder}), f"(?:{value_regex})")
        return regex

    @cached_property
    def _token_bytes(self) -> list[bytes]:
        return [data or b"" for data in token_bytes(self.tokenizer, self.vocab_size)]

    def _vocabulary_setup(self) -> bytes:
        """What each compile process is set up with: the vocabulary (built on first compile)."""
        from outlines_core import Vocabulary

        from sglang_plugins.grammar.outlines.index_worker import binary_form

        by_bytes: dict[bytes, list[int]] = {}
        for token_id, data in enumerate(self._token_bytes):
            if data and token_id != self.eos_token_id:
                by_bytes.setdefault(data, []).append(token_id)
        return binary_form(Vocabulary(self.eos_token_id, by_bytes))

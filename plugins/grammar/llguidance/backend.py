"""Regex and JSON Schema constraints with llguidance.

llguidance turns a constraint into a grammar whose lexer automaton is built lazily, as decoding
reaches its states, and computes each step's mask by walking a trie of the vocabulary: compiling
takes milliseconds, and a JSON Schema's number ranges (``minimum`` / ``maximum`` /
``exclusiveMinimum`` / ``exclusiveMaximum``, integers and floats) are enforced, where the outlines
backend refuses them. The vocabulary is read from our own tokenizer
(``sglang_core.constrained.vocab``), never a hub.
"""

from __future__ import annotations

import json
from functools import cached_property
from typing import Any

import torch

from sglang_core.constrained.grammar import Grammar, GrammarBackend, GrammarState
from sglang_core.constrained.vocab import token_bytes

try:
    import llguidance
except ImportError as exc:  # the plugin is installed with the core; its package comes with an extra
    raise ImportError("the 'llguidance' grammar backend needs the llguidance package: "
                      "pip install 'sglang-core[llguidance]'") from exc

# Compact JSON, as the outlines backend writes it: no optional whitespace (where whitespace is
# free a small model may emit spaces forever), so fixed keys and punctuation are forced text.
# Overrides, so a schema's own "x-guidance" options cannot turn whitespace back on.
COMPACT_JSON = {"whitespace_flexible": False, "item_separator": ",", "key_separator": ":"}

# Keywords whose values are schemas, by shape; everything else (const, enum, default, ...) is data.
SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
SCHEMA_LISTS = ("allOf", "anyOf", "oneOf", "prefixItems")
SCHEMA_VALUES = ("items", "additionalProperties", "contains", "not", "if", "then", "else", "propertyNames",
                 "unevaluatedItems", "unevaluatedProperties")


# llguidance's time formats need a UTC offset after any number of fraction digits; a small model
# that will not write the offset keeps writing digits. These lengths leave 9 fraction digits
# (nanoseconds) with a "+hh:mm" offset: "23:59:60.123456789+23:59".
TIME_MAX_LENGTH = {"time": 24, "date-time": 35}


def _bounded(schema: Any, close: bool = True) -> Any:
    """The schema narrowed where llguidance would let a small model write forever (outputs stay
    valid for the original schema): an object listing properties and saying nothing of others
    gets ``"additionalProperties": false``, as in the outlines backend, and a time string without
    ``maxLength`` gets one. ``close`` False: an ``allOf`` branch, whose properties the other
    branches extend, so it stays open."""
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    for key, value in schema.items():
        if key in SCHEMA_MAPS and isinstance(value, dict):
            out[key] = {name: _bounded(sub) for name, sub in value.items()}
        elif key in SCHEMA_LISTS and isinstance(value, list):
            out[key] = [_bounded(sub, key != "allOf") for sub in value]
        elif key in SCHEMA_VALUES:
            out[key] = _bounded(value)
    if close and "properties" in out and "additionalProperties" not in out:
        out["additionalProperties"] = False
    if out.get("format") in TIME_MAX_LENGTH and "maxLength" not in out:
        out["maxLength"] = TIME_MAX_LENGTH[out["format"]]
    return out


# llguidance's default limits bound its work: building a grammar's lexer (initial_lexer_fuel,
# about 20 ms) and each mask (step_lexer_fuel, step_max_items, tens of ms), so neither compile nor
# a step can run away. Non-verbose errors keep its parser state and grammar out of messages that
# reach clients.
LIMITS = llguidance.LLParserLimits(verbose_errors=False)


class _Vocabulary:
    """Our tokenizer as ``llguidance.TokenizerWrapper`` reads it: each token's bytes, which ids
    are special (never text), EOS, and the tokenizer itself for re-tokenizing forced text."""

    def __init__(self, tokenizer, vocab_size: int, eos_token_id: int):
        data = token_bytes(tokenizer, vocab_size)
        self.special_token_ids = [i for i, b in enumerate(data) if b is None]
        self.tokens = [b if b is not None else self._name(tokenizer, i) for i, b in enumerate(data)]
        self.eos_token_id = eos_token_id
        self.bos_token_id = tokenizer.bos_token_id
        self._tokenizer = tokenizer

    @staticmethod
    def _name(tokenizer, token_id: int) -> bytes:
        """A special token's bytes: only its name in llguidance's messages; an id past the
        tokenizer (a model's padded vocabulary) gets a made-up one."""
        name = tokenizer.convert_ids_to_tokens(token_id) if token_id < len(tokenizer) else None
        return (name or f"<[{token_id}]>").encode()

    def __call__(self, text: bytes | str) -> list[int]:
        """Tokenize as the model's tokenizer does, so jump-forward appends canonical tokens."""
        if isinstance(text, bytes):  # llguidance passes valid UTF-8 only
            text = text.decode("utf-8")
        return self._tokenizer.encode(text, add_special_tokens=False)


def _error(matcher: "llguidance.LLMatcher") -> str:
    return matcher.get_error().replace("<non-verbose/>", "").strip()


class LLGuidanceState(GrammarState):
    def __init__(self, matcher: "llguidance.LLMatcher"):
        self.matcher = matcher

    def fill_bitmask(self, out: torch.Tensor) -> None:
        # llguidance's mask has our layout (32-bit words, bit t % 32 of word t // 32) and the
        # same vocabulary size, so it writes straight into the row.
        self.matcher.unsafe_compute_mask_ptr(out.data_ptr(), out.numel() * out.element_size())

    def advance(self, token_id: int) -> None:
        # EOS is consumed too: llguidance accepts it where the output may end.
        if not self.matcher.consume_token(token_id):
            raise ValueError(_error(self.matcher))

    def is_finished(self) -> bool:
        return self.matcher.is_stopped()

    def forced_tokens(self, limit: int) -> list[int]:
        """llguidance's fast-forward tokens: the forced text, tokenized by our tokenizer and cut
        before a token that the text after it could still merge with."""
        tokens = self.matcher.compute_ff_tokens()[:limit]
        return tokens[:self.matcher.try_consume_tokens(tokens)] if tokens else []


class LLGuidanceGrammar(Grammar):
    def __init__(self, matcher: "llguidance.LLMatcher"):
        self._start = matcher  # never advanced: each request walks a copy

    def new_state(self) -> LLGuidanceState:
        return LLGuidanceState(self._start.deep_copy())


class LLGuidanceBackend(GrammarBackend):
    def validate(self, kind: str, spec: str) -> None:
        super().validate(kind, spec)
        # Checks the grammar without the vocabulary: milliseconds, bounded by LIMITS.
        is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(self._grammar(kind, spec),
                                                                                limits=LIMITS)
        if is_error:
            raise ValueError(f"{kind}: {messages[0].strip()}")

    def compile(self, kind: str, spec: str) -> LLGuidanceGrammar:
        matcher = llguidance.LLMatcher(self._tokenizer, self._grammar(kind, spec), log_level=0, limits=LIMITS)
        if matcher.is_error():
            raise ValueError(f"{kind}: cannot be compiled ({_error(matcher)})")
        return LLGuidanceGrammar(matcher)

    @staticmethod
    def _grammar(kind: str, spec: str) -> str:
        if kind == "regex":
            return llguidance.LLMatcher.grammar_from_regex(spec)
        if kind == "ebnf":  # llguidance's grammars are in Lark's syntax
            return llguidance.LLMatcher.grammar_from_lark(spec)
        try:
            return llguidance.LLMatcher.grammar_from_json_schema(_bounded(json.loads(spec)),
                                                                 overrides=COMPACT_JSON)
        except ValueError as exc:  # not JSON, or not a JSON object
            raise ValueError(f"json_schema: {exc}") from None

    @cached_property
    def _tokenizer(self) -> "llguidance.LLTokenizer":
        """Built on first compile (about a second for a 50k vocabulary), in the compile thread."""
        vocabulary = _Vocabulary(self.tokenizer, self.vocab_size, self.eos_token_id)
        return llguidance.LLTokenizer(llguidance.TokenizerWrapper(vocabulary))

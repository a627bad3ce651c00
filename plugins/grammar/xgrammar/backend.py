"""Regex, JSON Schema and EBNF constraints with xgrammar.

xgrammar compiles a constraint into a grammar with a precomputed mask for each position whose
allowed tokens do not depend on the stack (most of them), and runs a pushdown parser for the
rest; number bounds (``minimum`` / ``maximum`` / exclusive, integers and floats) are enforced.
EBNF grammars are in xgrammar's GBNF dialect (``root ::= ...``). The vocabulary is read from our
own tokenizer (``sglang_core.constrained.vocab``), never a hub.

A compile is not bounded by xgrammar itself, so it runs in a child process (``compile_worker``)
that is killed when it overruns the engine's compile budget; the compiled grammar comes back in
xgrammar's JSON form.
"""

from __future__ import annotations

import json
import re
from functools import cached_property
from typing import Any

import numpy as np
import torch

from sglang_core.constrained.formats import FORMATS
from sglang_core.constrained.grammar import Grammar, GrammarBackend, GrammarState
from sglang_core.constrained.limits import DATA_KEYWORDS, SCHEMA_MAPS
from sglang_core.constrained.vocab import token_bytes
from sglang_core.constrained.worker_process import LazyWorkerPool

try:
    import xgrammar
except ImportError as exc:  # the plugin is installed with the core; its package comes with an extra
    raise ImportError("the 'xgrammar' grammar backend needs the xgrammar package: "
                      "pip install 'sglang-core[xgrammar]'") from exc

# xgrammar prefixes its messages with a time and a source location: "[02:35:41] /project/cpp/x.cc:94: ".
_MESSAGE_PREFIX = re.compile(r"^\[[^\]]*\]\s+\S+:\d+:\s*")


def _message(exc: BaseException) -> str:
    return _MESSAGE_PREFIX.sub("", str(exc).strip())


NUMBER_BOUNDS = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum")


def enforceable(schema: Any) -> Any:
    """The schema as xgrammar 0.2.9 enforces it: a string ``format`` becomes the pattern of
    ``sglang_core.constrained.formats`` (xgrammar's own dates allow November 31). What xgrammar
    would ignore with only a warning is refused, so no output silently breaks its schema:
    ``allOf``, and ``multipleOf`` except on an integer without bounds."""
    if isinstance(schema, list):
        return [enforceable(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {}
    for key, value in schema.items():
        if key in DATA_KEYWORDS:
            out[key] = value
        elif key in SCHEMA_MAPS and isinstance(value, dict):  # names map to schemas ("format" may be a name)
            out[key] = {name: enforceable(sub) for name, sub in value.items()}
        else:
            out[key] = enforceable(value)
    if "allOf" in out:
        raise ValueError("json_schema: 'allOf' is not enforced by the xgrammar backend; "
                         "use --grammar-backend outlines or llguidance")
    if "multipleOf" in out and (out.get("type") != "integer" or any(b in out for b in NUMBER_BOUNDS)):
        raise ValueError("json_schema: 'multipleOf' is enforced by the xgrammar backend only on an integer "
                         "without bounds; use --grammar-backend outlines or llguidance")
    if out.get("format") in FORMATS and "pattern" not in out:
        out["pattern"] = f"^{FORMATS[out.pop('format')]}$"
    return out


class XGrammarState(GrammarState):
    def __init__(self, matcher: "xgrammar.GrammarMatcher", eos_token_id: int, grammar: "XGrammarGrammar"):
        self.matcher = matcher
        self.eos_token_id = eos_token_id
        self.grammar = grammar

    def fill_bitmask(self, out: torch.Tensor) -> None:
        # xgrammar's mask has our layout (32-bit words, bit t % 32 of word t // 32).
        self.matcher.fill_next_token_bitmask(out)
        if self.grammar.text_only is not None:
            out.numpy().view(np.uint32)[:] &= self.grammar.text_only

    def advance(self, token_id: int) -> None:
        # EOS is consumed too: xgrammar accepts its stop token where the output may end.
        if not self.matcher.accept_token(token_id):
            raise ValueError(f"token {token_id} does not continue the grammar")

    def is_finished(self) -> bool:
        """Complete, and EOS is the only token allowed next."""
        if self.matcher.is_terminated():
            return True
        if not self.matcher.is_completed():
            return False
        words = torch.zeros(-(-self.grammar.vocab_size // 32), dtype=torch.int32)
        self.matcher.fill_next_token_bitmask(words)
        bits = words.numpy().view(np.uint32)
        bits[self.eos_token_id // 32] &= np.uint32(~(1 << (self.eos_token_id % 32)) & 0xFFFFFFFF)
        return not bits.any()

    def forced_tokens(self, limit: int) -> list[int]:
        """The text every continuation starts with, tokenized by our tokenizer; its last token is
        left to the model, since the text after it could still merge into a longer token."""
        text = self.matcher.find_jump_forward_string()
        tokens = self.grammar.tokenizer.encode(text, add_special_tokens=False)[:-1][:limit] if text else []
        for done, token in enumerate(tokens):
            if not self.matcher.accept_token(token):
                if done:
                    self.matcher.rollback(done)
                return []
        return tokens


class XGrammarGrammar(Grammar):
    def __init__(self, compiled: "xgrammar.CompiledGrammar", eos_token_id: int, tokenizer, vocab_size: int,
                 text_only: np.ndarray | None):
        self.compiled = compiled
        self.eos_token_id = eos_token_id
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.text_only = text_only  # a mask ANDed into every step's (None: none)

    def new_state(self) -> XGrammarState:
        return XGrammarState(xgrammar.GrammarMatcher(self.compiled), self.eos_token_id, self)


class XGrammarBackend(GrammarBackend):
    def __init__(self, tokenizer, vocab_size: int, eos_token_id: int):
        super().__init__(tokenizer, vocab_size, eos_token_id)
        self._workers = LazyWorkerPool(f"{__package__}.compile_worker",
                                       lambda: self._tokenizer_info.serialize_json().encode("utf-8"))

    def validate(self, kind: str, spec: str) -> None:
        super().validate(kind, spec)
        # The grammar without the vocabulary: milliseconds, and xgrammar's own errors as 400s.
        build = {"regex": xgrammar.Grammar.from_regex, "ebnf": xgrammar.Grammar.from_ebnf}.get(
            kind, lambda text: xgrammar.Grammar.from_json_schema(text, any_whitespace=False))
        text = self._constraint(kind, spec)
        try:
            build(text)
        except Exception as exc:  # xgrammar raises RuntimeError (and others) for a bad constraint
            raise ValueError(f"{kind}: {_message(exc)}") from None

    def compile(self, kind: str, spec: str) -> XGrammarGrammar:
        request = f"{kind}\0{self._constraint(kind, spec)}".encode("utf-8")
        try:
            data = self._workers.call(request, self.budget)
        except TimeoutError as exc:
            raise ValueError(f"{kind}: compiling {exc}; stopped") from None
        except (ValueError, ChildProcessError) as exc:  # xgrammar's own message, or the process died
            raise ValueError(f"{kind}: cannot be compiled ({_message(exc)})") from None
        compiled = xgrammar.CompiledGrammar.deserialize_json(data.decode("utf-8"), self._tokenizer_info)
        return XGrammarGrammar(compiled, self.eos_token_id, self.tokenizer, self.vocab_size,
                               self._no_control_characters if kind == "json_schema" else None)

    @staticmethod
    def _constraint(kind: str, spec: str) -> str:
        """The text xgrammar compiles: a JSON Schema made ``enforceable``."""
        if kind != "json_schema":
            return spec
        try:
            return json.dumps(enforceable(json.loads(spec)))
        except RecursionError:
            raise ValueError("json_schema: nested too deeply") from None

    def close(self) -> None:
        self._workers.close()

    @cached_property
    def _tokenizer_info(self) -> "xgrammar.TokenizerInfo":
        """Each token's bytes as text tokens (a special token has none: xgrammar never allows an
        empty token as text), EOS as the stop token."""
        data = [b or b"" for b in token_bytes(self.tokenizer, self.vocab_size)]
        return xgrammar.TokenizerInfo(data, xgrammar.VocabType.RAW, vocab_size=self.vocab_size,
                                      stop_token_ids=[self.eos_token_id])

    @cached_property
    def _no_control_characters(self) -> np.ndarray:
        """The tokens without a control character (below 0x20) in their bytes, as a bitmask.
        xgrammar's JSON strings admit raw tabs and the like, which JSON forbids; compact JSON has
        no whitespace, so a JSON Schema's output never needs one."""
        allowed = np.array([not data or min(data) >= 0x20 for data in token_bytes(self.tokenizer, self.vocab_size)])
        words = np.zeros(-(-self.vocab_size // 32) * 32, dtype=bool)
        words[:self.vocab_size] = allowed
        return np.packbits(words, bitorder="little").view(np.uint32)

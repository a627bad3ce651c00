"""Size bounds on constraints, checked on the request side before anything is compiled.

Compiling a grammar can cost time and memory out of all proportion to the text of the constraint:
``a{100000}`` is nine characters and a 100,000-state automaton, ``(a{100}){100}`` multiplies, and
a JSON Schema's ``minLength`` / ``maxItems`` spell out repetitions the same way. These checks
bound what a constraint spells out (bounded repeats expanded, nested ones multiplied), whatever
the backend, so such requests are refused with a clear ``ValueError`` (HTTP 400) in
milliseconds. What stays expensive within the bounds (an automaton that blows up when made
deterministic) is bounded at compile time instead, by a ``CompileBudget``.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

try:  # Python's own regex parser: the tree its compiler builds from
    import re._parser as _sre_parse
    import re._constants as _sre
except ImportError:  # Python < 3.11
    import sre_parse as _sre_parse  # type: ignore[no-redef]
    import sre_constants as _sre  # type: ignore[no-redef]


@dataclass(frozen=True)
class CompileBudget:
    """What one compile may use; None is unbounded. The engine sets its backend's
    (``GrammarBackend.budget``) from ``grammar_compile_timeout_s`` and ``grammar_compile_memory_mb``."""

    timeout_s: float | None = None
    memory_mb: int | None = None


MAX_CONSTRAINT_CHARS = 100_000  # the regex or JSON Schema text
MAX_REGEX_SIZE = 5_000  # characters a regex spells out, bounded repeats expanded
MAX_REPEAT = 5_000  # a JSON Schema's minLength, maxLength, minItems, maxItems, ...
MAX_ENUM_VALUES = 4_096
MAX_SCHEMA_NODES = 10_000  # JSON values in a schema
MAX_SCHEMA_DEPTH = 64  # nesting of JSON values in a schema

# Schema keywords whose integer value is a repetition count of the output.
COUNT_KEYWORDS = ("minLength", "maxLength", "minItems", "maxItems", "minProperties", "maxProperties",
                  "minContains", "maxContains")
# Keywords whose values are instance data, not schemas: counted, never read as keywords.
DATA_KEYWORDS = ("enum", "const", "default", "examples")
# Keywords mapping names to schemas: a property may be named "enum" or "minLength".
SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")

# Constructs no automaton-based backend can match, by the parser's node names.
UNSUPPORTED = {
    "GROUPREF": "backreferences (\\1, (?P=name)) are not supported",
    "GROUPREF_EXISTS": "conditional groups (?(1)...) are not supported",
    "ASSERT": "lookahead and lookbehind ((?=...), (?<=...)) are not supported",
    "ASSERT_NOT": "negative lookahead and lookbehind ((?!...), (?<!...)) are not supported",
    "ATOMIC_GROUP": "atomic groups (?>...) are not supported",
    "POSSESSIVE_REPEAT": "possessive repeats (*+, ++, ?+) are not supported",
}
_REPEATS = {"MAX_REPEAT", "MIN_REPEAT"}
_NO_WIDTH = {"AT"}  # anchors: ^, $, \b
_COUNT = re.compile(r"\{\s*(\d+)\s*(?:,\s*(\d*)\s*)?\}")


def regex_size(pattern: str, budget: int = MAX_REGEX_SIZE) -> int:
    """How many characters ``pattern`` spells out: single characters and classes count 1,
    alternatives add up, a bounded repeat multiplies its body by its upper bound and an unbounded
    one by its lower bound (a loop is one state however often it runs). Raises ``ValueError`` for
    the constructs no automaton can match; returns -1 when Python's parser cannot read the pattern
    (a syntax only the backend knows: its own parser judges it). Counting stops past ``budget``."""
    try:
        tree = _sre_parse.parse(pattern)
    except RecursionError:
        raise ValueError("nested too deeply") from None
    except (_sre.error, OverflowError):
        return -1
    return _size(tree, budget)


def _size(items, budget: int) -> int:
    """The size of a parsed sequence; stops counting once past ``budget`` (the answer is then
    some number above it), so a huge expansion costs no time."""
    total = 0
    for op, arg in items:
        name = op.name
        if name in UNSUPPORTED:
            raise ValueError(UNSUPPORTED[name])
        if name in _NO_WIDTH:
            continue
        if name == "SUBPATTERN":
            total += _size(arg[-1], budget - total)
        elif name == "BRANCH":
            total += sum(_size(branch, budget - total) for branch in arg[1])
        elif name in _REPEATS:
            low, high, body = arg
            times = max(low, 1) if high == _sre.MAXREPEAT else high
            if times:
                total += times * _size(body, (budget - total) // times + 1)
        else:  # a literal, a class, any character, a category
            total += 1
        if total > budget:
            break
    return total


def check_regex(field: str, pattern: str, what: str = "", limit: int = MAX_REGEX_SIZE) -> None:
    """Refuse a regex that spells out more than ``limit`` characters or uses a construct no
    automaton matches; the message starts with ``field`` (then ``what``, e.g. "pattern ")."""
    try:
        size = regex_size(pattern, limit)
    except ValueError as exc:
        raise ValueError(f"{field}: {what}{exc}") from None
    if size < 0:  # unreadable to Python: bound its repeat counts, the rest is the backend's parser's
        counts = [int(n) for match in _COUNT.finditer(pattern) for n in match.groups() if n]
        size = max(counts, default=0)
    if size > limit:
        raise ValueError(f"{field}: {what}spells out more than {limit} characters "
                         f"(bounded repeats expanded, nested ones multiplied); too large to compile")


def check_json_schema(spec: str) -> None:
    """Refuse a JSON Schema (text) past the bounds above."""
    try:
        schema = json.loads(spec)
    except RecursionError:
        raise ValueError(f"json_schema: nested more than {MAX_SCHEMA_DEPTH} levels deep") from None
    except ValueError as exc:
        raise ValueError(f"json_schema: not valid JSON ({exc})") from None
    _SchemaWalk().schema(schema, 0)


class _SchemaWalk:
    """One pass over a schema: counts its values and nesting, and reads the keywords that size
    the output wherever a schema (not instance data) may stand."""

    def __init__(self):
        self.nodes = 0

    def _count(self, depth: int) -> None:
        self.nodes += 1
        if self.nodes > MAX_SCHEMA_NODES:
            raise ValueError(f"json_schema: has more than {MAX_SCHEMA_NODES} values")
        if depth > MAX_SCHEMA_DEPTH:
            raise ValueError(f"json_schema: nested more than {MAX_SCHEMA_DEPTH} levels deep")

    def data(self, value: Any, depth: int) -> None:
        self._count(depth)
        children = value.values() if isinstance(value, dict) else value if isinstance(value, list) else ()
        for child in children:
            self.data(child, depth + 1)

    def schema(self, node: Any, depth: int) -> None:
        """``node`` where a schema stands; anything not known to be data is read as a schema, so
        an unknown keyword cannot hide a count from the check."""
        self._count(depth)
        if isinstance(node, list):
            for item in node:
                self.schema(item, depth + 1)
            return
        if not isinstance(node, dict):
            return
        for key, value in node.items():
            self._keyword(key, value)
            if key in DATA_KEYWORDS:
                self.data(value, depth + 1)
            elif key in SCHEMA_MAPS and isinstance(value, dict):
                self._count(depth + 1)
                for name, sub in value.items():
                    if key == "patternProperties":
                        check_regex("json_schema", name, "patternProperties key ")
                    self.schema(sub, depth + 2)
            else:
                self.schema(value, depth + 1)

    @staticmethod
    def _keyword(key: str, value: Any) -> None:
        if key in COUNT_KEYWORDS and isinstance(value, (int, float)) and value > MAX_REPEAT:
            raise ValueError(f"json_schema: {key} {value} is above the limit of {MAX_REPEAT}")
        if key == "enum" and isinstance(value, list) and len(value) > MAX_ENUM_VALUES:
            raise ValueError(f"json_schema: an enum of {len(value)} values is above the limit of {MAX_ENUM_VALUES}")
        if key == "pattern" and isinstance(value, str):
            check_regex("json_schema", value, "pattern ")


def check_constraint(kind: str, spec: str) -> None:
    """The bounds for a ``("regex", pattern)``, ``("json_schema", text)`` or ``("ebnf", grammar)``
    constraint (a grammar's own parser bounds the rest of its work)."""
    if len(spec) > MAX_CONSTRAINT_CHARS:
        raise ValueError(f"{kind}: is longer than {MAX_CONSTRAINT_CHARS} characters")
    if kind == "regex":
        check_regex("regex", spec)
    elif kind == "json_schema":
        check_json_schema(spec)

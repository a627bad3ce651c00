"""A corpus of JSON Schemas in the style of OpenAI structured outputs, generated (seeded) from a
dozen families: flat and nested objects, integer and number bounds of every shape, multipleOf,
string patterns / formats / lengths, enum / const, anyOf / oneOf / allOf, $ref / $defs with
recursion, maps (additionalProperties), arrays (minItems / maxItems / prefixItems), nullable
types. ``benchmarks/schema_coverage.py`` measures every backend on all of it; the tests take a
sample. ``random_walk`` draws one output under a grammar's mask, to validate with ``jsonschema``."""

from __future__ import annotations

import random
import time
from typing import Any, Callable

import numpy as np
import torch

CORPUS_SIZE = 240
FAMILIES_SEED = 2026

WORDS = ["name", "title", "city", "count", "price", "score", "status", "kind", "level", "tags", "items", "id",
         "owner", "email", "when", "rate", "note", "size", "color", "unit", "year", "ratio", "code", "label"]
FORMATS = ["date", "time", "date-time", "uuid", "email", "ipv4", "hostname", "uri"]
PATTERNS = [r"^[A-Z]{3}-[0-9]{4}$", r"^[a-z]+(_[a-z]+)*$", r"^\+?[0-9]{7,12}$", r"^#[0-9a-fA-F]{6}$",
            r"^v[0-9]+\.[0-9]+\.[0-9]+$", r"^[A-Z][a-z]{1,10}$"]
BINARY_STEPS = [0.5, 0.25, 0.125, 0.0625]  # exact in floating point, as jsonschema checks multipleOf


def _integer(rng: random.Random) -> dict:
    shape = rng.choice(["min", "max", "both", "exclusive", "wide", "half-open-exclusive", "negative", "multiple"])
    low = rng.choice([0, 1, -10, 100, -1000, 18])
    span = rng.choice([5, 99, 999, 1000, 10**6, 10**9])
    schema: dict[str, Any] = {"type": "integer"}
    if shape == "min":
        schema["minimum"] = low
    elif shape == "max":
        schema["maximum"] = low + span
    elif shape in ("both", "wide"):
        schema.update(minimum=low, maximum=low + (span if shape == "both" else 10**rng.randint(3, 12)))
    elif shape == "exclusive":
        schema.update(exclusiveMinimum=low, exclusiveMaximum=low + span)
    elif shape == "half-open-exclusive":
        schema["exclusiveMinimum" if rng.random() < 0.5 else "exclusiveMaximum"] = low
    elif shape == "negative":
        schema.update(minimum=-span, maximum=-1)
    else:
        schema.update(minimum=low, multipleOf=rng.choice([2, 5, 10, 25, 100]))
        if rng.random() < 0.5:
            schema["maximum"] = low + span
    return schema


def _number(rng: random.Random) -> dict:
    schema: dict[str, Any] = {"type": "number"}
    low = rng.choice([0, -1.5, 0.001, -100, 2.25, 1])
    shape = rng.choice(["min", "max", "both", "exclusive", "mixed"])
    if shape == "min":
        schema["minimum"] = low
    elif shape == "max":
        schema["maximum"] = low
    elif shape == "both":
        schema.update(minimum=low, maximum=low + rng.choice([1, 10, 0.5, 1000]))
    elif shape == "exclusive":
        schema.update(exclusiveMinimum=low, exclusiveMaximum=low + rng.choice([1, 10, 1000]))
    else:
        schema.update(minimum=low, exclusiveMaximum=low + rng.choice([1, 10, 1000]))
    if rng.random() < 0.6:
        schema["multipleOf"] = rng.choice(BINARY_STEPS)
    return schema


def _string(rng: random.Random) -> dict:
    shape = rng.choice(["plain", "length", "pattern", "format"])
    if shape == "plain":
        return {"type": "string"}
    if shape == "length":
        low = rng.randint(0, 4)
        return {"type": "string", "minLength": low, "maxLength": low + rng.randint(1, 20)}
    if shape == "pattern":
        return {"type": "string", "pattern": rng.choice(PATTERNS)}
    return {"type": "string", "format": rng.choice(FORMATS)}


def _enum(rng: random.Random) -> dict:
    shape = rng.choice(["strings", "ints", "mixed", "const", "typed"])
    if shape == "strings":
        return {"enum": rng.sample(["red", "green", "blue", "low", "high", "on", "off", "pending"], rng.randint(2, 5))}
    if shape == "ints":
        return {"enum": rng.sample(range(-5, 50), rng.randint(2, 6))}
    if shape == "mixed":
        return {"enum": ["auto", 1, 2.5, None, True]}
    if shape == "const":
        return {"const": rng.choice(["v1", 42, False])}
    return {"type": "string", "enum": ["a", "b", "c"]}


def _primitive(rng: random.Random) -> dict:
    kind = rng.choice(["integer", "number", "string", "string", "boolean", "enum", "nullable"])
    if kind == "integer":
        return _integer(rng)
    if kind == "number":
        return _number(rng)
    if kind == "string":
        return _string(rng)
    if kind == "boolean":
        return {"type": "boolean"}
    if kind == "enum":
        return _enum(rng)
    inner = _primitive(rng)
    if "type" in inner and isinstance(inner["type"], str) and "enum" not in inner:
        return {**inner, "type": [inner["type"], "null"]}
    return {"anyOf": [inner, {"type": "null"}]}


def _object(rng: random.Random, depth: int = 0, strict: bool = False) -> dict:
    names = rng.sample(WORDS, rng.randint(1, 5))
    properties = {n: (_object(rng, depth + 1, strict) if depth < 2 and rng.random() < 0.25 else _primitive(rng))
                  for n in names}
    required = names if strict else [n for n in names if rng.random() < 0.6]
    schema = {"type": "object", "properties": properties, "required": required}
    if strict or rng.random() < 0.5:
        schema["additionalProperties"] = False
    return schema


def _array(rng: random.Random) -> dict:
    shape = rng.choice(["bounded", "unbounded", "tuple", "objects", "nested"])
    if shape == "bounded":
        low = rng.randint(0, 3)
        return {"type": "array", "items": _primitive(rng), "minItems": low, "maxItems": low + rng.randint(0, 4)}
    if shape == "unbounded":
        return {"type": "array", "items": _primitive(rng)}
    if shape == "tuple":
        items = [_primitive(rng) for _ in range(rng.randint(1, 3))]
        return {"type": "array", "prefixItems": items, "items": False, "minItems": len(items)}
    if shape == "objects":
        return {"type": "array", "items": _object(rng, 1), "maxItems": rng.randint(1, 4)}
    return {"type": "array", "items": {"type": "array", "items": _integer(rng), "maxItems": 3}, "maxItems": 3}


def _combinator(rng: random.Random) -> dict:
    shape = rng.choice(["anyOf", "oneOf-types", "oneOf-tagged", "allOf"])
    if shape == "anyOf":
        return {"anyOf": [_primitive(rng), _object(rng, 2)]}
    if shape == "oneOf-types":
        return {"oneOf": [{"type": "string", "maxLength": 10}, _integer(rng), {"type": "boolean"}]}
    if shape == "oneOf-tagged":
        return {"oneOf": [{"type": "object", "properties": {"kind": {"const": tag}, "value": _primitive(rng)},
                           "required": ["kind", "value"], "additionalProperties": False}
                          for tag in ("circle", "square", "line")[:rng.randint(2, 3)]]}
    base = {"type": "object", "properties": {"id": {"type": "integer", "minimum": 1}}, "required": ["id"]}
    return {"allOf": [base, {"properties": {"label": _string(rng)}, "required": ["label"]}]}


def _refs(rng: random.Random) -> dict:
    shape = rng.choice(["shared", "linked-list", "tree", "root", "defs-chain"])
    if shape == "shared":
        return {"$defs": {"point": {"type": "object", "properties": {"x": _number(rng), "y": _number(rng)},
                                    "required": ["x", "y"], "additionalProperties": False}},
                "type": "object", "properties": {"start": {"$ref": "#/$defs/point"}, "end": {"$ref": "#/$defs/point"}},
                "required": ["start", "end"]}
    if shape == "linked-list":
        return {"$defs": {"node": {"type": "object", "properties": {
            "value": _integer(rng), "next": {"anyOf": [{"$ref": "#/$defs/node"}, {"type": "null"}]}},
            "required": ["value", "next"]}}, "$ref": "#/$defs/node"}
    if shape == "tree":
        return {"$defs": {"tree": {"type": "object", "properties": {
            "label": {"type": "string", "maxLength": 8},
            "children": {"type": "array", "items": {"$ref": "#/$defs/tree"}, "maxItems": 2}},
            "required": ["label", "children"]}}, "$ref": "#/$defs/tree"}
    if shape == "root":
        return {"type": "object", "properties": {"name": _string(rng), "parent": {"$ref": "#"}}, "required": ["name"]}
    return {"definitions": {"a": {"$ref": "#/definitions/b"}, "b": _primitive(rng)},
            "type": "object", "properties": {"v": {"$ref": "#/definitions/a"}}, "required": ["v"]}


def _map(rng: random.Random) -> dict:
    return {"type": "object", "additionalProperties": rng.choice([_integer(rng), _string(rng), {"type": "boolean"}])}


def _openai_style(rng: random.Random) -> dict:
    """Strict-mode shapes from OpenAI's structured-output guide: every property required, no
    extra properties, optional fields as nullable types."""
    shape = rng.choice(["event", "steps", "ui", "extraction", "random"])
    if shape == "event":
        return {"type": "object", "properties": {
            "name": {"type": "string"}, "date": {"type": "string", "format": "date"},
            "participants": {"type": "array", "items": {"type": "string"}}}, "required": ["name", "date", "participants"],
            "additionalProperties": False}
    if shape == "steps":
        return {"type": "object", "properties": {"steps": {"type": "array", "items": {
            "type": "object", "properties": {"explanation": {"type": "string"}, "output": {"type": "string"}},
            "required": ["explanation", "output"], "additionalProperties": False}},
            "final_answer": {"type": "string"}}, "required": ["steps", "final_answer"], "additionalProperties": False}
    if shape == "ui":
        return {"type": "object", "properties": {
            "type": {"type": "string", "enum": ["div", "button", "header", "section", "field", "form"]},
            "label": {"type": "string"},
            "children": {"type": "array", "items": {"$ref": "#"}},
            "attributes": {"type": "array", "items": {"type": "object", "properties": {
                "name": {"type": "string"}, "value": {"type": "string"}}, "required": ["name", "value"],
                "additionalProperties": False}}},
            "required": ["type", "label", "children", "attributes"], "additionalProperties": False}
    if shape == "extraction":
        return {"type": "object", "properties": {
            "title": {"type": "string"}, "authors": {"type": "array", "items": {"type": "string"}},
            "abstract": {"type": ["string", "null"]}, "year": {"type": ["integer", "null"], "minimum": 1900,
                                                                "maximum": 2100},
            "keywords": {"type": "array", "items": {"type": "string"}, "maxItems": 5}},
            "required": ["title", "authors", "abstract", "year", "keywords"], "additionalProperties": False}
    return _object(rng, 0, strict=True)


FAMILIES: list[Callable[[random.Random], dict]] = [
    _object, _object, lambda r: _object(r, 0, True), _array, _integer, _number, _string, _enum,
    _combinator, _refs, _map, _openai_style]


def corpus(size: int = CORPUS_SIZE, seed: int = FAMILIES_SEED) -> list[dict]:
    """``size`` schemas, the families taken in turn, each drawn from its own seeded stream."""
    rng = random.Random(seed)
    return [FAMILIES[i % len(FAMILIES)](rng) for i in range(size)]


# ---- drawing outputs ----------------------------------------------------------------------------

# Past WANDER_STEPS a walk prefers tokens that close what it opened, then punctuation that opens
# nothing, so that it ends.
CLOSING = set(b'"]}')
PUNCTUATION = set(b'"]},:')
WANDER_STEPS = 24


class TokenClasses:
    """Which tokens have text, and which are made only of closing characters or of punctuation
    (boolean arrays over the vocabulary, so a walk's step is a few numpy operations)."""

    def __init__(self, token_bytes: list[bytes | None], eos_token_id: int):
        self.token_bytes = token_bytes
        self.eos_token_id = eos_token_id
        self.text = np.array([bool(b) for b in token_bytes])
        self.tiers = [np.array([bool(b) and set(b) <= tier for b in token_bytes]) for tier in (CLOSING, PUNCTUATION)]


def random_walk(grammar, tokens: TokenClasses, rng: random.Random,
                max_steps: int = 400) -> tuple[bytes | None, list[float]]:
    """One output of ``grammar`` (a ``sglang_core.constrained.grammar.Grammar``) drawn uniformly
    among the tokens with text its mask allows, then (after ``WANDER_STEPS``) preferring closing
    punctuation and EOS so the output ends; returns its bytes (None: not finished within
    ``max_steps``) and the seconds each mask took."""
    state = grammar.new_state()
    vocab = len(tokens.token_bytes)
    words = torch.zeros(-(-vocab // 32), dtype=torch.int32)
    out, mask_seconds = [], []
    for step in range(max_steps):
        words.zero_()
        start = time.perf_counter()
        state.fill_bitmask(words)
        mask_seconds.append(time.perf_counter() - start)
        allowed = np.unpackbits(words.numpy().view(np.uint8), bitorder="little")[:vocab].astype(bool)
        if allowed[tokens.eos_token_id] and (state.is_finished() or step >= WANDER_STEPS or rng.random() < 0.1):
            return b"".join(out), mask_seconds
        choices = allowed & tokens.text
        if step >= WANDER_STEPS:
            for tier in tokens.tiers:
                if (choices & tier).any():
                    choices &= tier
                    break
        candidates = np.flatnonzero(choices)
        if not len(candidates):
            return None, mask_seconds
        token = int(candidates[rng.randrange(len(candidates))])
        state.advance(token)
        out.append(tokens.token_bytes[token])
    return None, mask_seconds

"""JSON Schema coverage of the grammar backends, checked by ``jsonschema`` (draft 2020-12 with
its format checkers), an independent reference: every output drawn under a backend's mask (a
random walk over the default model's vocabulary, reaching far more of the grammar than a model's
likely text) validates against the schema; what a backend cannot enforce it refuses by name.
The OpenAI structured-outputs subset on the outlines backend, a sample of the benchmark's corpus
on every backend, and EBNF grammars and schemas through the engine with xgrammar."""

from __future__ import annotations

import json
import random
import re

import jsonschema
import pytest

from schema_corpus import TokenClasses, corpus, random_walk
from sglang_core.engine import Engine

BACKENDS = ["outlines", "llguidance", "xgrammar"]
WALKS = 2

FEATURES = {
    "integer-minimum-0": {"type": "integer", "minimum": 0},
    "integer-exclusive": {"type": "integer", "exclusiveMinimum": -3, "exclusiveMaximum": 1000},
    "integer-half-open-above": {"type": "integer", "maximum": -7},
    "integer-wide": {"type": "integer", "minimum": -5, "maximum": 10**9},
    "integer-multiple": {"type": "integer", "minimum": 3, "maximum": 10**6, "multipleOf": 25},
    "number-closed": {"type": "number", "minimum": 0.001, "maximum": 0.01},
    "number-exclusive": {"type": "number", "exclusiveMinimum": -1.5, "exclusiveMaximum": 2.25},
    "number-half-open": {"type": "number", "minimum": -5},
    "number-multiple": {"type": "number", "exclusiveMinimum": 0, "multipleOf": 0.125},
    "string-pattern": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{4}$"},
    "string-lengths": {"type": "string", "minLength": 2, "maxLength": 5},
    "string-formats": {"type": "object", "properties": {f: {"type": "string", "format": f} for f in (
        "date", "time", "date-time", "uuid", "email", "ipv4")}, "required": ["date", "email", "ipv4"]},
    "enum-const": {"type": "object", "properties": {"e": {"enum": ["a", 1, None, True]}, "c": {"const": {"k": [1]}}},
                   "required": ["e", "c"]},
    "anyOf": {"anyOf": [{"type": "integer", "minimum": 10}, {"type": "string", "maxLength": 3}]},
    "oneOf-tagged": {"oneOf": [
        {"type": "object", "properties": {"kind": {"const": "a"}, "n": {"type": "integer", "minimum": 0}},
         "required": ["kind", "n"]},
        {"type": "object", "properties": {"kind": {"const": "b"}, "s": {"type": "string", "maxLength": 4}},
         "required": ["kind", "s"]}]},
    "allOf": {"allOf": [{"type": "object", "properties": {"id": {"type": "integer", "minimum": 1}}, "required": ["id"]},
                        {"properties": {"tag": {"type": "string", "maxLength": 4}}, "required": ["tag"]}]},
    "refs-recursive": {"$defs": {"tree": {"type": "object", "properties": {
        "v": {"type": "integer", "minimum": 0, "maximum": 9},
        "kids": {"type": "array", "items": {"$ref": "#/$defs/tree"}, "maxItems": 2}}, "required": ["v", "kids"]}},
        "$ref": "#/$defs/tree"},
    "root-recursive": {"type": "object", "properties": {"next": {"anyOf": [{"$ref": "#"}, {"type": "null"}]}},
                       "required": ["next"]},
    "additionalProperties-map": {"type": "object", "additionalProperties": {"type": "integer", "minimum": 0}},
    "additionalProperties-false": {"type": "object", "properties": {"a": {"type": "boolean"}},
                                   "additionalProperties": False},
    "arrays": {"type": "object", "properties": {
        "bounded": {"type": "array", "items": {"type": "integer", "maximum": 0}, "minItems": 1, "maxItems": 3},
        "tuple": {"type": "array", "prefixItems": [{"type": "string", "maxLength": 3}, {"type": "number", "minimum": 1}],
                  "items": False, "minItems": 2}}, "required": ["bounded", "tuple"]},
    "nullable": {"type": "object", "properties": {"n": {"type": ["integer", "null"], "minimum": 1},
                                                  "s": {"anyOf": [{"type": "string", "maxLength": 3}, {"type": "null"}]}},
                 "required": ["n", "s"]},
}
# What a backend refuses (by name, a 400) rather than enforce; everything else must validate.
REFUSED = {"xgrammar": {"integer-multiple", "number-multiple", "allOf"}}
# Of the corpus sample's 20 schemas, at least this many compile (xgrammar refuses multipleOf
# with bounds or on numbers, and allOf).
MIN_COMPILED = {"outlines": 20, "llguidance": 19, "xgrammar": 13}


@pytest.fixture(scope="module")
def default_tokenizer():
    from sglang_core.tokenizer import load_tokenizer
    from sglang_core.weights.default_model import default_model_path

    return load_tokenizer(default_model_path())


@pytest.fixture(scope="module")
def backends(default_tokenizer):
    from sglang_core.constrained.compiler import make_grammar_backend
    from sglang_core.plugins import PluginManager

    made = {name: make_grammar_backend(PluginManager(), name, default_tokenizer, len(default_tokenizer))
            for name in BACKENDS}
    yield made
    for backend in made.values():
        backend.close()


@pytest.fixture(scope="module")
def vocabulary(default_tokenizer) -> TokenClasses:
    from sglang_core.constrained.vocab import token_bytes

    return TokenClasses(token_bytes(default_tokenizer, len(default_tokenizer)), default_tokenizer.eos_token_id)


def walks_validate(backend, schema: dict, vocabulary: TokenClasses, seed: int) -> int:
    """Compile ``schema`` and check WALKS drawn outputs against it; the number that finished."""
    spec = json.dumps(schema)
    backend.validate("json_schema", spec)
    grammar = backend.compile("json_schema", spec)
    validator = jsonschema.Draft202012Validator(schema, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER)
    rng = random.Random(seed)
    finished = 0
    for _ in range(WALKS):
        text, _ = random_walk(grammar, vocabulary, rng)
        if text is not None:
            validator.validate(json.loads(text))
            finished += 1
    return finished


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_structured_output_features(backends, vocabulary, backend_name):
    """Each feature of the OpenAI structured-outputs subset: compiled and every output valid, or
    (only where listed in REFUSED) refused by name."""
    backend = backends[backend_name]
    finished = 0
    for i, (feature, schema) in enumerate(FEATURES.items()):
        if feature in REFUSED.get(backend_name, ()):
            with pytest.raises(ValueError, match="^json_schema: '(allOf|multipleOf)'"):
                backend.validate("json_schema", json.dumps(schema))
            continue
        finished += walks_validate(backend, schema, vocabulary, i)
    assert finished >= 0.9 * WALKS * (len(FEATURES) - len(REFUSED.get(backend_name, ())))


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_corpus_sample(backends, vocabulary, backend_name):
    """Every 12th schema of the benchmark's corpus (20, a dozen families): outputs validate."""
    backend = backends[backend_name]
    compiled = 0
    for i, schema in enumerate(corpus()[::12]):
        try:
            walks_validate(backend, schema, vocabulary, i)
        except ValueError as exc:
            assert str(exc).startswith("json_schema: ")
            continue
        compiled += 1
    assert compiled >= MIN_COMPILED[backend_name]


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_json_strings_admit_no_control_characters(backends, vocabulary, default_tokenizer, backend_name):
    """Inside a JSON string (of bounded length: xgrammar writes those by another rule), no token
    with a raw control character (JSON requires them escaped) is allowed: checked on the whole
    mask, not on draws that might miss it."""
    import numpy as np
    import torch

    state = backends[backend_name].compile("json_schema", json.dumps({"type": "string", "maxLength": 5})).new_state()
    (quote,) = default_tokenizer.encode('"', add_special_tokens=False)
    state.advance(quote)
    words = torch.zeros(-(-len(vocabulary.token_bytes) // 32), dtype=torch.int32)
    state.fill_bitmask(words)
    allowed = np.flatnonzero(np.unpackbits(words.numpy().view(np.uint8), bitorder="little"))
    with_control = [t for t in allowed if vocabulary.token_bytes[t] and min(vocabulary.token_bytes[t]) < 0x20]
    assert len(allowed) > 1000 and not with_control, [vocabulary.token_bytes[t] for t in with_control[:5]]


@pytest.mark.parametrize("schema, keyword", [
    ({"not": {"type": "string"}}, "'not'"),
    ({"type": "array", "items": {"type": "integer"}, "uniqueItems": True}, "'uniqueItems'"),
    ({"type": "string", "format": "duration"}, "format 'duration'"),
    ({"oneOf": [{"type": "integer"}, {"type": "number"}]}, "'oneOf'"),
    ({"type": "string", "pattern": "^[a-z]+$", "maxLength": 4}, "pattern or format together with minLength/maxLength"),
    ({"type": "integer", "minimum": 0, "multipleOf": 7}, "multipleOf 7"),
    ({"type": "number", "minimum": 1, "maximum": 0.5}, "no number lies"),
    ({"type": "object", "minProperties": 2}, "'minProperties'"),
    ({"$ref": "#/$defs/missing"}, "points at nothing"),
])
def test_outlines_refuses_by_name(backends, schema, keyword):
    with pytest.raises(ValueError, match="^json_schema: .*" + re.escape(keyword)):
        backends["outlines"].validate("json_schema", json.dumps(schema))


# ---- through the engine: xgrammar, and EBNF grammars -----------------------------------------------

GBNF = 'root ::= "The answer is " ("yes" | "no") "." | [0-9] [0-9]? " apples"'
LARK = 'start: "The answer is " ("yes" | "no") "." | /[0-9][0-9]?/ " apples"'
GRAMMAR_TEXT = re.compile(r"The answer is (yes|no)\.|[0-9][0-9]? apples")


@pytest.fixture(scope="module")
def xgrammar_engine():
    with Engine(device="cpu", max_running_requests=16, grammar_backend="xgrammar") as engine:
        yield engine


def test_xgrammar_through_the_engine(xgrammar_engine):
    """Schemas (number bounds included), a regex and a GBNF grammar in one sampled batch: every
    output matches its constraint and was ended by it. (No recursive schema: xgrammar does not
    bound the depth, and a small model nests until it runs out of tokens.)"""
    schemas = [FEATURES[k] for k in ("integer-exclusive", "number-exclusive", "string-pattern", "enum-const",
                                     "oneOf-tagged", "nullable")]
    sampling = {"temperature": 1.0, "seed": 7}
    params = [{"max_new_tokens": 64, "json_schema": json.dumps(s), **sampling} for s in schemas]
    params += [{"max_new_tokens": 20, "regex": r"[0-9]{3}-[0-9]{4}", **sampling},
               {"max_new_tokens": 20, "ebnf": GBNF, **sampling}]
    outs = xgrammar_engine.generate([f"Answer:\n{i}" for i in range(len(params))], sampling_params=params)
    for schema, out in zip(schemas, outs):
        assert out["meta_info"]["finish_reason"]["type"] == "stop", (schema, out["text"])
        jsonschema.validate(json.loads(out["text"]), schema)
    assert re.fullmatch(r"[0-9]{3}-[0-9]{4}", outs[-2]["text"])
    assert GRAMMAR_TEXT.fullmatch(outs[-1]["text"]) and outs[-1]["meta_info"]["finish_reason"]["type"] == "stop"


def test_bad_ebnf_is_a_value_error(xgrammar_engine):
    with pytest.raises(ValueError, match='^ebnf: .*"nothing"'):
        xgrammar_engine.generate("x", sampling_params={"max_new_tokens": 4, "ebnf": "root ::= nothing"})
    with pytest.raises(ValueError, match="^regex: give at most one of regex, json_schema and ebnf"):
        xgrammar_engine.generate("x", sampling_params={"max_new_tokens": 4, "ebnf": GBNF, "regex": "a"})


@pytest.mark.parametrize("backend_name, grammar", [("llguidance", LARK), ("xgrammar", GBNF)])
def test_ebnf_walks_stay_in_the_grammar(backends, vocabulary, backend_name, grammar):
    """Each backend's own grammar dialect: every drawn output is in the language."""
    backends[backend_name].validate("ebnf", grammar)
    compiled = backends[backend_name].compile("ebnf", grammar)
    rng = random.Random(3)
    for _ in range(6):
        text, _ = random_walk(compiled, vocabulary, rng)
        assert text is not None and GRAMMAR_TEXT.fullmatch(text.decode()), text


def test_outlines_refuses_ebnf(backends):
    with pytest.raises(ValueError, match="^ebnf: the outlines grammar backend has no EBNF"):
        backends["outlines"].validate("ebnf", GBNF)

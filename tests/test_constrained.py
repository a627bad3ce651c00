"""Constrained decoding on the default model: every output matches its constraint, checked by
independent tools (``jsonschema``, ``re.fullmatch``), greedy and at temperature 1.0 with several
seeds, through the Engine API (with each grammar backend: outlines and llguidance), the native
``/generate`` API and the ``openai`` client's ``response_format``; bad constraints are clear 400s
and the server keeps serving; oversized ones (issue 13) are refused fast by both backends."""

from __future__ import annotations

import importlib
import json
import re
import sys
import time

import httpx
import jsonschema
import openai
import pytest

from constraint_cases import OVERSIZED, RANGE_SCHEMAS, REGEXES, SCHEMAS
from sglang_core.engine import Engine

SAMPLINGS = [{"temperature": 0.0}, {"temperature": 1.0, "seed": 1}, {"temperature": 1.0, "seed": 2}]
BACKENDS = ["outlines", "llguidance"]


@pytest.fixture(scope="module", params=BACKENDS)
def engine(request):
    """One engine per grammar backend; every Engine-API test below runs against each."""
    with Engine(device="cpu", max_running_requests=64, grammar_backend=request.param) as engine:
        yield engine


def prompt_for(constraint: str) -> str:
    return f"Answer with output matching {constraint}:\n"


@pytest.mark.parametrize("sampling", SAMPLINGS, ids=["greedy", "t1-seed1", "t1-seed2"])
def test_json_schemas_through_the_engine(engine, sampling):
    outs = engine.generate([prompt_for(json.dumps(s)) for s in SCHEMAS], sampling_params=[
        {"max_new_tokens": 200, "json_schema": json.dumps(s), **sampling} for s in SCHEMAS])
    for schema, out in zip(SCHEMAS, outs):
        assert out["meta_info"]["finish_reason"]["type"] == "stop", (schema, out["text"])
        jsonschema.validate(json.loads(out["text"]), schema)
    engine.check_memory()


@pytest.mark.parametrize("sampling", SAMPLINGS, ids=["greedy", "t1-seed1", "t1-seed2"])
def test_regexes_through_the_engine(engine, sampling):
    outs = engine.generate([prompt_for(r) for r in REGEXES], sampling_params=[
        {"max_new_tokens": 64, "regex": r, **sampling} for r in REGEXES])
    for regex, out in zip(REGEXES, outs):
        assert out["meta_info"]["finish_reason"]["type"] == "stop", (regex, out["text"])
        assert re.fullmatch(regex, out["text"]), (regex, out["text"])


def test_constraint_with_other_sampling_features(engine):
    """Penalties, stop strings and logprobs alongside a constraint: still a match."""
    schema = SCHEMAS[20]
    out = engine.generate(prompt_for("a person"), return_logprob=True, sampling_params={
        "max_new_tokens": 100, "json_schema": schema, "temperature": 0.8, "seed": 5, "frequency_penalty": 1.0})
    jsonschema.validate(json.loads(out["text"]), schema)
    assert len(out["meta_info"]["output_token_logprobs"]) == out["meta_info"]["completion_tokens"]


@pytest.mark.parametrize("params, field", [
    ({"regex": "(unclosed"}, "regex"),
    ({"regex": ""}, "regex"),
    ({"json_schema": "{not json"}, "json_schema"),
    ({"json_schema": "[1, 2]"}, "json_schema"),
    ({"json_schema": {"type": "no-such-type"}}, "json_schema"),
    ({"json_schema": {"type": "string", "pattern": "(unclosed"}}, "json_schema"),
    ({"json_schema": {"type": "integer", "minimum": 5, "maximum": 1}}, "json_schema"),
    ({"regex": "a", "json_schema": "{}"}, "regex"),
    ({"regex": 5}, "regex"),
])
def test_bad_constraints_are_value_errors(engine, params, field):
    with pytest.raises(ValueError, match=f"^{field}:"):
        engine.generate("x", sampling_params={"max_new_tokens": 4, **params})
    assert engine.generate("x", sampling_params={"max_new_tokens": 2})["meta_info"]["completion_tokens"] == 2


@pytest.mark.parametrize("kind, spec", OVERSIZED.values(), ids=OVERSIZED.keys())
def test_oversized_constraints_are_refused_fast(engine, kind, spec):
    start = time.monotonic()
    with pytest.raises(ValueError, match=f"^{kind}: "):
        engine.generate("Answer:", sampling_params={"max_new_tokens": 8, kind: spec})
    assert time.monotonic() - start < 5


def test_the_engine_serves_constraints_after_refusals(engine):
    """The worst inputs, then ordinary constraints: answered promptly and matching, with every
    KV slot given back."""
    for kind, spec in [OVERSIZED["a{100000}"], OVERSIZED["minLength"], OVERSIZED["enum-20000"]]:
        with pytest.raises(ValueError):
            engine.generate("Answer:", sampling_params={"max_new_tokens": 8, kind: spec})
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
    start = time.monotonic()
    yes_no, obj = engine.generate(["Answer yes or no:", "JSON:"], sampling_params=[
        {"max_new_tokens": 8, "regex": "(yes|no)"}, {"max_new_tokens": 16, "json_schema": json.dumps(schema)}])
    assert time.monotonic() - start < 30
    assert re.fullmatch("(yes|no)", yes_no["text"])
    jsonschema.validate(json.loads(obj["text"]), schema)
    engine.check_memory()


@pytest.mark.parametrize("sampling", SAMPLINGS, ids=["greedy", "t1-seed1", "t1-seed2"])
def test_number_ranges(engine, sampling):
    """Float ranges and open or wide integer ranges, enforced by both backends (outlines spells
    the bounds out as regexes): every output validates."""
    outs = engine.generate([prompt_for(json.dumps(s)) for s in RANGE_SCHEMAS], sampling_params=[
        {"max_new_tokens": 100, "json_schema": json.dumps(s), **sampling} for s in RANGE_SCHEMAS])
    for schema, out in zip(RANGE_SCHEMAS, outs):
        assert out["meta_info"]["finish_reason"]["type"] == "stop", (schema, out["text"])
        jsonschema.validate(json.loads(out["text"]), schema)


LARK_GRAMMAR = 'start: "The answer is " ("yes" | "no") "." | /[0-9][0-9]?/ " apples"'


def test_ebnf_grammars(engine):
    """The ``ebnf`` sampling param: llguidance takes a Lark grammar (every output in its
    language); outlines has no grammars and says so (a 400 naming the field)."""
    if engine.settings.grammar_backend == "outlines":
        with pytest.raises(ValueError, match="^ebnf: the outlines grammar backend has no EBNF"):
            engine.generate("x", sampling_params={"max_new_tokens": 4, "ebnf": LARK_GRAMMAR})
        return
    outs = engine.generate(["Answer:"] * 3, sampling_params=[
        {"max_new_tokens": 20, "ebnf": LARK_GRAMMAR, **sampling} for sampling in SAMPLINGS])
    for out in outs:
        assert re.fullmatch(r"The answer is (yes|no)\.|[0-9][0-9]? apples", out["text"]), out["text"]
        assert out["meta_info"]["finish_reason"]["type"] == "stop"


# ---- over HTTP ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def server(lang_server):
    return lang_server  # the default model's session-wide server (conftest.py)


def test_native_api_regex_and_json_schema(server):
    schema = SCHEMAS[6]
    body = {"text": [prompt_for("an IP address"), prompt_for("a point")],
            "sampling_params": [{"max_new_tokens": 32, "regex": REGEXES[0], "temperature": 1.0, "seed": 3},
                                {"max_new_tokens": 64, "json_schema": json.dumps(schema)}]}
    ip, point = httpx.post(f"{server.url}/generate", json=body, timeout=120).json()
    assert re.fullmatch(REGEXES[0], ip["text"])
    jsonschema.validate(json.loads(point["text"]), schema)


def test_native_api_bad_constraint_is_400(server):
    resp = httpx.post(f"{server.url}/generate", json={"text": "x", "sampling_params": {"regex": "(a"}}, timeout=60)
    assert resp.status_code == 400 and "regex" in resp.text
    ok = httpx.post(f"{server.url}/generate", json={"text": "x", "sampling_params": {"max_new_tokens": 2}}, timeout=60)
    assert ok.status_code == 200


@pytest.fixture(scope="module")
def client(server):
    with openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused") as client:
        yield client


@pytest.mark.parametrize("schema", [SCHEMAS[0], SCHEMAS[21], SCHEMAS[27]], ids=["name", "items", "user"])
def test_openai_response_format_json_schema(client, schema):
    chat = client.chat.completions.create(
        model="default", max_tokens=120, temperature=0.7, seed=4,
        messages=[{"role": "user", "content": "Describe something as JSON."}],
        response_format={"type": "json_schema", "json_schema": {"name": "thing", "schema": schema, "strict": True}})
    jsonschema.validate(json.loads(chat.choices[0].message.content), schema)
    assert chat.choices[0].finish_reason == "stop"


def test_openai_response_format_every_schema(client):
    """Every schema through the openai client's response_format, sampled (temperature 1, seeded)."""
    from concurrent.futures import ThreadPoolExecutor

    def ask(i: int) -> str:
        chat = client.chat.completions.create(
            model="default", max_tokens=200, temperature=1.0, seed=i,
            messages=[{"role": "user", "content": f"Give JSON for: {json.dumps(SCHEMAS[i])}"}],
            response_format={"type": "json_schema", "json_schema": {"name": f"s{i}", "schema": SCHEMAS[i]}})
        return chat.choices[0].message.content

    with ThreadPoolExecutor(8) as pool:
        texts = list(pool.map(ask, range(len(SCHEMAS))))
    for schema, text in zip(SCHEMAS, texts):
        jsonschema.validate(json.loads(text), schema)


def test_openai_response_format_json_object_and_completions(client):
    chat = client.chat.completions.create(
        model="default", max_tokens=120, messages=[{"role": "user", "content": "Give me a JSON object."}],
        response_format={"type": "json_object"}, temperature=0)
    if chat.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(chat.choices[0].message.content), dict)
    else:  # an open object may run past max_tokens; it is then a prefix of one
        assert chat.choices[0].message.content.lstrip().startswith("{")
    completion = client.completions.create(model="default", prompt="Numbers: ", max_tokens=16,
                                           extra_body={"regex": r"[0-9]{3}-[0-9]{4}"})
    assert re.fullmatch(r"[0-9]{3}-[0-9]{4}", completion.choices[0].text)


def test_jump_forward_on_and_off(engine):
    """Both valid on every fourth schema (every schema's validity is checked above); with it on
    (the module's engine), fixed keys are appended without decoding them, so fewer forward passes
    run (counted by the engine) than on an engine with it off, and meta_info reports forced tokens."""
    schemas = SCHEMAS[::4]
    prompts = [prompt_for(json.dumps(s)) for s in schemas]
    params = [{"max_new_tokens": 200, "json_schema": json.dumps(s), "temperature": 0} for s in schemas]
    fixed_keys = {"max_new_tokens": 200, "json_schema": json.dumps(SCHEMAS[20]), "temperature": 0}
    runs = {}
    with Engine(device="cpu", max_running_requests=64, disable_jump_forward=True,
                grammar_backend=engine.settings.grammar_backend) as engine_off:
        for disabled, eng in ((False, engine), (True, engine_off)):
            assert eng.flush_cache()  # both runs start from an empty prefix cache
            start = eng.stats()["forward_steps"]
            outs = eng.generate(prompts, sampling_params=params)
            middle = eng.stats()["forward_steps"]
            single = eng.generate(prompt_for("a person"), sampling_params=fixed_keys)
            end = eng.stats()["forward_steps"]
            runs[disabled] = (outs, single, (end - start, end - middle))
    for disabled, (outs, single, _) in runs.items():
        for schema, out in zip(schemas + [SCHEMAS[20]], outs + [single]):
            jsonschema.validate(json.loads(out["text"]), schema)
            meta = out["meta_info"]
            assert meta["forced_tokens"] + meta["sampled_tokens"] == meta["completion_tokens"]
            if disabled:
                assert meta["forced_tokens"] == 0
    assert runs[False][1]["meta_info"]["forced_tokens"] >= 6  # '{"', 'first', '":"', ...
    assert runs[False][2][0] < runs[True][2][0] and runs[False][2][1] < runs[True][2][1]  # (all, fixed keys)


class _FixedState:
    """A grammar state allowing a fixed token set, written in the documented bit layout."""

    def __init__(self, allowed: set[int]):
        self.allowed = allowed

    def fill_bitmask(self, out) -> None:
        for t in self.allowed:
            value = int(out[t // 32]) & 0xFFFFFFFF | (1 << (t % 32))
            out[t // 32] = value - (1 << 32) if value >= 1 << 31 else value  # as int32


@pytest.mark.parametrize("constrained_rows", [[0, 1, 2], [1]], ids=["all-rows", "some-rows"])
def test_grammar_mask_layout(constrained_rows):
    """The mask keeps exactly the allowed tokens (bit t % 32 of word t // 32, bit 31 included),
    leaves unconstrained rows alone, and a state allowing nothing falls back to EOS."""
    import torch
    from types import SimpleNamespace

    from sglang_core.constrained.mask import GrammarMask
    from sglang_core.sampling.logits_processor import SamplingBatch

    vocab = 100
    allowed = [{0, 31, 32, 63, 99}, {5, 64}, set()]
    # the mask reads which rows are constrained from the requests (on the host, never from the device)
    reqs = [SimpleNamespace(grammar=_FixedState(a), output_ids=[],
                            sampling_params=SimpleNamespace(constraint=("regex", ".*") if i in constrained_rows else None,
                                                            min_new_tokens=0, stop_token_ids=None))
            for i, a in enumerate(allowed)]
    batch = SamplingBatch(reqs, vocab, torch.device("cpu"), frozenset({7, 9}))
    logits = torch.randn(3, vocab)
    before = logits.clone()
    GrammarMask(vocab_size=vocab)(logits, batch, torch.tensor(constrained_rows))
    for row in range(3):
        if row not in constrained_rows:
            assert torch.equal(logits[row], before[row])
            continue
        expected = allowed[row] or {7}  # nothing allowed: the smallest EOS id
        finite = set(torch.isfinite(logits[row]).nonzero().flatten().tolist())
        assert finite == expected
        assert torch.equal(logits[row, sorted(expected)], before[row, sorted(expected)])


@pytest.fixture(scope="module")
def default_tokenizer():
    from sglang_core.tokenizer import load_tokenizer
    from sglang_core.weights.default_model import default_model_path

    return load_tokenizer(default_model_path())


@pytest.mark.parametrize("backend", BACKENDS)
def test_first_mask_is_the_tokens_that_start_a_match(backend, default_tokenizer):
    """A backend's first mask for ``(yes|no)!`` is exactly the tokens whose text is a prefix of
    ``yes!`` or ``no!`` (worked out here from the tokenizer's own vocabulary): the bit layout is
    right, and special tokens (EOS, ``<repo_name>``, ...) are never taken for text."""
    import torch

    from sglang_core.constrained.compiler import make_grammar_backend
    from sglang_core.plugins import PluginManager

    vocab = len(default_tokenizer)
    grammar = make_grammar_backend(PluginManager(), backend, default_tokenizer, vocab).compile("regex", "(yes|no)!")
    words = torch.zeros(-(-vocab // 32), dtype=torch.int32)
    grammar.new_state().fill_bitmask(words)
    allowed = {t for t in range(vocab) if (int(words[t // 32]) >> (t % 32)) & 1}
    special = {i for i, tok in default_tokenizer.added_tokens_decoder.items() if tok.special}
    expected = {t for t in range(vocab) if t not in special and (text := default_tokenizer.decode([t]))
                and ("yes!".startswith(text) or "no!".startswith(text))}
    assert allowed == expected and len(expected) >= 4  # y, ye, yes, n, no, ...


def test_llguidance_missing_is_a_clear_error(monkeypatch):
    """Without the llguidance package, selecting its backend names the extra to install."""
    monkeypatch.setitem(sys.modules, "llguidance", None)  # import llguidance now fails
    monkeypatch.delitem(sys.modules, "sglang_plugins.grammar.llguidance.backend", raising=False)
    with pytest.raises(ImportError, match=r"pip install 'sglang-core\[llguidance\]'"):
        importlib.import_module("sglang_plugins.grammar.llguidance.backend")


@pytest.fixture(scope="module")
def llguidance_backend(default_tokenizer):
    from sglang_core.constrained.compiler import make_grammar_backend
    from sglang_core.plugins import PluginManager

    return make_grammar_backend(PluginManager(), "llguidance", default_tokenizer, len(default_tokenizer))


def test_llguidance_states_walk_a_schema_and_jump_forward(llguidance_backend, default_tokenizer):
    """An llguidance state on a fixed-key schema: the forced tokens are the tokenizer's own
    tokens for the fixed text, an out-of-grammar token is an error, and the state finishes once
    the object closes."""
    grammar = llguidance_backend.compile("json_schema", json.dumps({"type": "object", "properties": {
        "answer": {"type": "integer", "minimum": 10, "maximum": 12}}, "required": ["answer"]}))
    state = grammar.new_state()
    forced = state.forced_tokens(100)
    assert default_tokenizer.decode(forced) == '{"answer":1'  # every number in range starts with 1
    assert forced == default_tokenizer.encode('{"answer":1', add_special_tokens=False)[:len(forced)]
    assert not state.is_finished()
    (three,) = default_tokenizer.encode("3", add_special_tokens=False)
    with pytest.raises(ValueError):
        grammar.new_state().advance(three)  # a fresh state: "3" cannot start an object
    (one,) = default_tokenizer.encode("1", add_special_tokens=False)
    state.advance(one)  # 11
    assert state.forced_tokens(100) == default_tokenizer.encode("}", add_special_tokens=False)
    assert state.is_finished()


NUMBERS = ["-1000000001", "-6", "-5", "-2", "-1.51", "-1.5", "-1.49", "-1", "0", "0.0005", "0.001", "0.0099", "0.01",
           "0.011", "1", "2.249", "2.25", "2.251", "3", "100", "101", "999999999", "1000000000", "1000000001"]


@pytest.mark.parametrize("schema", [
    {"type": "number", "exclusiveMinimum": -1.5, "exclusiveMaximum": 2.25},
    {"type": "number", "minimum": 0.001, "maximum": 0.01},
    {"type": "number", "minimum": -5},
    {"type": "integer", "minimum": -5, "maximum": 10**9},
    {"type": "integer", "exclusiveMinimum": 100},
    {"type": "integer", "exclusiveMaximum": -1000000000},
], ids=["float-exclusive", "float-closed", "float-open", "int-wide", "int-open-above", "int-open-below"])
def test_llguidance_number_bounds_match_jsonschema(llguidance_backend, default_tokenizer, schema):
    """Plain decimals near the bounds: the llguidance backend lets a number end exactly where
    ``jsonschema`` calls it valid (a float's fraction is unbounded here: no model runs)."""
    import torch

    grammar = llguidance_backend.compile("json_schema", json.dumps(schema))
    eos = default_tokenizer.eos_token_id
    words = torch.zeros(-(-len(default_tokenizer) // 32), dtype=torch.int32)

    def accepted(text: str) -> bool:
        state = grammar.new_state()
        try:
            for token in default_tokenizer.encode(text, add_special_tokens=False):
                state.advance(token)
        except ValueError:  # the grammar refused a token on the way
            return False
        state.fill_bitmask(words)
        return bool((int(words[eos // 32]) >> (eos % 32)) & 1)  # may the output end here?

    validator = jsonschema.Draft202012Validator(schema)
    verdicts = {text: (accepted(text), validator.is_valid(json.loads(text))) for text in NUMBERS}
    assert all(ours == reference for ours, reference in verdicts.values()), verdicts
    assert any(reference for _, reference in verdicts.values()) and not all(r for _, r in verdicts.values())

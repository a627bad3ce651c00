"""Constrained decoding on the default model: every output matches its constraint, checked by
independent tools (``jsonschema``, ``re.fullmatch``), greedy and at temperature 1.0 with several
seeds, through the Engine API, the native ``/generate`` API and the ``openai`` client's
``response_format``; bad constraints are clear 400s and the server keeps serving."""

from __future__ import annotations

import json
import re

import httpx
import jsonschema
import openai
import pytest

from constraint_cases import REGEXES, SCHEMAS
from server_util import running_server
from sglang_core.engine import Engine

SAMPLINGS = [{"temperature": 0.0}, {"temperature": 1.0, "seed": 1}, {"temperature": 1.0, "seed": 2}]


@pytest.fixture(scope="module")
def engine():
    with Engine(device="cpu", max_running_requests=64) as engine:
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
    # Bounds the backend could not enforce are refused rather than silently broken.
    ({"json_schema": {"type": "number", "minimum": 0, "maximum": 1}}, "json_schema"),
    ({"json_schema": {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0}}}}, "json_schema"),
    ({"json_schema": {"type": "integer", "minimum": 0, "maximum": 10**6}}, "json_schema"),
    ({"regex": "a", "json_schema": "{}"}, "regex"),
    ({"regex": 5}, "regex"),
])
def test_bad_constraints_are_value_errors(engine, params, field):
    with pytest.raises(ValueError, match=f"^{field}:"):
        engine.generate("x", sampling_params={"max_new_tokens": 4, **params})
    assert engine.generate("x", sampling_params={"max_new_tokens": 2})["meta_info"]["completion_tokens"] == 2


# ---- over HTTP ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def server():
    with running_server("--max-running-requests", "32") as server:
        yield server


def test_native_api_regex_and_json_schema(server):
    schema = SCHEMAS[6]
    body = {"text": [prompt_for("an IP address"), prompt_for("a point")],
            "sampling_params": [{"max_new_tokens": 32, "regex": REGEXES[0], "temperature": 1.0, "seed": 3},
                                {"max_new_tokens": 64, "json_schema": json.dumps(schema)}]}
    ip, point = httpx.post(f"{server.url}/generate", json=body, timeout=120).json()
    assert re.fullmatch(REGEXES[0], ip["text"])
    jsonschema.validate(json.loads(point["text"]), schema)


def test_native_api_every_schema_and_regex(server):
    """All the cases as one batch each through /generate (greedy)."""
    cases = [("json_schema", json.dumps(s), 200) for s in SCHEMAS] + [("regex", r, 64) for r in REGEXES]
    body = {"text": [prompt_for(spec) for _, spec, _ in cases],
            "sampling_params": [{"max_new_tokens": n, kind: spec, "temperature": 0} for kind, spec, n in cases]}
    outs = httpx.post(f"{server.url}/generate", json=body, timeout=600).json()
    for (kind, spec, _), out in zip(cases, outs):
        if kind == "json_schema":
            jsonschema.validate(json.loads(out["text"]), json.loads(spec))
        else:
            assert re.fullmatch(spec, out["text"]), (spec, out["text"])


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


def test_slow_compile_fails_only_that_request():
    """A constraint that does not compile in time fails its own request; others are served."""
    # 1 ms: far less than any index over a 49k-token vocabulary takes to build.
    with Engine(device="cpu", grammar_compile_timeout_s=0.001) as engine:
        pattern = "(" + "|".join(f"[a-z]{{{n}}}[0-9]{{{n}}}" for n in range(1, 40)) + ")"  # many states
        results = engine.generate(["x", "y"], sampling_params=[{"max_new_tokens": 8, "regex": pattern},
                                                               {"max_new_tokens": 3}])
        reason = results[0]["meta_info"]["finish_reason"]
        assert reason["type"] == "abort" and reason["message"].startswith("regex: compiling took longer")
        assert results[1]["meta_info"]["completion_tokens"] == 3
        engine.check_memory()


def test_jump_forward_on_and_off():
    """Both valid on every schema; with it on, fixed keys are appended without decoding them,
    so fewer forward passes run (counted by the engine) and meta_info reports forced tokens."""
    prompts = [prompt_for(json.dumps(s)) for s in SCHEMAS]
    params = [{"max_new_tokens": 200, "json_schema": json.dumps(s), "temperature": 0} for s in SCHEMAS]
    runs = {}
    for disabled in (False, True):
        with Engine(device="cpu", max_running_requests=64, disable_jump_forward=disabled) as engine:
            outs = engine.generate(prompts, sampling_params=params)
            single = engine.generate(prompt_for("a person"), sampling_params=params[20])  # fixed keys
            runs[disabled] = (outs, single, engine.stats()["forward_steps"])
    for disabled, (outs, single, _) in runs.items():
        for schema, out in zip(SCHEMAS + [SCHEMAS[20]], outs + [single]):
            jsonschema.validate(json.loads(out["text"]), schema)
            meta = out["meta_info"]
            assert meta["forced_tokens"] + meta["sampled_tokens"] == meta["completion_tokens"]
            if disabled:
                assert meta["forced_tokens"] == 0
    assert runs[False][1]["meta_info"]["forced_tokens"] >= 6  # '{"', 'first', '":"', ...
    assert runs[False][2] < runs[True][2]


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
    reqs = [SimpleNamespace(grammar=_FixedState(a)) for a in allowed]
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

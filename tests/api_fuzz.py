"""Schema-driven fuzzing of a live server: request bodies drawn by hypothesis from the schemas of
its own /openapi.json, each answer checked against the same document (no 5xx, a documented status,
a body that fits the documented schema, every streamed event too). Used by tests/test_api_fuzz.py
and, for long runs, benchmarks/fuzz_api.py."""

from __future__ import annotations

import collections
import json
import time
import urllib.parse
from dataclasses import dataclass, field
from typing import Any

import httpx
import jsonschema
from hypothesis import HealthCheck, Phase, given, seed as hypothesis_seed, settings, strategies as st

REF = "#/components/schemas/"
GENERATED_TOKENS = 2  # the most tokens any fuzzed request may generate: keeps each case fast on CPU
MAX_SEQUENCES = 2  # the most choices (n) per prompt


@dataclass
class Operation:
    method: str
    path: str
    body: dict[str, Any] | None = field(repr=False)  # the request body's schema, references inlined
    example: dict[str, Any] | None = field(repr=False)  # the documented example body
    responses: dict[str, Any] = field(repr=False)


@dataclass
class Report:
    cases: collections.Counter = field(default_factory=collections.Counter)  # (method path, status) -> count
    seconds: collections.Counter = field(default_factory=collections.Counter)  # (method path, status) -> time
    failures: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(self.cases.values())


def inline(schema: Any, components: dict[str, Any], seen: tuple[str, ...] = ()) -> Any:
    """``schema`` with every ``$ref`` replaced by what it names; a model that contains itself
    (a content block whose content is blocks) is cut at its second level (``not: {}``: nothing),
    as hypothesis-jsonschema draws no recursive schema."""
    if isinstance(schema, list):
        return [inline(item, components, seen) for item in schema]
    if not isinstance(schema, dict):
        return schema
    if "$ref" in schema:
        name = schema["$ref"].removeprefix(REF)
        return {"not": {}} if name in seen else inline(components[name], components, (*seen, name))
    return {key: inline(value, components, seen) for key, value in schema.items()}


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=6)


def from_schema(schema: dict[str, Any]) -> st.SearchStrategy:
    """Values valid under ``schema``: the JSON Schema subset Pydantic writes (type, anyOf, enum,
    const, bounds, lengths, pattern, properties, additionalProperties; ``not: {}`` is nothing).
    Sizes stay small and strings short, so that a case costs the server little."""
    if schema.get("not") == {}:
        return st.nothing()
    if "const" in schema:
        return st.just(schema["const"])
    if "enum" in schema:
        return st.sampled_from(schema["enum"])
    if "anyOf" in schema:  # keywords beside anyOf (a bound, say) apply to every option
        rest = {k: v for k, v in schema.items() if k != "anyOf"}
        return st.one_of([from_schema({**rest, **option}) for option in schema["anyOf"]])
    kind = schema.get("type")
    if kind == "null":
        return st.none()
    if kind == "boolean":
        return st.booleans()
    if kind == "integer":
        return st.integers(schema.get("minimum"), schema.get("maximum"))
    if kind == "number":
        low = schema.get("exclusiveMinimum", schema.get("minimum"))
        return st.floats(low, schema.get("maximum"), exclude_min="exclusiveMinimum" in schema,
                         allow_nan=False, allow_infinity=False)
    if kind == "string":
        if "pattern" in schema:
            return st.from_regex(schema["pattern"], fullmatch=True)
        return st.text(min_size=schema.get("minLength", 0), max_size=max(schema.get("minLength", 0), 24))
    if kind == "array":
        low, items = schema.get("minItems", 0), schema.get("items", {})
        if items.get("not") == {}:  # a cut recursion: only the empty list
            return st.just([]) if low == 0 else st.nothing()
        return st.lists(from_schema(items), min_size=low, max_size=low + 3)
    if kind == "object":
        return object_strategy(schema)
    return JSON_VALUES


def object_strategy(schema: dict[str, Any]) -> st.SearchStrategy:
    properties = {name: from_schema(sub) for name, sub in schema.get("properties", {}).items()}
    required = set(schema.get("required", ()))
    known = st.fixed_dictionaries({k: v for k, v in properties.items() if k in required},
                                  optional={k: v for k, v in properties.items() if k not in required})
    extra = schema.get("additionalProperties", True)
    if extra is False:
        return known
    values = JSON_VALUES if extra is True else from_schema(extra)
    others = st.dictionaries(st.text(max_size=12).filter(lambda k: k not in properties), values,
                             max_size=2 if properties else 4)
    return st.tuples(others, known).map(lambda pair: {**pair[0], **pair[1]})


def operations(document: dict[str, Any]) -> list[Operation]:
    components = document["components"]["schemas"]
    found = []
    for path, methods in document["paths"].items():
        for method, operation in methods.items():
            content = operation.get("requestBody", {}).get("content", {}).get("application/json", {})
            body = content.get("schema")
            found.append(Operation(method, path, None if body is None else inline(body, components),
                                   content.get("example"), operation["responses"]))
    return found


def capped(body: dict[str, Any], fields: set[str]) -> dict[str, Any]:
    """Keep a drawn body (of a schema with these ``fields``) cheap to serve: at most
    GENERATED_TOKENS tokens and MAX_SEQUENCES choices per prompt, whatever the draw asked for (a
    length left unset would fill the context)."""
    body = dict(body)
    for name in ("max_tokens", "max_completion_tokens", "min_tokens"):
        if isinstance(body.get(name), int):
            body[name] = min(body[name], GENERATED_TOKENS)
    if "max_tokens" in fields and body.get("max_completion_tokens") is None:
        body["max_tokens"] = min(body["max_tokens"], GENERATED_TOKENS) if isinstance(body.get("max_tokens"), int) \
            else GENERATED_TOKENS
    if isinstance(body.get("n"), int):
        body["n"] = min(body["n"], MAX_SEQUENCES)
    params = body.get("sampling_params")
    if isinstance(params, dict):
        body["sampling_params"] = capped_native(params)
    elif isinstance(params, list):
        body["sampling_params"] = [capped_native(p) if isinstance(p, dict) else p for p in params]
    return body


def capped_native(params: dict[str, Any]) -> dict[str, Any]:
    params = dict(params)
    given = params.get("max_new_tokens")
    params["max_new_tokens"] = min(given, GENERATED_TOKENS) if isinstance(given, int) else GENERATED_TOKENS
    for name, cap in (("min_new_tokens", GENERATED_TOKENS), ("n", MAX_SEQUENCES)):
        if isinstance(params.get(name), int):
            params[name] = min(params[name], cap)
    return params


def case_strategy(operation: Operation, model_name: str) -> st.SearchStrategy:
    """(operation, URL path, body or None) for one request to ``operation``."""
    path = st.just(operation.path)
    if "{model_id}" in operation.path:
        model_id = st.one_of(st.just(model_name), st.text(min_size=1, max_size=20))
        path = model_id.map(lambda m: operation.path.replace("{model_id}", urllib.parse.quote(m, safe="")))
    body = st.none() if operation.body is None else body_strategy(operation.body, operation.example)
    return st.tuples(st.just(operation), path, body)


def body_strategy(schema: dict[str, Any], example: dict[str, Any] | None) -> st.SearchStrategy:
    """Bodies the schema allows, whole or as the documented example with some fields redrawn (a
    mostly sensible request, so that cases reach generation and not only validation); one in
    four any JSON at all, which must be a 400."""
    drawn = from_schema(schema)
    if example is not None:
        fields = {name: from_schema(sub) for name, sub in schema.get("properties", {}).items()}
        varied = st.fixed_dictionaries({}, optional=fields).map(lambda changes: {**example, **changes})
        drawn = st.one_of(drawn, varied, varied)
    fields = set(schema.get("properties", {}))
    drawn = drawn.map(lambda body: capped(body, fields))
    return st.one_of(drawn, drawn, drawn, JSON_VALUES)


class Checker:
    """Sends one case and checks its answer against the document."""

    def __init__(self, client: httpx.Client, document: dict[str, Any], report: Report):
        self.client, self.document, self.report = client, document, report
        self.validators: dict[str, jsonschema.Draft202012Validator] = {}

    def validator(self, schema: dict[str, Any]) -> jsonschema.Draft202012Validator:
        key = json.dumps(schema, sort_keys=True)
        if key not in self.validators:
            self.validators[key] = jsonschema.Draft202012Validator({**schema, "components": self.document["components"]})
        return self.validators[key]

    def run(self, operation: Operation, path: str, body: Any) -> None:
        name = f"{operation.method.upper()} {operation.path}"
        kwargs = {} if body is None else {"json": body}
        start = time.monotonic()
        response = self.client.request(operation.method, path, **kwargs)
        self.report.cases[(name, response.status_code)] += 1
        self.report.seconds[(name, response.status_code)] += time.monotonic() - start
        problem = self.problem(operation, response)
        if problem:
            self.report.failures.append(f"{name} {json.dumps(body)[:2000]} -> {response.status_code}: {problem}")

    def problem(self, operation: Operation, response: httpx.Response) -> str | None:
        status = str(response.status_code)
        if response.status_code >= 500:
            return f"server error {response.text[:500]}"
        if status not in operation.responses:
            return f"undocumented status {status}"
        content = operation.responses[status].get("content", {})
        kind = response.headers.get("content-type", "").split(";")[0]
        if not content:
            return f"documented without content, got {response.content[:200]!r}" if response.content else None
        if kind not in content:
            return f"undocumented content type {kind!r}"
        if kind == "application/json":
            return self.misfit(content[kind]["schema"], response.json())
        if kind == "text/event-stream":
            errors = operation.responses["500"]["content"]["application/json"]["schema"]
            return self.stream_problem({"anyOf": [content[kind]["schema"], errors]}, response.text)
        return None

    def stream_problem(self, schema: dict[str, Any], text: str) -> str | None:
        datas = [line[len("data: "):] for line in text.split("\n") if line.startswith("data: ")]
        for data in datas:
            if data == "[DONE]":
                continue
            event = json.loads(data)
            if (misfit := self.misfit(schema, event)) is not None:
                return f"event {data[:300]}: {misfit}"
            error = event.get("error") if isinstance(event.get("error"), dict) else None
            if error is not None and (error.get("code") == "500" or error.get("type") == "api_error"):
                return f"server error in the stream: {data[:500]}"
        return None if datas else "a stream without events"

    def misfit(self, schema: dict[str, Any], value: Any) -> str | None:
        error = jsonschema.exceptions.best_match(self.validator(schema).iter_errors(value))
        return None if error is None else f"{error.message} at {list(error.absolute_path)}"


def fuzz(url: str, cases: int, seed: int = 0, timeout_s: float = 60) -> Report:
    """``cases`` requests drawn over every operation of the server at ``url``."""
    report = Report()
    with httpx.Client(base_url=url, timeout=timeout_s) as client:
        document = client.get("/openapi.json").json()
        model_name = client.get("/v1/models").json()["data"][0]["id"]
        checker = Checker(client, document, report)
        strategy = st.one_of([case_strategy(op, model_name) for op in operations(document)])

        @hypothesis_seed(seed)
        @settings(max_examples=cases, database=None, deadline=None, phases=[Phase.generate],
                  suppress_health_check=list(HealthCheck))
        @given(strategy)
        def one(case: tuple[Operation, str, Any]) -> None:
            checker.run(*case)

        one()
    return report


def wait_until_memory_whole(url: str, wait_s: float = 20) -> dict[str, int]:
    """The engine's memory report once no request runs and every KV slot is free or cached (an
    AssertionError naming the report after ``wait_s``)."""
    deadline = time.monotonic() + wait_s
    while True:
        memory = httpx.get(f"{url}/get_server_info", timeout=30).json()["memory"]
        whole = (memory["running"] == memory["waiting"] == memory["kv_cache_locked"] == 0
                 and memory["kv_free"] + memory["kv_cached"] == memory["kv_pool_size"]
                 and memory["request_rows_free"] == memory["request_rows"])
        if whole:
            return memory
        assert time.monotonic() < deadline, f"KV memory not given back: {memory}"
        time.sleep(0.2)

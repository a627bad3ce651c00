"""The OpenAPI document (/openapi.json): every route of every frontend documents its request body
with the very model it validates with, its 200 and each error status in its API's envelope.

Built from the app alone: documenting and validating a body need no engine."""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path

import jsonschema
import pytest
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient

from sglang_core.server.app import build_app
from sglang_core.server.openapi import ERROR_STATUSES, REF
from sglang_core.server.settings import ServerSettings

ROUTE_MODULES = ["sglang_plugins.frontends.openai.routes", "sglang_plugins.frontends.anthropic.routes",
                 "sglang_plugins.frontends.native.routes"]
ANTHROPIC_PATHS = ("/v1/messages", "/v1/messages/count_tokens")


@pytest.fixture(scope="module")
def app():
    return build_app(ServerSettings())


@pytest.fixture(scope="module")
def document(app) -> dict:
    return app.openapi()


def operations(app):
    for route in app.routes:
        if isinstance(route, APIRoute):
            for method in route.methods:
                yield route, method.lower()


def schema_validator(document: dict, schema: dict) -> jsonschema.Draft202012Validator:
    """A validator of ``schema`` whose ``#/components/...`` references resolve in ``document``."""
    return jsonschema.Draft202012Validator({**schema, "components": document["components"]})


def test_every_route_documents_its_200_and_errors_in_its_apis_envelope(app, document):
    ctx = app.state.ctx
    documented = {(path, method) for path, ops in document["paths"].items() for method in ops}
    assert documented == {(route.path_format, method) for route, method in operations(app)}
    empty = set()
    for route, method in operations(app):
        operation = document["paths"][route.path_format][method]
        responses = operation["responses"]
        assert "422" not in responses, route.path
        content = responses["200"].get("content", {})
        assert all("schema" in c for c in content.values()), route.path
        if not content:
            empty.add(route.path)
        envelope = "AnthropicError" if route.path in ANTHROPIC_PATHS else "OpenAIError"
        for status in ERROR_STATUSES:
            schema = responses[str(status)]["content"]["application/json"]["schema"]
            assert schema == {"$ref": REF + envelope}, (route.path, status)
            # What the server really sends for this path and status fits the documented envelope.
            body = ctx.error_body_for(route.path, status, "temperature: must be >= 0", "temperature")
            schema_validator(document, schema).validate(body)
    assert empty == {"/health", "/health_generate", "/abort_request"}  # the routes that answer an empty 200


def test_documented_bodies_are_the_models_the_routes_validate_with(app, document, monkeypatch):
    """Each route is called with a spy in place of ``parse_body``: the model it hands the spy is
    the one the route validates with, and the document must show exactly that model's schema."""
    used: list[type] = []

    def spy(model, raw):
        used.append(model)
        raise ValueError("body: stopped by the test")

    class NoEngine:  # a route may look an engine method up before it reads its body
        def __getattr__(self, name):
            return lambda *args, **kwargs: None

    for name in ROUTE_MODULES:
        monkeypatch.setattr(importlib.import_module(name), "parse_body", spy)
    monkeypatch.setattr(app.state.ctx, "engine", NoEngine())
    client = TestClient(app, raise_server_exceptions=False)  # no lifespan: no engine started
    components = document["components"]["schemas"]
    bodies = set()
    for route, method in operations(app):
        used.clear()
        client.request(method, route.path_format.replace("{model_id}", "m"), json={})
        documented = document["paths"][route.path_format][method].get("requestBody")
        if not used:
            assert documented is None, f"{method} {route.path} documents a body it does not read"
            continue
        bodies.add((method, route.path))
        model, = used
        content = documented["content"]["application/json"]
        assert content["schema"] == {"$ref": REF + model.__name__}, route.path
        expected = model.model_json_schema(ref_template=REF + "{model}")
        for name, schema in {**expected.pop("$defs", {}), model.__name__: expected}.items():
            assert components[name] == schema, (route.path, name)
        if "example" in content:  # examples are valid bodies, by the schema and by the model
            schema_validator(document, content["schema"]).validate(content["example"])
            model.model_validate(content["example"]).check_supported()
    assert bodies >= {("post", "/v1/chat/completions"), ("post", "/v1/completions"), ("post", "/v1/messages"),
                      ("post", "/v1/messages/count_tokens"), ("post", "/generate"), ("put", "/generate"),
                      ("post", "/tokenize"), ("post", "/abort_request")}


def test_streaming_routes_document_their_event_items(document):
    for path, item in [("/v1/chat/completions", "ChatCompletionChunk"), ("/v1/completions", "CompletionChunk"),
                       ("/v1/messages", "MessageStreamEvent"), ("/generate", "GenerateStreamItem")]:
        content = document["paths"][path]["post"]["responses"]["200"]["content"]
        assert content["text/event-stream"]["schema"] == {"$ref": REF + item}
        assert "application/json" in content


def test_docs_api_md_is_the_rendered_document(document):
    """docs/api.md is regenerated by ``python docs/render_api.py > docs/api.md``; it must not drift."""
    docs = Path(__file__).resolve().parent.parent / "docs"
    spec = importlib.util.spec_from_file_location("render_api", docs / "render_api.py")
    render_api = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(render_api)
    assert (docs / "api.md").read_text() == render_api.render(document), \
        "docs/api.md is stale: run python docs/render_api.py > docs/api.md"


def test_a_method_a_route_lacks_is_a_405_naming_the_allowed_ones(app):
    """Found by checking the server as OpenAPI tools do: the 405 lost Starlette's Allow header."""
    client = TestClient(app, raise_server_exceptions=False)
    answer = client.delete("/v1/chat/completions")
    assert answer.status_code == 405 and answer.headers["allow"] == "POST"
    assert answer.json()["error"]["code"] == "405"
    answer = client.delete("/v1/messages")
    assert answer.headers["allow"] == "POST" and answer.json()["type"] == "error"

"""The OpenAPI document's request and response bodies, taken from the Pydantic models the routes
validate with, so the document cannot drift from what a route accepts.

A route reads its body itself (``parse_body``: errors are 400s in its API's envelope, never
FastAPI's 422), so FastAPI sees no body parameter; a frontend passes ``ApiDocs.route(...)``'s
keyword arguments to its route decorator instead, and the models' JSON schemas are published under
``components/schemas``.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.responses import PlainTextResponse, Response
from pydantic import BaseModel, Field

from sglang_core.server.errors import TYPES

REF = "#/components/schemas/"

# Every status a route may answer with besides its 200, and why.
ERROR_STATUSES = {
    400: "invalid request: a field's type, value or combination (the message names the field)",
    401: "invalid or missing API key (when the server runs with --api-key)",
    404: "unknown model or route",
    413: "request body larger than --max-request-bytes",
    429: "rate limited (not sent by this server; listed as the vendors' APIs list it)",
    500: "internal error, or the engine aborted the request",
    503: "overloaded (--max-queued-requests output sequences in flight) or the engine is not running",
}


class OpenAIErrorDetail(BaseModel):
    message: str = Field(description="what went wrong; names the field at fault")
    type: str = Field(description="error class", json_schema_extra={"enum": sorted(set(TYPES.values()))})
    param: str | None = Field(description="the request field at fault, dotted (messages.0.content), or null")
    code: str = Field(description="the HTTP status, as text")


class OpenAIError(BaseModel):
    """OpenAI's error envelope, which every route outside another API's uses."""

    error: OpenAIErrorDetail


class ApiDocs:
    """The models a server's routes document; ``for_app(app)`` makes one per app and publishes its
    models in the app's OpenAPI document."""

    def __init__(self) -> None:
        self.components: dict[str, dict[str, Any]] = {}

    @classmethod
    def for_app(cls, app: FastAPI) -> ApiDocs:
        docs = getattr(app.state, "api_docs", None)
        if docs is None:
            docs = app.state.api_docs = cls()
            docs._publish(app)
        return docs

    def _publish(self, app: FastAPI) -> None:
        build = app.openapi

        def openapi() -> dict[str, Any]:
            if app.openapi_schema is None:
                document = build()
                for operations in document.get("paths", {}).values():
                    for operation in operations.values():
                        # Bad input is a 400 in the API's envelope (see app._install_error_handlers).
                        operation.get("responses", {}).pop("422", None)
                schemas = document.setdefault("components", {}).setdefault("schemas", {})
                for unused in ("HTTPValidationError", "ValidationError"):
                    schemas.pop(unused, None)
                schemas.update(self.components)
            return app.openapi_schema

        app.openapi = openapi

    def ref(self, model: type[BaseModel]) -> dict[str, str]:
        """``model``'s schema (and those it uses) into the components; a ``$ref`` to it."""
        schema = model.model_json_schema(ref_template=REF + "{model}")
        for name, sub in {**schema.pop("$defs", {}), model.__name__: schema}.items():
            if self.components.setdefault(name, sub) != sub:
                raise ValueError(f"{name}: two different models of this name are documented")
        return {"$ref": REF + model.__name__}

    def route(self, *, errors: type[BaseModel] = OpenAIError, body: type[BaseModel] | None = None,
              response: type[BaseModel] | None = None, stream: type[BaseModel] | None = None,
              text: str | None = None, example: dict[str, Any] | None = None,
              summary: str | None = None) -> dict[str, Any]:
        """Route-decorator keyword arguments documenting the request ``body`` (with ``example``),
        the 200 as JSON ``response``, server-sent events of ``stream`` items, ``text`` (a
        text/plain description), or no content when none is given, and each error status in
        the ``errors`` envelope."""
        ok: dict[str, Any] = {"description": "success", "content": {}}
        if response is not None:
            ok["content"]["application/json"] = {"schema": self.ref(response)}
        if stream is not None:
            ok["content"]["text/event-stream"] = {
                "schema": self.ref(stream),
                "description": "with stream=true: server-sent events, each `data:` holding one item of this "
                               "schema (or an error envelope if the request fails once streaming)"}
        if text is not None:
            ok["content"]["text/plain"] = {"schema": {"type": "string", "description": text}}
        if not ok["content"]:
            ok["description"] = "success (no content)"
        error = {"application/json": {"schema": self.ref(errors)}}
        responses: dict[int | str, Any] = {200: ok}
        responses.update({status: {"description": why, "content": error} for status, why in ERROR_STATUSES.items()})
        kwargs: dict[str, Any] = {"responses": responses}
        if response is None and stream is None:  # else FastAPI would also document a JSON 200
            kwargs["response_class"] = Response if text is None else PlainTextResponse
        if summary is not None:
            kwargs["summary"] = summary
        if body is not None:
            content: dict[str, Any] = {"schema": self.ref(body)}
            if example is not None:
                content["example"] = example
            kwargs["openapi_extra"] = {"requestBody": {"required": True, "content": {"application/json": content}}}
        return kwargs


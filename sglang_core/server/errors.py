"""Error responses in OpenAI's envelope: ``{"error": {"message", "type", "param", "code"}}``."""

from __future__ import annotations

from typing import Callable

from starlette.responses import JSONResponse

# (status, message, param) -> the JSON body of an error, in some API's envelope.
ErrorShape = Callable[[int, str, "str | None"], dict]

TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
         405: "invalid_request_error", 413: "invalid_request_error", 422: "invalid_request_error",
         502: "server_error", 503: "service_unavailable", 500: "server_error"}


def error_body(status: int, message: str, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": TYPES.get(status, "invalid_request_error"), "param": param,
                      "code": str(status)}}


def error_response(status: int, message: str, param: str | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, param), status_code=status)


def param_of(message: str) -> str | None:
    """Our ValueErrors start with the field name (``"temperature: must be ..."``)."""
    head, sep, _ = message.partition(":")
    return head.strip() if sep and head.strip().replace("_", "").replace(".", "").isalnum() else None

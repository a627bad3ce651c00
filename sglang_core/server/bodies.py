"""JSON request bodies as Pydantic models, shared by the HTTP frontends.

Unknown fields are accepted and ignored, as OpenAI's and Anthropic's APIs do; known fields are
checked strictly (a string where a number belongs is a 400 naming the field, never silently
coerced).
"""

from __future__ import annotations

from typing import TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

# What Pydantic puts in an error's location for the member of a union; not part of the field path.
_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict"}


class StrictBody(BaseModel):
    """A request body (or part of one): extra fields allowed, known ones strictly typed.
    ``check_supported`` raises ``ValueError("<field>: ...")`` for what the server cannot do."""

    model_config = ConfigDict(extra="allow", strict=True)

    def check_supported(self) -> None:
        pass


M = TypeVar("M", bound=StrictBody)


def parse_body(model: type[M], raw: bytes) -> M:
    """Validate a JSON body; errors become ``ValueError("<field path>: <why>")`` (a 400)."""
    try:
        body = model.model_validate_json(raw)
    except ValidationError as exc:
        error = exc.errors()[0]
        if error["type"] == "json_invalid":
            raise ValueError(f"malformed JSON body: {error['msg']}") from None
        path = ".".join(str(p) for p in error["loc"] if p not in _TYPE_TAGS and "[" not in str(p))
        raise ValueError(f"{path or 'body'}: {error['msg']}") from None
    body.check_supported()
    return body

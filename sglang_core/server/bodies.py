"""JSON request bodies as Pydantic models, shared by the HTTP frontends.

Unknown fields are accepted and ignored, as OpenAI's and Anthropic's APIs do; known fields are
checked strictly (a string where a number belongs is a 400 naming the field, never silently
coerced).
"""

from __future__ import annotations

import json
from typing import Any, ClassVar, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

# What Pydantic puts in an error's location for the member of a union; not part of the field path.
_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict"}


class StrictBody(BaseModel):
    """A request body (or part of one): extra fields allowed, known ones strictly typed.
    ``check_supported`` raises ``ValueError("<field>: ...")`` for what the server cannot do."""

    model_config = ConfigDict(extra="allow", strict=True)

    def check_supported(self) -> None:
        pass


class SGLangSampling(StrictBody):
    """SGLang's sampling extensions, which our OpenAI and Anthropic frontends both take in the
    request body (the vendors' APIs have no such fields; clients send them in ``extra_body``)."""

    min_p: float | None = Field(None, json_schema_extra={"minimum": 0, "maximum": 1})
    repetition_penalty: float | None = Field(None, description="1: off; clamped to [1e-6, 1e6]", json_schema_extra={"exclusiveMinimum": 0})
    ignore_eos: bool | None = Field(None, description="keep generating past the end-of-sequence token")
    min_tokens: int | None = Field(None, description="generate at least this many tokens (at most max_tokens)",
                                   json_schema_extra={"minimum": 0})
    stop_token_ids: list[int] | None = Field(None, description="token ids that end the output")
    skip_special_tokens: bool | None = Field(None, description="default true: leave special tokens out of the text")
    regex: str | None = Field(None, description="constrain the output to this regular expression")
    json_schema: str | dict[str, Any] | None = Field(  # an object is serialised for the engine
        None, description="constrain the output to this JSON schema (an object, or its text)")
    ebnf: str | None = Field(None, description="constrain the output to this grammar (EBNF, in the grammar backend's dialect)")

    # Engine param names in its error messages -> these fields' names.
    API_NAMES: ClassVar[dict[str, str]] = {"min_new_tokens": "min_tokens"}

    def constraint(self) -> dict[str, str]:
        """The output constraint as sampling params (``regex``, ``json_schema`` or ``ebnf`` text), or {}."""
        given = {name: value for name, value in (("regex", self.regex), ("json_schema", self.json_schema),
                                                 ("ebnf", self.ebnf)) if value is not None}
        if len(given) > 1:
            raise ValueError(f"{list(given)[1]}: give only one of {' and '.join(given)}")
        if "json_schema" in given and not isinstance(self.json_schema, str):
            return {"json_schema": json.dumps(self.json_schema)}
        return given

    def sglang_params(self) -> dict[str, Any]:
        """These fields as engine sampling params (None: unset), checked by ``validated_params``
        with the rest of the request."""
        return {"min_p": self.min_p, "repetition_penalty": self.repetition_penalty, "ignore_eos": self.ignore_eos,
                "min_new_tokens": self.min_tokens, "stop_token_ids": self.stop_token_ids,
                "skip_special_tokens": self.skip_special_tokens, **self.constraint()}


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

"""The native routes' response bodies as Pydantic models, for the OpenAPI document (the routes
build them as dicts; the schema-driven fuzz test checks that the two agree)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field, RootModel


class GenerateItem(BaseModel):
    text: str = Field(description="the generated text (streamed: the whole text so far)")
    meta_info: dict[str, Any] = Field(description="prompt_tokens, completion_tokens, cached_tokens, finish_reason "
                                                  "(null while running; {type: stop|length|abort, ...}), logprobs "
                                                  "when asked for, as SGLang 0.2.10 reports them")


class GenerateResponse(RootModel[GenerateItem | list[GenerateItem]]):
    """One item for one prompt with n=1; else a list, prompt i's copy j at index i * n + j."""


class GenerateStreamItem(GenerateItem):
    index: int = Field(description="which output sequence (i * n + j) this event is about")


class TokenizeResponse(BaseModel):
    input_ids: list[int] | list[list[int]] = Field(description="one list per text when text is a list")


class RoleMarkers(BaseModel):
    role_prefix: dict[str, str]
    role_suffix: dict[str, str]
    stop: list[str]


class ModelInfo(BaseModel):
    model_path: str
    tokenizer_path: str
    is_generation: bool
    chat_template: RoleMarkers | None = Field(description="the chat template as text around each role, or null")


class ServerArgs(RootModel[dict[str, Any]]):
    """Every server setting (the API key hidden)."""


class ServerInfo(BaseModel, extra="allow"):
    """Every server setting, what the engine resolved, and its memory report."""

    memory: dict[str, int] = Field(description="kv_pool_size, kv_free, kv_cached, kv_cache_locked, running, waiting, ...")
    requests_in_flight: int
    peak_requests_in_flight: int


class PeakRequests(BaseModel):
    peak_requests_in_flight: int = Field(description="the peak before this reset")


EXAMPLES: dict[str, dict[str, Any]] = {
    "generate": {"text": "The capital of France is", "sampling_params": {"max_new_tokens": 8, "temperature": 0}},
    "tokenize": {"text": "Hello world"},
    "abort_request": {"rid": "my-request-1"},
}

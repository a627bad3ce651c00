"""Server settings: every engine setting plus the HTTP ones, each a flag and an env var."""

from __future__ import annotations

from pydantic import Field, field_validator

from sglang_core.config import EngineSettings


class ServerSettings(EngineSettings):
    host: str = Field("127.0.0.1", description="address to listen on")
    port: int = Field(30000, ge=0, le=65535, description="port to listen on")
    api_key: str | None = Field(None, description="require 'Authorization: Bearer <key>' or 'x-api-key: <key>' on every route but /health")
    frontends: list[str] | None = Field(None, description="serving frontends to mount, comma-separated (default: all registered)")
    chat_template: str | None = Field(None, description="chat template: a Jinja file or a built-in name (default: the tokenizer's)")
    served_model_name: str | None = Field(None, description="model name reported by /v1/models (default: the model path)")
    drain_timeout_s: float = Field(30.0, ge=0, description="on SIGTERM/SIGINT, wait this long for in-flight requests")
    max_queued_requests: int = Field(1024, gt=0, description="requests in flight before new ones get 503")
    max_request_bytes: int = Field(16 * 2**20, gt=0, description="largest accepted request body")
    enable_request_log: bool = Field(False, description="log every request's method, path, status and latency")
    # The server's own default: the event loop must never wait on a forward pass.
    engine_in_subprocess: bool = Field(True, description="run the scheduler and model in a process of their own")

    @field_validator("frontends", mode="before")
    @classmethod
    def _split_frontends(cls, value):
        if isinstance(value, str):
            return [p.strip() for p in value.split(",") if p.strip()] or None
        return value

    def public_dict(self) -> dict:
        """Settings safe to show (no secrets)."""
        data = super().public_dict()
        data["api_key"] = None if self.api_key is None else "<set>"
        return data

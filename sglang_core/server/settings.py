"""Server settings: every engine setting plus the HTTP ones, each a flag and an env var."""

from __future__ import annotations

from pydantic import Field, field_validator, model_validator
from pydantic_settings import SettingsConfigDict

from sglang_core.config import EngineSettings
from sglang_core.router.options import RouterOptions


class ServerSettings(EngineSettings, RouterOptions):
    # A model-level error would otherwise quote every input, the API key among them.
    model_config = SettingsConfigDict(**EngineSettings.model_config, hide_input_in_errors=True)

    host: str = Field("127.0.0.1", description="address to listen on")
    port: int = Field(30000, ge=0, le=65535, description="port to listen on")
    api_key: str | None = Field(None, description="require 'Authorization: Bearer <key>' or 'x-api-key: <key>' on every route but /health (a flag shows in ps: prefer --api-key-file or SGLANG_CORE_API_KEY)")
    api_key_file: str | None = Field(None, description="read the API key from this file (one line; the trailing newline is dropped)")
    frontends: list[str] | None = Field(None, description="serving frontends to mount, comma-separated (default: all registered)")
    chat_template: str | None = Field(None, description="chat template: a Jinja file or a built-in name (default: the tokenizer's)")
    tool_call_parser: str | None = Field(None, description="how the model writes tool calls: a registered tool parser (llama3, hermes, mistral, deepseek_v3, generic, ...; default: chosen from the chat template, else generic)")
    reasoning_parser: str | None = Field(None, description="split the model's <think> reasoning from its answer: deepseek-r1 or qwen3 (default: none)")
    served_model_name: str | None = Field(None, description="model name reported by /v1/models (default: the model path)")
    drain_timeout_s: float = Field(30.0, ge=0, description="on SIGTERM/SIGINT, wait this long for in-flight requests")
    max_queued_requests: int = Field(1024, gt=0, description="output sequences (prompts x n) in flight before new requests get 503")
    max_sequences_per_request: int = Field(256, gt=0, description="most output sequences (prompts x n) one request may ask for; more is a 400")
    max_request_bytes: int = Field(16 * 2**20, gt=0, description="largest accepted request body")
    timeout_keep_alive_s: float = Field(10.0, gt=0, description="close a keep-alive connection idle this long (above the 5 s after which common HTTP clients drop idle connections, so they never reuse one as the server closes it)")
    enable_request_log: bool = Field(False, description="log every request's method, path, status and latency")
    dp_size: int = Field(1, ge=1, json_schema_extra={"flags": ["--dp"]}, description="data parallelism: engine replicas behind this server, each in a process of its own, requests spread by --router-policy")
    # The server's own default: the event loop must never wait on a forward pass.
    engine_in_subprocess: bool = Field(True, description="run the scheduler and model in a process of their own")

    @field_validator("frontends", mode="before")
    @classmethod
    def _split_frontends(cls, value):
        if isinstance(value, str):
            return [p.strip() for p in value.split(",") if p.strip()] or None
        return value

    @model_validator(mode="after")
    def _replicas_meet_apart(self) -> "ServerSettings":
        # Each replica's ranks meet at a free loopback port of their own; one address would be
        # taken by the first replica (the next fails to listen) and serves one replica's nodes.
        if self.dp_size > 1 and self.dist_init_addr is not None:
            raise ValueError("dp_size: replicas cannot share one --dist-init-addr (multi-node tensor parallelism "
                             "serves one replica); leave it out with --dp-size")
        return self

    @model_validator(mode="after")
    def _read_api_key_file(self) -> "ServerSettings":
        if self.api_key_file is None:
            return self
        if self.api_key is not None:
            raise ValueError("api_key_file: give the API key once: --api-key-file, --api-key or SGLANG_CORE_API_KEY")
        try:
            with open(self.api_key_file) as f:
                key = f.read().rstrip("\r\n")
        except (OSError, UnicodeDecodeError) as exc:
            raise ValueError(f"api_key_file: cannot read {self.api_key_file}: {exc}") from None
        if not key.strip():
            raise ValueError(f"api_key_file: {self.api_key_file} is empty")
        if "\n" in key or "\r" in key:  # a header value cannot hold a line break
            raise ValueError(f"api_key_file: {self.api_key_file} must hold the key on one line")
        self.api_key = key
        return self

    def public_dict(self) -> dict:
        """Settings safe to show (no secrets)."""
        data = super().public_dict()
        data["api_key"] = None if self.api_key is None else "<set>"
        return data

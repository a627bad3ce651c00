"""Typed messages between the request side (tokenize, validate, detokenize) and the engine core
(scheduler + model). msgspec structs, so they cross a process boundary as msgpack, never pickle."""

from __future__ import annotations

from typing import Any

import msgspec


class TensorData(msgspec.Struct, frozen=True):
    """A tensor as raw bytes (C order), so it crosses to the engine process without pickle."""

    dtype: str  # a torch dtype's name: "float32", "int64", ...
    shape: list[int]
    data: bytes


class MediaItem(msgspec.Struct, frozen=True):
    """One image of a prompt, preprocessed on the request side: what the model's encoder takes
    and the run of placeholder tokens ``input_ids[offset : offset + length]`` it replaces."""

    offset: int
    length: int
    digest: bytes  # hash of the preprocessed content: the prefix cache keys the placeholders by it
    tensors: dict[str, TensorData]  # the model's encoder inputs by name ("pixel_values", ...)


class MediaPositions(msgspec.Struct, frozen=True):
    """Positions a model derives from a prompt's media (M-RoPE's temporal, height and width rows):
    ``table`` int64 [components, prompt tokens]; a token at sequence index ``i`` past the prompt
    has position ``i + decode_delta`` in every component."""

    table: TensorData
    decode_delta: int


class GenerateRequest(msgspec.Struct, frozen=True):
    """A tokenized, validated request."""

    rid: str
    input_ids: list[int]
    sampling_params: dict[str, Any]  # a validated SamplingParams as a dict
    return_logprob: bool = False
    logprob_start_len: int = -1
    top_logprobs_num: int = 0
    media: list[MediaItem] = []  # the prompt's images, in prompt order
    positions: MediaPositions | None = None  # None: each token's position is its index


class TokenOutput(msgspec.Struct):
    """One request's progress since its previous TokenOutput."""

    rid: str
    new_ids: list[int]
    finished_reason: dict[str, Any] | None
    cached_tokens: int
    forced_tokens: int = 0  # so far: output tokens appended by jump-forward, not sampled
    # Wall-clock time (time.time()) at which the engine core handed this output out, at the end
    # of the step that produced it: clients on the same host measure delivery against it.
    produced_at: float = 0.0
    output_logprobs: list[float] = []
    output_top_logprobs: list[list[tuple[float, int]]] = []
    # Sent once, with the first output, when prompt logprobs were asked for.
    input_logprobs: list[float | None] | None = None
    input_top_logprobs: list[list[tuple[float, int]] | None] | None = None

"""One generation request as the scheduler sees it, from arrival to finish."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch

from sglang_core.messages import MediaItem
from sglang_core.multimodal import media_key_ids
from sglang_core.sampling.params import SamplingParams


@dataclass
class Req:
    rid: str
    origin_input_ids: list[int]
    sampling_params: SamplingParams
    return_logprob: bool = False
    # First prompt position whose logprob is returned; -1 = none of the prompt.
    logprob_start_len: int = -1
    top_logprobs_num: int = 0
    media: list[MediaItem] = field(default_factory=list)  # the prompt's images
    # Encoder outputs of ``media`` by index, kept from the first prefill chunk that needs one
    # until the image's placeholders are all in the KV cache.
    media_embeds: dict[int, torch.Tensor] = field(default_factory=dict)
    # Positions the model derived from the media (``MediaPositions``): [components, prompt tokens],
    # and the shift of every later token's position. None and 0: each token's position is its index.
    position_table: torch.Tensor | None = None
    position_delta: int = 0

    output_ids: list[int] = field(default_factory=list)
    # {"type": "stop" | "length" | "abort", ...} once finished, SGLang's shape.
    finished_reason: dict[str, Any] | None = None
    arrival_time: float = field(default_factory=time.monotonic)
    generator: torch.Generator | None = None
    # Constrained decoding: the compiled grammar (a Future until ready) and this request's state in it.
    grammar_future: Any = None
    grammar: Any = None
    forced_tokens: int = 0  # output tokens jump-forward appended without sampling

    # Memory, owned through the scheduler's request-memory helpers only.
    req_pool_idx: int | None = None
    prefix_len: int = 0  # leading tokens whose KV slots belong to the prefix cache (locked)
    cache_handle: Any = None  # the prefix cache's lock handle for those tokens
    kv_len: int = 0  # tokens of fill_ids whose KV is in the request's row
    cached_tokens: int = 0  # prompt tokens served from the prefix cache (reported)
    # The length regime its KV is computed in (scheduler/length_regimes.py; 0 for a model without
    # regimes): the prefix-cache namespace of its tokens.
    kv_regime: int = 0
    times_retracted: int = 0

    # Logprobs gathered so far.
    input_token_logprobs: list[float | None] = field(default_factory=list)
    input_top_logprobs: list[list[tuple[float, int]] | None] = field(default_factory=list)
    output_token_logprobs: list[float] = field(default_factory=list)
    output_top_logprobs: list[list[tuple[float, int]]] = field(default_factory=list)

    @property
    def fill_ids(self) -> list[int]:
        """Every token the model must have seen before sampling the next one."""
        return self.origin_input_ids + self.output_ids

    def __post_init__(self) -> None:
        self._prompt_key = media_key_ids(self.origin_input_ids, self.media) if self.media else self.origin_input_ids

    @property
    def key_ids(self) -> list[int]:
        """``fill_ids`` as the prefix cache keys them: an image's placeholders by its content's hash."""
        return self._prompt_key + self.output_ids

    @property
    def fill_len(self) -> int:
        """``len(fill_ids)`` without building the list (the scheduler asks every step)."""
        return len(self.origin_input_ids) + len(self.output_ids)

    def fill_id(self, i: int) -> int:
        """``fill_ids[i]`` for ``0 <= i < fill_len``, without building the list."""
        n = len(self.origin_input_ids)
        return self.origin_input_ids[i] if i < n else self.output_ids[i - n]

    @property
    def awaiting_grammar(self) -> bool:
        return self.grammar_future is not None and self.grammar is None

    @property
    def finished(self) -> bool:
        return self.finished_reason is not None

    @property
    def wants_input_logprobs(self) -> bool:
        return self.return_logprob and 0 <= self.logprob_start_len < len(self.origin_input_ids)

"""What one forward pass needs to know about its batch, built once per step by the model runner.

Data only: the services a layer needs (the KV pool, the attention backend) reach it through the
backend the runner bound to it, not through the batch."""

from __future__ import annotations

import enum
from dataclasses import dataclass
import torch


class ForwardMode(enum.Enum):
    EXTEND = "extend"  # new tokens appended to (possibly cached) prefixes: prefill and chunked prefill
    DECODE = "decode"  # exactly one new token per request


@dataclass
class RowChunks:
    """A decode batch that is an extend step replayed as one row per new token
    (``cuda_graph.decode_rows``), its prefill chunks named again: chunk c is the rows
    ``first_rows[c] .. first_rows[c] + seq_lens[c] - prefix_lens[c] - 1``, the new tokens of
    request row ``req_pool_indices[c]``, so a backend may attend them as one extend (each key read
    once per block of rows) instead of row by row. Fixed-size device tensors, rewritten before each
    graph replay: entries past the step's chunks have seq_len = prefix_len = 0."""

    req_pool_indices: torch.Tensor  # [chunks]
    seq_lens: torch.Tensor  # [chunks] the request's length once the chunk is in
    prefix_lens: torch.Tensor  # [chunks] its tokens cached before the chunk
    first_rows: torch.Tensor  # [chunks] the batch row of the chunk's first token
    in_chunk: torch.Tensor  # [rows] 1: a chunk's row (the backend attends it with its chunk), 0: a decode row


@dataclass
class ForwardBatch:
    mode: ForwardMode
    input_ids: torch.Tensor  # [T] new tokens of all requests, concatenated
    positions: torch.Tensor  # [T], or [components, T] where a model derives positions from media (M-RoPE)
    out_cache_loc: torch.Tensor  # [T] KV slot each new token's K/V is written to
    req_pool_indices: torch.Tensor  # [B] request rows in req_to_token
    seq_lens: torch.Tensor  # [B] tokens per request after this step (prefix + new)
    prefix_lens: torch.Tensor  # [B] tokens already in the KV cache before this step
    seq_lens_cpu: list[int]
    prefix_lens_cpu: list[int]
    req_to_token: torch.Tensor  # [request rows, max context] the KV slot of each cached token
    # Decode with cascade: (length, batch rows) of requests whose first ``length`` KV slots are
    # the same (a cached prefix they share); empty when not asked for.
    shared_prefixes: tuple[tuple[int, tuple[int, ...]], ...] = ()
    # [B] each request's length once all the tokens scheduled for it are in (``Req.fill_len``):
    # beyond seq_lens while a prompt is prefilled in chunks (its whole length), seq_lens in
    # decode. Length-dependent rope scalings (LongRoPE) choose by it. None: the same as seq_lens.
    fill_lens: torch.Tensor | None = None
    # Embeddings that replace the token embeddings of some new tokens (an image's placeholders,
    # from the model's ``embed_media``): ``input_embeds[i]`` goes to row ``input_embed_rows[i]``
    # of ``input_ids``. None: every token is embedded from its id.
    input_embed_rows: torch.Tensor | None = None
    input_embeds: torch.Tensor | None = None
    # Decode of an extend step's rows whose backend ``attends_row_chunks``: its prefill chunks.
    row_chunks: RowChunks | None = None

    @property
    def batch_size(self) -> int:
        return len(self.seq_lens_cpu)

    @property
    def extend_lens_cpu(self) -> list[int]:
        return [s - p for s, p in zip(self.seq_lens_cpu, self.prefix_lens_cpu)]

"""Positions of a prefill step for a model that derives them from a prompt's media (M-RoPE): each
request's prompt tokens take their columns of the table computed with the prompt, so a chunk, a
prefix reused from the cache or a prompt prefilled again after retraction reads the positions
of the whole prompt; tokens past the prompt (output prefilled again, jump-forward text) take
their index plus the request's delta in every component, as they did when decoded. A request
without a table (text only) has its index in every component."""

from __future__ import annotations

from typing import Sequence

import torch

from sglang_core.request import Req


def step_positions(spans: Sequence[tuple[Req, int, int]]) -> torch.Tensor:
    """[components, tokens] positions of the tokens ``fill_ids[start:end]`` of each span, concatenated;
    at least one request has a ``position_table``."""
    components = next(req.position_table.shape[0] for req, _, _ in spans if req.position_table is not None)
    parts: list[torch.Tensor] = []
    for req, start, end in spans:
        table = req.position_table
        prompt_end = start if table is None else min(end, table.shape[1])
        if prompt_end > start:
            parts.append(table[:, start:prompt_end])
        later = max(start, prompt_end)
        if end > later:
            parts.append(torch.arange(later + req.position_delta, end + req.position_delta).expand(components, -1))
    return torch.cat(parts, dim=1)

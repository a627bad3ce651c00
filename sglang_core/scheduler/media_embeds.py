"""Image embeddings for a prefill step: the encoder runs once per image, batched over every image
the step's chunks reach first, and its output stays on the request until the image's last
placeholder is prefilled, so a prompt chunked across an image reuses it. A retracted or
re-admitted request encodes an image again only if its placeholders are not in the cache."""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from sglang_core.messages import MediaItem
from sglang_core.request import Req

Encode = Callable[[list[MediaItem]], list[torch.Tensor]]


def step_input_embeds(spans: Sequence[tuple[Req, int, int]], encode: Encode) -> tuple[list[int], torch.Tensor] | None:
    """For a step whose new tokens are each span's ``fill_ids[start:end]`` concatenated: the rows
    of those tokens that are image placeholders and their embeddings, or None if there are none."""
    missing: list[tuple[Req, int]] = []
    for req, start, end in spans:
        missing += [(req, i) for i, item in enumerate(req.media)
                    if i not in req.media_embeds and _overlap(item, start, end)]
    if missing:
        for (req, i), embeds in zip(missing, encode([req.media[i] for req, i in missing]), strict=True):
            req.media_embeds[i] = embeds
    rows: list[int] = []
    parts: list[torch.Tensor] = []
    base = 0
    for req, start, end in spans:
        for i, item in enumerate(req.media):
            span = _overlap(item, start, end)
            if span:
                lo, hi = span
                rows += range(base + lo - start, base + hi - start)
                parts.append(req.media_embeds[i][lo - item.offset : hi - item.offset])
            if i in req.media_embeds and item.offset + item.length <= end:
                del req.media_embeds[i]  # every placeholder of it is prefilled now
        base += end - start
    return (rows, torch.cat(parts)) if parts else None


def _overlap(item: MediaItem, start: int, end: int) -> tuple[int, int] | None:
    lo, hi = max(start, item.offset), min(end, item.offset + item.length)
    return (lo, hi) if lo < hi else None

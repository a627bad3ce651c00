"""Image embeddings for a prefill step: the encoder runs once per image, batched over every image
the step's chunks reach first, and its output stays on the request until the image's last
placeholder is prefilled, so a prompt chunked across an image reuses it. A retracted or
re-admitted request encodes an image again only if its placeholders are not in the cache. An
image the encoder fails on ends its own request, not the step's others."""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from sglang_core.messages import MediaItem
from sglang_core.request import Req

Encode = Callable[[list[MediaItem]], list[torch.Tensor]]


# The machine's failures, not a request's media: like any step error they end every request.
NOT_THE_REQUESTS_FAULT = (torch.OutOfMemoryError, MemoryError)


def encode_step_media(spans: Sequence[tuple[Req, int, int]], encode: Encode) -> list[tuple[Req, Exception]]:
    """Encode, as one batch, every image the step's chunks ``fill_ids[start:end]`` reach that its
    request does not hold yet, and keep each on its request. If the batch fails, each request's
    images are encoded alone, so a bad image fails its own request only. Returns the requests
    whose images failed, with the error; ``NOT_THE_REQUESTS_FAULT`` errors are raised instead."""
    groups: list[tuple[Req, list[int]]] = []
    for req, start, end in spans:
        missing = [i for i, item in enumerate(req.media) if i not in req.media_embeds and _overlap(item, start, end)]
        if missing:
            groups.append((req, missing))
    error = _batch_error(groups, encode)
    if error is None:
        return []
    if len(groups) == 1:  # encoded alone already: the error is its own
        return [(groups[0][0], error)]
    alone = ((req, _batch_error([(req, indices)], encode)) for req, indices in groups)
    return [(req, exc) for req, exc in alone if exc is not None]


def _batch_error(groups: list[tuple[Req, list[int]]], encode: Encode) -> Exception | None:
    """Encode the groups' images as one batch and keep them on their requests; the error if it
    fails (``NOT_THE_REQUESTS_FAULT`` errors are raised)."""
    wanted = [(req, i) for req, indices in groups for i in indices]
    if not wanted:
        return None
    try:
        embeds = encode([req.media[i] for req, i in wanted])
    except NOT_THE_REQUESTS_FAULT:
        raise
    except Exception as exc:
        return exc
    for (req, i), embed in zip(wanted, embeds, strict=True):
        req.media_embeds[i] = embed
    return None


def step_input_embeds(spans: Sequence[tuple[Req, int, int]]) -> tuple[list[int], torch.Tensor] | None:
    """For a step whose new tokens are each span's ``fill_ids[start:end]`` concatenated (their
    images encoded by ``encode_step_media``): the rows of those tokens that are image
    placeholders and their embeddings, or None if there are none."""
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

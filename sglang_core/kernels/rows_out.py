"""``RowsOut``: a second destination for a fused kernel's rows, at indexed rows of another buffer
(a paged KV cache's slots), so the kernel that computes a cached row also stores it."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class RowsOut:
    """A second place for a norm's rows: row i of the result, followed by ``tail[i]``, goes into
    ``buffer[rows[i]]`` (a paged cache's slot: the norm's launch writes the cached row, no store
    of its own). ``buffer``: [N, hidden + tail width], rows at any stride, in the result's dtype;
    ``rows``: [T] int; ``tail``: [T, width] (width may be 0), rows at any stride."""

    buffer: torch.Tensor
    rows: torch.Tensor
    tail: torch.Tensor

    def check(self, tokens: int, hidden: int, dtype: torch.dtype) -> None:
        if self.buffer.dtype != dtype or self.tail.dtype != dtype:
            raise ValueError(f"rows_out: buffer {self.buffer.dtype} and tail {self.tail.dtype} must be the result's "
                             f"{dtype} (a converting store is the caller's)")
        if self.rows.shape != (tokens,) or self.tail.dim() != 2 or self.tail.shape[0] != tokens:
            raise ValueError(f"rows_out: rows {tuple(self.rows.shape)} and tail {tuple(self.tail.shape)} must have "
                             f"the norm's {tokens} rows")
        width = hidden + self.tail.shape[1]
        if self.buffer.dim() != 2 or self.buffer.shape[1] != width or self.buffer.stride(1) != 1 \
                or self.tail.stride(1) != 1:
            raise ValueError(f"rows_out: buffer {tuple(self.buffer.shape)} must be [N, {width}] (hidden + tail), "
                             "buffer and tail with contiguous rows")

    def write(self, normed: torch.Tensor) -> None:
        """The PyTorch path's store (the fused kernel's in its launch)."""
        rows2 = normed.reshape(-1, normed.shape[-1])
        self.check(rows2.shape[0], rows2.shape[1], normed.dtype)
        self.buffer[self.rows] = torch.cat([rows2, self.tail], dim=-1)

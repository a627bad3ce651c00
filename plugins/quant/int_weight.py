"""How a packed integer weight is laid out, as ``int_matmul``'s kernel reads it: its own module so
the kernel (which imports Triton) and the methods that describe their tensors (which must not) both
import it without importing each other."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class IntWeight:
    """A packed integer weight of ``K`` input and ``N`` output features, as the kernel reads it.

    ``qweight`` int32 ``[K / p, N]``, indexed ``[input, output]`` (a transposed view where the
    checkpoint stores ``[out, in]``): ``p = 32 / bits`` consecutive input features a word, lowest
    bits first (AWQ's words, which pack output features, are repacked so at load).
    ``scales`` ``[G, N]``. ``zeros`` int32 ``[G, N / p]``, ``p`` output features a word in
    order, or None; the zero point is the stored value plus
    ``zero_offset`` (None: ``zero_offset`` itself). Input feature ``k`` is in group ``g_idx[k]``,
    else ``k // group_size`` (None: one group)."""
    qweight: torch.Tensor
    scales: torch.Tensor
    bits: int
    zeros: torch.Tensor | None = None
    zero_offset: int = 0
    group_size: int | None = None
    g_idx: torch.Tensor | None = None

    @property
    def shape(self) -> tuple[int, int]:
        """``(K, N)``: input and output features."""
        rows, cols = self.qweight.shape
        return rows * (32 // self.bits), cols

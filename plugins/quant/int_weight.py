"""How a packed integer weight is laid out, as ``int_matmul``'s kernel reads it: its own module so
the kernel (which imports Triton) and the methods that describe their tensors (which must not) both
import it without importing each other."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class IntWeight:
    """A packed integer weight of ``K`` input and ``N`` output features, as the kernel reads it.

    ``qweight`` int32, indexed ``[input, output]`` (a transposed view where the checkpoint stores
    ``[out, in]``): ``[K / p, N]`` when ``packed_dim`` is 0 (words pack input features),
    ``[K, N / p]`` when it is 1; ``p = 32 / bits`` values to a word, lowest bits first, in output
    order or, ``interleaved``, AWQ's (slots hold features 0, 2, 4, 6, 1, 3, 5, 7 of 8) where they
    run along the outputs. ``scales`` ``[G, N]``. ``zeros`` int32 ``[G, N / p]``, packed along the
    outputs like the weight, or None; the zero point is the stored value plus
    ``zero_offset`` (None: ``zero_offset`` itself). Input feature ``k`` is in group ``g_idx[k]``,
    else ``k // group_size`` (None: one group)."""
    qweight: torch.Tensor
    scales: torch.Tensor
    bits: int
    packed_dim: int
    interleaved: bool = False
    zeros: torch.Tensor | None = None
    zero_offset: int = 0
    group_size: int | None = None
    g_idx: torch.Tensor | None = None

    @property
    def shape(self) -> tuple[int, int]:
        """``(K, N)``: input and output features."""
        pack = 32 // self.bits
        rows, cols = self.qweight.shape
        return (rows * pack, cols) if self.packed_dim == 0 else (rows, cols * pack)

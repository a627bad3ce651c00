"""How the fused MoE kernel (``fused_moe.py``) reads a stacked expert weight that is quantized:
its own module, free of Triton, so quantization plugins describe their tensors without importing
the kernel (which only CUDA runs need).

The kernel dequantizes each weight tile in registers, so the weight is read at its stored size.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

FORMATS = ("fp8", "int")


@dataclass(frozen=True)
class QuantizedExperts:
    """A stacked expert weight (``w13`` or ``w2``) of ``E`` experts, ``N`` output and ``K`` input
    features each; element ``(n, k)`` of expert ``e`` is

        ``(value(e, n, k) - zero(e, n, k)) * scales[e, n // scale_rows, k // scale_cols]``

    - ``format="fp8"``: ``data`` ``[E, N, K]`` float8_e4m3fn, ``value`` its element, no zero point.
    - ``format="int"``: ``data`` int32 words of ``p = 32 / bits`` unsigned values each, lowest bits
      first, packed along ``packed_dim`` (1: outputs, ``[E, N / p, K]``; 2: inputs, ``[E, N, K / p]``);
      value ``j`` of a word's run in slot ``j``, or with ``interleaved`` (AWQ, 4 bits along the
      outputs) in slot ``(j % 2) * 4 + j // 2`` (slots hold the run's values 0, 2, 4, 6, 1, 3, 5, 7).
      Packed along the outputs, w13's gate rows must fill whole words (``I`` a multiple of ``p``).
      ``zeros`` ``[E, N / p, G]`` int32 packed along the outputs in the same slot order, plus
      ``zero_offset``; ``zeros`` None: the zero point is ``zero_offset``.

    Any strides (plugins pass transposed views of ``[in, out]`` checkpoint tensors). ``scales`` is
    3-d: a per-output-row scale ``[E, N]`` is passed as ``[E, N, 1]`` with ``scale_cols = K``.
    """
    data: torch.Tensor
    scales: torch.Tensor
    format: str
    scale_rows: int = 1
    scale_cols: int | None = None  # None: one group of all K inputs
    bits: int = 8
    packed_dim: int = 2
    interleaved: bool = False
    zeros: torch.Tensor | None = None
    zero_offset: int = 0

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise ValueError(f"format: must be one of {FORMATS}, not {self.format!r}")
        if self.format == "int" and (self.bits not in (4, 8) or self.packed_dim not in (1, 2)):
            raise ValueError(f"bits {self.bits} / packed_dim {self.packed_dim}: int weights pack 4 or 8 bits "
                             "along dim 1 or 2")
        if self.interleaved and (self.format, self.bits, self.packed_dim) != ("int", 4, 1):
            raise ValueError("interleaved: AWQ's order is of 4-bit values packed along the outputs (dim 1)")
        if self.scales.dim() != 3 or (self.zeros is not None and self.zeros.dim() != 3):
            raise ValueError(f"scales {tuple(self.scales.shape)} (and zeros) must be 3-d [E, rows, groups]")

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(E, N, K)``."""
        experts, rows, cols = self.data.shape
        if self.format == "fp8":
            return experts, rows, cols
        pack = 32 // self.bits
        return (experts, rows * pack, cols) if self.packed_dim == 1 else (experts, rows, cols * pack)

    @property
    def group_cols(self) -> int:
        """Inputs per scale group (``scale_cols``, or all ``K``)."""
        return self.scale_cols or self.shape[2]

    def nbytes(self) -> int:
        """Bytes the kernel reads for the whole weight: values, scales and zero points."""
        tensors = (self.data, self.scales) + ((self.zeros,) if self.zeros is not None else ())
        return sum(t.numel() * t.element_size() for t in tensors)

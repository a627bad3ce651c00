"""ggml's weight blocks (llama.cpp's ``ggml-common.h`` layouts) dequantized in torch, all blocks of
a tensor at once.

A quantized GGUF matrix is stored row by row, each row a run of blocks along the input features:
``[rows, row_bytes]`` uint8. ``dequantize(raw, ggml_type)`` turns that into ``[rows, features]``
float32. Byte layouts, per block (``f16``: an IEEE half; ``sc``/``m``: per-32-value scale / min):

- Q4_0, 32 values, 18 bytes: ``d`` f16, 16 bytes of nibbles; value ``j`` is the low nibble of byte
  ``j``, value ``16 + j`` its high nibble; ``x = d * (q - 8)``.
- Q4_1, 32 values, 20 bytes: ``d`` f16, ``m`` f16, nibbles as Q4_0; ``x = d * q + m``.
- Q8_0, 32 values, 34 bytes: ``d`` f16, 32 int8; ``x = d * q``.
- Q4_K, 256 values, 144 bytes: ``d``, ``dmin`` f16, 12 bytes of eight 6-bit (scale, min) pairs,
  128 bytes of nibbles: 64-value chunk ``c`` takes bytes ``32c..32c+31``, low nibbles then high;
  ``x = d * sc * q - dmin * m``.
- Q5_K, 256 values, 176 bytes: as Q4_K with 32 bytes ``qh`` before the nibbles: value ``l`` of
  32-value group ``g`` gets bit ``g`` of ``qh[l]`` as its fifth bit.
- Q6_K, 256 values, 210 bytes: 128 bytes ``ql`` (low 4 bits), 64 bytes ``qh`` (high 2 bits),
  16 int8 scales (one per 16 values), ``d`` f16 last; ``x = d * sc * (q - 32)``.
- F32 / F16 / BF16: one value per 4 / 2 / 2 bytes, stored as they are.
"""

from __future__ import annotations

from typing import Callable

import torch
from gguf import GGMLQuantizationType as T


def _f16(b: torch.Tensor) -> torch.Tensor:
    """Two bytes per row (little-endian) as float32 ``[blocks, 1]``."""
    return b.contiguous().view(torch.float16).float()


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """``[blocks, n]`` bytes -> ``[blocks, 2n]``: every low nibble, then every high nibble."""
    return torch.cat([qs & 0x0F, qs >> 4], dim=-1)


def _q4_0(b: torch.Tensor) -> torch.Tensor:
    return _f16(b[:, :2]) * (_nibbles(b[:, 2:]).float() - 8)


def _q4_1(b: torch.Tensor) -> torch.Tensor:
    return _f16(b[:, :2]) * _nibbles(b[:, 4:]).float() + _f16(b[:, 2:4])


def _q8_0(b: torch.Tensor) -> torch.Tensor:
    return _f16(b[:, :2]) * b[:, 2:].contiguous().view(torch.int8).float()


def _k_scales(packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The eight 6-bit scales and mins of a Q4_K/Q5_K block's 12 bytes, each ``[blocks, 8]``:
    sub-blocks 0-3 keep theirs in the low 6 bits of bytes 0-3 (scales) and 4-7 (mins); sub-blocks
    4-7 take their low 4 bits from bytes 8-11 and their top 2 from the top bits of bytes 0-3 / 4-7."""
    low, mid, high = packed[:, :4], packed[:, 4:8], packed[:, 8:]
    scales = torch.cat([low & 63, (high & 0x0F) | ((low >> 6) << 4)], dim=-1)
    mins = torch.cat([mid & 63, (high >> 4) | ((mid >> 6) << 4)], dim=-1)
    return scales.float(), mins.float()


def _k_affine(b: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """``d * sc * q - dmin * m`` per 32-value group: ``q`` is ``[blocks, 8, 32]``."""
    scales, mins = _k_scales(b[:, 4:16])
    d, dmin = _f16(b[:, :2]), _f16(b[:, 2:4])
    return ((d * scales).unsqueeze(-1) * q - (dmin * mins).unsqueeze(-1)).flatten(1)


def _q4_k(b: torch.Tensor) -> torch.Tensor:
    qs = b[:, 16:].reshape(-1, 4, 32)  # 64-value chunks: 32 low nibbles then 32 high ones
    return _k_affine(b, _nibbles(qs).reshape(-1, 8, 32).float())


def _q5_k(b: torch.Tensor) -> torch.Tensor:
    qh, qs = b[:, 16:48], b[:, 48:].reshape(-1, 4, 32)
    fifth = (qh.unsqueeze(1) >> torch.arange(8, dtype=torch.uint8, device=b.device).view(1, 8, 1)) & 1
    return _k_affine(b, (_nibbles(qs).reshape(-1, 8, 32) | (fifth << 4)).float())


def _q6_k(b: torch.Tensor) -> torch.Tensor:
    ql, qh = b[:, :128].reshape(-1, 2, 2, 32), b[:, 128:192].reshape(-1, 2, 1, 32)
    scales = b[:, 192:208].contiguous().view(torch.int8).float()
    d = _f16(b[:, 208:210])
    # Per 128-value half: 32 rows l of (ql[l], ql[32+l]) give 4 groups of 32 values, the low
    # nibbles of ql[l], ql[32+l], then their high nibbles; qh[l]'s bit pairs 0-1, 2-3, 4-5, 6-7
    # are those groups' top two bits.
    low = torch.cat([ql & 0x0F, ql >> 4], dim=2)  # [blocks, half, group, 32]
    shifts = torch.arange(0, 8, 2, dtype=torch.uint8, device=b.device).view(1, 1, 4, 1)
    q = (low | (((qh >> shifts) & 3) << 4)).float() - 32
    return (d * scales).repeat_interleave(16, dim=1) * q.flatten(1)


# ggml type -> (values per block, bytes per block, block dequantizer: [blocks, bytes] -> [blocks, values])
BLOCKS: dict[int, tuple[int, int, Callable[[torch.Tensor], torch.Tensor]]] = {
    T.F32: (1, 4, lambda b: b.contiguous().view(torch.float32)),
    T.F16: (1, 2, lambda b: b.contiguous().view(torch.float16).float()),
    T.BF16: (1, 2, lambda b: b.contiguous().view(torch.bfloat16).float()),
    T.Q4_0: (32, 18, _q4_0),
    T.Q4_1: (32, 20, _q4_1),
    T.Q8_0: (32, 34, _q8_0),
    T.Q4_K: (256, 144, _q4_k),
    T.Q5_K: (256, 176, _q5_k),
    T.Q6_K: (256, 210, _q6_k),
}


def type_name(ggml_type: int) -> str:
    try:
        return T(ggml_type).name
    except ValueError:
        return f"ggml type {ggml_type}"


def row_bytes(ggml_type: int, features: int) -> int:
    """Bytes of one stored row of ``features`` values; ``ValueError`` for a type this plugin does not
    read or a row that is not whole blocks."""
    if ggml_type not in BLOCKS:
        supported = ", ".join(type_name(t) for t in BLOCKS)
        raise ValueError(f"GGUF tensor type {type_name(ggml_type)} is not supported (supported: {supported})")
    values, nbytes, _ = BLOCKS[ggml_type]
    if features % values:
        raise ValueError(f"{features} input features are not whole {type_name(ggml_type)} blocks of {values}")
    return features // values * nbytes


def dequantize(raw: torch.Tensor, ggml_type: int) -> torch.Tensor:
    """``[rows, row_bytes]`` uint8 blocks of ``ggml_type`` -> ``[rows, features]`` float32."""
    values, nbytes, block = BLOCKS[ggml_type]
    rows = raw.shape[0]
    return block(raw.reshape(-1, nbytes)).reshape(rows, raw.shape[1] // nbytes * values)

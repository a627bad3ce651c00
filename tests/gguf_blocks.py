"""Random ggml blocks of every type the ``gguf`` quant plugin reads, built byte-wise from the published
block layouts: any bytes are a valid block once its f16 scales are finite. The tests check them
against the ``gguf`` package's own dequantizer, so the layouts here need not be trusted."""

from __future__ import annotations

import numpy as np
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as T
from gguf.quants import dequantize

# Byte offsets of each block's f16 scale fields (d, and dmin / m where the type has one).
F16_FIELDS = {T.Q4_0: (0,), T.Q4_1: (0, 2), T.Q8_0: (0,), T.Q4_K: (0, 2), T.Q5_K: (0, 2), T.Q6_K: (208,)}
QUANTIZED = tuple(F16_FIELDS)
FLOATS = {T.F32: np.float32, T.F16: np.float16}


def random_blocks(qtype: T, rows: int, features: int, rng: np.random.Generator, std: float = 0.05) -> np.ndarray:
    """``[rows, row_bytes]`` uint8: ``rows`` rows of ``features`` values stored as ``qtype``, the
    values of standard deviation ``std`` (as the ``gguf`` package dequantizes them)."""
    values = rng.standard_normal((rows, features)).astype(np.float32) * np.float32(std)
    if qtype in FLOATS:
        return values.astype(FLOATS[qtype]).view(np.uint8)
    if qtype == T.BF16:  # the top half of a float32's bits
        return (values.view(np.uint32) >> 16).astype(np.uint16).view(np.uint8)
    block_values, block_bytes = GGML_QUANT_SIZES[qtype]
    blocks = rng.integers(0, 256, (rows * features // block_values, block_bytes), dtype=np.uint8)
    scales = rng.standard_normal((len(blocks), len(F16_FIELDS[qtype]))).astype(np.float32)

    def set_scales(factor: float) -> None:
        for i, offset in enumerate(F16_FIELDS[qtype]):
            blocks[:, offset:offset + 2] = (scales[:, i] * factor).astype(np.float16).view(np.uint8).reshape(-1, 2)

    set_scales(1.0)
    # Every value is linear in its block's f16 fields: scaling them gives the values ``std``.
    set_scales(std / float(dequantize(blocks, qtype).std()))
    return blocks.reshape(rows, -1)

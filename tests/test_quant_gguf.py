"""GGUF linear layers kept quantized (the ``gguf`` quant plugin): ggml blocks dequantized on the fly.

The dequantizers are checked against the ``gguf`` package's own (an independent implementation) on
random blocks of every type; whole models against HF transformers float32 loading the same GGUF.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T
from gguf.quants import dequantize as gguf_dequantize

from gguf_blocks import FLOATS, QUANTIZED, random_blocks
from sglang_plugins.quant.gguf.blocks import dequantize, row_bytes


@pytest.mark.parametrize("qtype", [*QUANTIZED, *FLOATS, T.BF16], ids=lambda t: t.name)
def test_dequantize_matches_the_gguf_package(qtype):
    rows, features = 6, 512
    raw = random_blocks(qtype, rows, features, np.random.default_rng(int(qtype)))
    assert raw.shape == (rows, row_bytes(qtype, features))
    got = dequantize(torch.from_numpy(raw), qtype)
    want = torch.from_numpy(gguf_dequantize(raw, qtype).astype(np.float32))
    assert got.dtype == torch.float32 and got.shape == (rows, features)
    assert torch.equal(got, want)  # the same float32 operations in the same order: bit for bit


def test_unsupported_type_and_partial_block_are_named():
    with pytest.raises(ValueError, match=r"type Q2_K is not supported \(supported: F32, F16, BF16, Q4_0"):
        row_bytes(T.Q2_K, 256)
    with pytest.raises(ValueError, match=r"100 input features are not whole Q4_K blocks of 256"):
        row_bytes(T.Q4_K, 100)

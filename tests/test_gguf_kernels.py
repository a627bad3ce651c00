"""The gguf plugin's Triton kernels (``plugins/quant/gguf/kernels.py``) against ``blocks.py``'s torch
dequantizers (themselves checked bit for bit against the ``gguf`` package's) and a float64 matmul.

On CPU they run in Triton's interpreter (``TRITON_INTERPRET=1``, set by conftest.py); with a GPU
the same tests run the compiled kernels on CUDA tensors, and the tiny mixed-type GGUF is served on
CUDA through them.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T
from torch import nn

from gguf_blocks import QUANTIZED, random_blocks

pytest.importorskip("triton")  # in the test extra; absent only outside CI
from sglang_plugins.quant.gguf import kernels  # noqa: E402
from sglang_plugins.quant.gguf.blocks import dequantize  # noqa: E402
from sglang_plugins.quant.gguf.method import GGUFMethod  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# 3 K-quant super-blocks / 25 small blocks: two loop steps of 512 values, the second partly masked.
FEATURES = {T.Q4_K: 768, T.Q5_K: 768, T.Q6_K: 768, T.Q4_0: 800, T.Q4_1: 800, T.Q8_0: 800}
ROWS = 5  # not a whole number of any kernel's row tile


def blocks_of(qtype: T, rows: int, features: int, seed: int) -> torch.Tensor:
    return torch.from_numpy(random_blocks(qtype, rows, features, np.random.default_rng(seed))).to(DEVICE)


def reference_product(x: torch.Tensor, blocks: torch.Tensor, qtype: T) -> torch.Tensor:
    return x.double() @ dequantize(blocks.cpu(), qtype).double().T.to(x.device)


def test_every_quantized_type_has_a_kernel():
    assert set(kernels.LANES) == set(QUANTIZED)


@pytest.mark.parametrize("qtype", QUANTIZED, ids=lambda t: t.name)
def test_dequantize_kernel_matches_blocks(qtype):
    blocks = blocks_of(qtype, ROWS, FEATURES[qtype], int(qtype))
    got = kernels.dequantize(blocks, qtype, FEATURES[qtype], torch.float32)
    torch.testing.assert_close(got.cpu(), dequantize(blocks.cpu(), qtype))


@pytest.mark.parametrize("tokens", [1, 3, kernels.GEMV_MAX_ROWS, 11])  # 11: dequantize + cuBLAS
@pytest.mark.parametrize("qtype", QUANTIZED, ids=lambda t: t.name)
def test_matmul_matches_a_float64_product(qtype, tokens):
    features = FEATURES[qtype]
    blocks = blocks_of(qtype, ROWS, features, int(qtype) + tokens)
    x = torch.randn(tokens, features, generator=torch.Generator().manual_seed(tokens)).to(DEVICE)
    got = kernels.matmul(x, blocks, qtype)
    assert got.shape == (tokens, ROWS) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), reference_product(x, blocks, qtype), atol=1e-4, rtol=1e-4)


def test_half_precision_activations_give_their_dtype():
    blocks = blocks_of(T.Q4_K, ROWS, 256, 0)
    x = torch.randn(2, 256, generator=torch.Generator().manual_seed(0)).to(DEVICE, torch.bfloat16)
    got = kernels.matmul(x, blocks, T.Q4_K)
    assert got.dtype == torch.bfloat16
    # float32 accumulation, rounded once: within a bf16 ulp of the exact product of the bf16 inputs
    torch.testing.assert_close(got.double(), reference_product(x, blocks, T.Q4_K), atol=2e-2, rtol=8e-3)


def fused_layer(parts: list[tuple[T, int]], features: int) -> tuple[nn.Module, GGUFMethod]:
    """A merged layer whose parts are ``(type, rows)``, loaded through the method's weight loaders."""
    method, layer = GGUFMethod({"blocks": "ggml"}, "merged_proj"), nn.Module()
    method.create_weights(layer, features, [rows for _, rows in parts], torch.float32, None)
    for shard_id, (qtype, rows) in enumerate(parts):
        layer.qweight.weight_loader(layer.qweight, blocks_of(qtype, rows, features, rows).cpu(), shard_id)
        layer.qweight_type.weight_loader(layer.qweight_type, torch.tensor([int(qtype)]), shard_id)
    method.process_weights_after_loading(layer)
    layer.qweight.data = layer.qweight.data.to(DEVICE)
    return layer, method


@pytest.mark.parametrize("leading", [(1,), (2, 3), (11,)], ids=str)
def test_kernel_product_of_a_mixed_type_fused_layer(leading):
    """Two Q4_K parts (one run), a Q6_K part, an F16 part: each run through its kernel or a float
    matmul, concatenated in output order, plus the bias."""
    features = 256
    layer, method = fused_layer([(T.Q4_K, 4), (T.Q4_K, 3), (T.Q6_K, 2), (T.F16, 2)], features)
    assert [segment[:2] for segment in method.segments] == [(T.Q4_K, 7), (T.Q6_K, 2), (T.F16, 2)]
    x = torch.randn(*leading, features, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    bias = torch.randn(11, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    got = method.kernel_product(layer, x, bias)
    want = x.double() @ method.dequantized_weight(layer).cpu().double().T.to(DEVICE) + bias.double()
    assert got.shape == (*leading, 11)
    torch.testing.assert_close(got.double(), want, atol=1e-4, rtol=1e-4)

"""The block-wise FP8 kernels (``plugins/quant/fp8/block_gemm.py``) against plain torch.

On CPU they run in Triton's interpreter (``TRITON_INTERPRET=1``, set by conftest.py), which
stores, loads and multiplies ``tl.float8e4nv`` tiles as e4m3; its own float32 to e4m3 conversion
is not used by the kernels (see block_gemm.py). Shapes are tiny and tiles 16 wide: weights whose
rows and columns end in partial blocks, token counts that are not a multiple of a tile. The
reference: torch's e4m3 conversion for the quantized activations, and float64 products of the
dequantized activations and weights (the float path's numbers) for the GEMM. With a GPU the same
tests run the compiled kernels on CUDA tensors, and one more compares the fp8 method's GPU path
with its CPU path at a real model's shapes.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")  # in the test extra; absent only outside CI
from sglang_plugins.quant.fp8 import block_gemm  # noqa: E402
from sglang_plugins.quant.fp8 import method as fp8_method  # noqa: E402
from test_quant_fp8 import BLOCK_CONFIG, E4M3, E4M3_MAX, block_dequantized, fp8_block_weight  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cuda" and torch.cuda.get_device_capability() < (8, 9):
    pytest.skip("the e4m3 kernels need a GPU with FP8 (compute capability 8.9 or later)", allow_module_level=True)
SMALL_TILES = dict(BLOCK_M=16, BLOCK_N=16, num_warps=4, num_stages=2)
# float32 against float64 (the e4m3 products are exact; sums of 16 and the scaling round in
# float32); 16-bit: the result rounded once (to nearest on a GPU; the interpreter truncates).
TOLERANCE = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=2e-2, rtol=1e-2),
             torch.float16: dict(atol=2e-3, rtol=2e-3)}


def grouped_reference(x: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each token's ``group``-wide slices in e4m3 by torch's conversion, scaled by their largest
    magnitude / 448 (an all-zero slice by 1e-12), and the scales."""
    tokens, features = x.shape
    groups = -(-features // group)
    q = torch.empty(tokens, features, dtype=E4M3)
    scale = torch.empty(tokens, groups)
    for g in range(groups):
        part = x[:, g * group:(g + 1) * group].float()
        scale[:, g] = part.abs().amax(dim=1).clamp(min=1e-12 * E4M3_MAX) / E4M3_MAX
        q[:, g * group:(g + 1) * group] = (part / scale[:, g:g + 1]).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3)
    return q, scale


def assert_same_e4m3(got: torch.Tensor, expected: torch.Tensor) -> None:
    assert got.dtype == E4M3
    mismatched = got.cpu().view(torch.uint8) != expected.view(torch.uint8)
    assert not mismatched.any(), f"{int(mismatched.sum())} values differ, first at {mismatched.nonzero()[0].tolist()}"


def nan_padded(t: torch.Tensor) -> torch.Tensor:
    """``t`` (2-d, on ``DEVICE``) as the first columns of a wider tensor whose other columns hold
    NaN: its rows are strided, and a read past a row's end would put NaN in the result. (Triton's
    interpreter reads e4m3's NaN as 480: there a GEMM operand read past K meets the other's masked
    zeros unseen, and only the GPU run catches one missing K mask.)"""
    wide = torch.empty(t.shape[0], t.shape[1] + 16, dtype=t.dtype, device=t.device)
    if t.dtype == E4M3:
        wide.view(torch.uint8).fill_(0x7F)  # e4m3fn's NaN
    else:
        wide.fill_(float("nan"))
    wide[:, :t.shape[1]] = t
    return wide[:, :t.shape[1]]


def every_rounding_case() -> torch.Tensor:
    """Every finite e4m3 value, each midpoint between neighbours (a tie: to the even one) and the
    float32 values either side of it."""
    codes = torch.arange(0, 0x7F, dtype=torch.uint8).view(E4M3).float()  # 0 .. 448, no NaN
    middles = (codes[1:] + codes[:-1]) / 2
    beside = torch.cat([torch.nextafter(middles, torch.zeros(())), torch.nextafter(middles, torch.full((), 1e9))])
    values = torch.cat([codes, middles, beside])
    return torch.cat([values, -values])


def test_activations_round_to_nearest_e4m3_ties_to_even() -> None:
    """Groups of 16 whose largest magnitude is 448 have scale 1: the kernel's e4m3 values are
    torch's conversion of the inputs themselves, over every rounding case, subnormals included."""
    values = every_rounding_case()
    rows = torch.nn.functional.pad(values, (0, -values.numel() % 15)).view(-1, 15)
    x = torch.cat([torch.full((rows.shape[0], 1), E4M3_MAX), rows], dim=1).reshape(-1, 32)
    q, scale = block_gemm.quantize_groups(x.to(DEVICE), 16)
    assert torch.all(scale == 1.0)
    assert_same_e4m3(q, x.to(E4M3))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("tokens,features,group", [(5, 40, 16), (3, 64, 32), (1, 16, 16), (2, 1100, 16)])
def test_quantize_groups_matches_torch(dtype: torch.dtype, tokens: int, features: int, group: int) -> None:
    """Magnitudes spread over 2^-12 .. 2^6 (so groups hold subnormal e4m3 values), a partial last
    group (40 = 16 + 16 + 8), an all-zero token and one zero group; rows strided, NaN past their ends;
    69 groups of 16: two programs a token, the second with 5 groups of its 64."""
    gen = torch.Generator().manual_seed(features + tokens)
    x = torch.randn(tokens, features, generator=gen) * torch.exp2(torch.randint(-12, 7, (tokens, features),
                                                                                   generator=gen).float())
    x[0, :group] = 0
    if tokens > 2:
        x[2] = 0
    x = x.to(dtype)
    q, scale = block_gemm.quantize_groups(nan_padded(x.to(DEVICE)), group)
    expected_q, expected_scale = grouped_reference(x, group)
    assert scale.dtype == torch.float32 and scale.shape == expected_scale.shape
    torch.testing.assert_close(scale.cpu(), expected_scale, rtol=0, atol=0)
    assert_same_e4m3(q, expected_q)


def random_block_weight(out: int, inputs: int, block: tuple[int, int], seed: int) -> tuple[torch.Tensor, ...]:
    """An e4m3 weight and its ``weight_scale_inv`` as a checkpoint ships them, blocks of unequal scale."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inputs, generator=gen) * torch.rand(out, 1, generator=gen) * 4
    return fp8_block_weight(w, block)


def float64_product(q: torch.Tensor, scale: torch.Tensor, weight: torch.Tensor, weight_scale_inv: torch.Tensor,
                    block: tuple[int, int], bias: torch.Tensor | None) -> torch.Tensor:
    """Dequantized activations times dequantized weights (transposed) plus bias, in float64."""
    features = q.shape[1]
    activations = q.double() * scale.double().repeat_interleave(block[1], dim=1)[:, :features]
    y = activations @ block_dequantized(weight, weight_scale_inv, block).double().T
    return y + bias.double() if bias is not None else y


@pytest.mark.parametrize("tokens,out,inputs,block,dtype,with_bias", [
    (5, 36, 72, (16, 32), torch.float32, True),  # partial last row and column blocks; 3 tiles of N
    (33, 40, 80, (24, 32), torch.float32, False),  # 3 tiles of M; 24-row blocks
    (17, 50, 72, (32, 32), torch.bfloat16, True),  # blocks wider than a tile of N; K ends in 8 of 32
    (1, 24, 40, (16, 32), torch.float16, True),  # one token
])
def test_block_gemm_matches_float64(tokens: int, out: int, inputs: int, block: tuple[int, int], dtype: torch.dtype,
                                    with_bias: bool) -> None:
    """Every operand's rows strided with NaN past their ends: the kernel reads within them only."""
    weight, weight_scale_inv = random_block_weight(out, inputs, block, seed=tokens + out)
    gen = torch.Generator().manual_seed(inputs)
    x = torch.randn(tokens, inputs, generator=gen) * torch.rand(1, inputs, generator=gen) * 3
    q, scale = grouped_reference(x, block[1])
    bias = torch.randn(out, generator=gen).to(dtype) if with_bias else None
    operands = [nan_padded(t.to(DEVICE)) for t in (q, scale, weight, weight_scale_inv)]
    got = block_gemm.block_gemm(*operands, block, bias.to(DEVICE) if with_bias else None, dtype, config=SMALL_TILES)
    assert got.dtype == dtype and got.shape == (tokens, out)
    expected = float64_product(q, scale, weight, weight_scale_inv, block, bias)
    torch.testing.assert_close(got.cpu().double(), expected, **TOLERANCE[dtype])


def test_block_fp8_linear_default_tiles_and_leading_dims() -> None:
    """The whole path as the fp8 method runs it: [2, 3, K] input quantized by the kernel, the tiles
    ``default_config`` chooses, bias; against the float path's numbers in float64. The weight is
    stored column-major (its K not contiguous): the launcher makes it row-major."""
    block = (16, 32)
    weight, weight_scale_inv = random_block_weight(40, 56, block, seed=3)
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(2, 3, 56, generator=gen)
    bias = torch.randn(40, generator=gen)
    column_major = weight.to(DEVICE).t().contiguous().t()
    got = block_gemm.block_fp8_linear(x.to(DEVICE), column_major, weight_scale_inv.to(DEVICE), block, bias.to(DEVICE))
    assert got.shape == (2, 3, 40)
    q, scale = grouped_reference(x.reshape(6, 56), block[1])
    expected = float64_product(q, scale, weight, weight_scale_inv, block, bias).view(2, 3, 40)
    torch.testing.assert_close(got.cpu().double(), expected, **TOLERANCE[torch.float32])


def block_linear_layer(out: int, inputs: int, block: tuple[int, int], seed: int,
                       dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """A column-parallel fp8 block-wise layer with a ``dtype`` bias, loaded through its weight loaders."""
    from sglang_core.layers.parallel import ColumnParallelLinear

    weight, weight_scale_inv = random_block_weight(out, inputs, block, seed)
    layer = ColumnParallelLinear(inputs, out, bias=True, params_dtype=dtype, quant_method=fp8_method.Fp8LinearMethod(
        {**BLOCK_CONFIG, "weight_block_size": list(block)}, "model.layers.0.mlp.gate_up_proj"))
    layer.weight.weight_loader(layer.weight, weight)
    layer.weight_scale_inv.weight_loader(layer.weight_scale_inv, weight_scale_inv)
    layer.bias.data.normal_(generator=torch.Generator().manual_seed(seed))
    layer.quant_method.process_weights_after_loading(layer)
    return layer


def test_fp8_method_takes_the_kernels_where_they_fit(monkeypatch) -> None:
    """With the kernels taken (on CPU: in the interpreter), the block method's apply computes through the
    kernels with the layer's weight, block scales, block size and bias."""
    block = (32, 32)
    layer = block_linear_layer(40, 48, block, seed=5).to(DEVICE)
    calls = []
    monkeypatch.setattr(fp8_method, "_block_kernels_fit", lambda x, b: calls.append(b) or True)
    x = torch.randn(7, 48, generator=torch.Generator().manual_seed(6))
    got = layer(x.to(DEVICE))
    assert calls == [block]
    q, scale = grouped_reference(x, block[1])
    expected = float64_product(q, scale, layer.weight.cpu(), layer.weight_scale_inv.cpu(), block, layer.bias.cpu())
    torch.testing.assert_close(got.cpu().double(), expected, **TOLERANCE[torch.float32])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("tokens", [1, 64, 300])
@pytest.mark.parametrize("out,inputs", [(576, 2048), (2048, 10944)])
def test_fp8_block_method_on_gpu_matches_cpu_path(tokens: int, out: int, inputs: int) -> None:
    """DeepSeek-V2-Lite's kv_a_proj_with_mqa (576 rows: 4.5 blocks of 128) and dense down_proj
    (10944 inputs: 85.5 blocks) in bfloat16 with 128 x 128 blocks: the fp8 method on CUDA (the
    kernels, whichever tiles ``default_config`` picks) against float64 products of the dequantized
    activations and weights, and against the same layer's CPU path."""
    block = (128, 128)
    assert block_gemm.fits(torch.empty(1, device="cuda"), block)
    layer = block_linear_layer(out, inputs, block, seed=tokens, dtype=torch.bfloat16)
    x = torch.randn(tokens, inputs, generator=torch.Generator().manual_seed(tokens)).to(torch.bfloat16)
    cpu = layer(x)
    q, scale = grouped_reference(x, block[1])
    expected = float64_product(q, scale, layer.weight, layer.weight_scale_inv, block, layer.bias)
    gpu = layer.to("cuda")(x.cuda()).cpu().double()
    size = expected.abs().max().item()
    # The kernel: float32 sums rounded once to bfloat16. The CPU path also rounds the dequantized
    # activations and weights to bfloat16 first, which moves outputs by ~2^-9 of their terms' sizes.
    torch.testing.assert_close(gpu, expected, rtol=8e-3, atol=1e-3 * size)
    torch.testing.assert_close(gpu, cpu.double(), rtol=1e-2, atol=1e-2 * size)


def test_block_gemm_refuses_block_columns_below_an_e4m3_dot():
    """Compiled, an e4m3 ``tl.dot`` needs a K tile of 32 or more: narrower blocks are refused by
    name (and ``fits`` sends them to the float path)."""
    weight, weight_scale_inv = random_block_weight(16, 32, (16, 16), seed=1)
    q, scale = grouped_reference(torch.randn(2, 32), 16)
    with pytest.raises(ValueError, match="block: columns 16"):
        block_gemm.block_gemm(q, scale, weight, weight_scale_inv, (16, 16), None, torch.float32)

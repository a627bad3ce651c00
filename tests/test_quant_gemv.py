"""The one-row (batch-1 decode) kernels for quantized weights against float64 products of the
formats' published dequantization: ``plugins/quant/fp8/gemv.py`` (e4m3 weights with a scale per
output row; the input rounded to e4m3 by its own or a static scale, as torch's e4m3 conversion
rounds it) and ``plugins/quant/int_gemv.py`` (AWQ and GPTQ packed integers). Shapes are tiny and
tiles small, so the kernels run in Triton's interpreter on the CPU (``TRITON_INTERPRET=1``, set by
conftest.py) over ragged last tiles: N and K are not multiples of them. The methods' dispatch is
checked too: one row takes the GEMV, more rows the old path.
"""

from __future__ import annotations

from unittest import mock

import pytest
import torch

pytest.importorskip("triton")  # in the test extra; absent only outside CI
from sglang_core.layers.parallel import ColumnParallelLinear  # noqa: E402
from sglang_plugins.quant import int_gemv, int_matmul, packing  # noqa: E402
from sglang_plugins.quant.fp8 import gemv as fp8_gemv_module  # noqa: E402
from sglang_plugins.quant.fp8.method import Fp8LinearMethod  # noqa: E402
from test_int_matmul import awq, gptq, random_layer  # noqa: E402
from test_quant_compressed_tensors import int_args  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
E4M3 = torch.float8_e4m3fn
E4M3_MAX = 448.0
FP8_TILES = dict(BLOCK_N=8, BLOCK_K=64, num_warps=4, num_stages=1)


def e4m3_input(x: torch.Tensor, activations: str, static_scale: float) -> torch.Tensor:
    """What an FP8 matmul multiplies of ``x`` (float64): ``x / scale`` rounded by torch's e4m3
    conversion (to nearest, ties to even, saturated at 448), times the scale; the dynamic scale is
    the row's largest magnitude over 448 in float32, as compressed-tensors and torch compute it."""
    if activations == "none":
        return x.double()
    x32 = x.float()
    scale = x32.abs().max() / E4M3_MAX if activations == "dynamic" else torch.tensor(static_scale)
    return (x32 / scale).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3).double() * scale.double()


def random_fp8_weight(n: int, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """e4m3 codes ``[n, k]`` and float32 scales ``[n]`` of very different sizes per output row."""
    gen = torch.Generator().manual_seed(seed)
    codes = (torch.randn(n, k, generator=gen) * 100).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3)
    return codes, torch.rand(n, generator=gen) * 0.02 + 1e-3


@pytest.mark.parametrize("activations,dtype,with_bias,quantize_once", [
    ("dynamic", torch.float32, True, False), ("dynamic", torch.bfloat16, False, False),
    ("static", torch.float32, True, False), ("none", torch.bfloat16, True, False),
    ("dynamic", torch.float32, False, True), ("static", torch.bfloat16, True, True)])
def test_fp8_gemv(activations: str, dtype: torch.dtype, with_bias: bool, quantize_once: bool, monkeypatch) -> None:
    """Every program rounding the row itself, or (``quantize_once``) the one-program kernel before
    the GEMV rounding it in tiles of 128 (K spans three, the last ragged)."""
    monkeypatch.setattr(fp8_gemv_module, "ROW_TILE", 128)
    n, k = 37, 300  # neither a multiple of the 8 x 64 tile
    codes, scale = random_fp8_weight(n, k, seed=n + k)
    torch.manual_seed(0)
    x = (torch.randn(1, k) * 3).to(dtype)
    bias = torch.randn(n).to(dtype) if with_bias else None
    static_scale = 0.01  # clips the input's largest values: saturation is part of the format
    weight = codes.double() * scale.double()[:, None]
    expected = e4m3_input(x, activations, static_scale) @ weight.T + (bias.double() if with_bias else 0)
    assert fp8_gemv_module.fits(x, codes)
    got = fp8_gemv_module.fp8_gemv(x.to(DEVICE), codes.to(DEVICE), scale.to(DEVICE), activations,
                                   torch.tensor(static_scale, device=DEVICE), None if bias is None else bias.to(DEVICE),
                                   config=dict(FP8_TILES, QUANTIZE_ONCE=quantize_once))
    assert got.dtype == dtype and got.shape == (1, n)
    # float32: the order of float32 sums; bfloat16: one rounding of the result.
    tolerance = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(got.cpu().double(), expected, rtol=tolerance,
                               atol=tolerance * expected.abs().max().item())


def test_fp8_gemv_default_tiles_and_zero_row() -> None:
    """The default launch (tiles wider than K here), and an all-zero row: scale floored, no NaNs."""
    codes, scale = random_fp8_weight(50, 96, seed=1)
    x = torch.randn(1, 1, 96, dtype=torch.bfloat16)
    weight = codes.double() * scale.double()[:, None]
    got = fp8_gemv_module.fp8_gemv(x.to(DEVICE), codes.to(DEVICE), scale.to(DEVICE), "dynamic")
    assert got.shape == (1, 1, 50)
    torch.testing.assert_close(got[0].cpu().double(), e4m3_input(x[0], "dynamic", 0) @ weight.T, rtol=1e-2, atol=1e-2)
    zeros = fp8_gemv_module.fp8_gemv(torch.zeros_like(x).to(DEVICE), codes.to(DEVICE), scale.to(DEVICE), "dynamic")
    assert torch.equal(zeros.cpu(), torch.zeros(1, 1, 50, dtype=torch.bfloat16))


def test_fp8_gemv_launch_settings_by_shape(monkeypatch) -> None:
    """A shape listed in ``LAUNCH_TABLE`` takes its settings (missing fields from ``LAUNCH``), others
    ``LAUNCH``; a field the kernel does not know is refused by name."""
    monkeypatch.setattr(fp8_gemv_module, "LAUNCH_TABLE", {(50, 96): dict(BLOCK_N=2, QUANTIZE_ONCE=True)})
    assert fp8_gemv_module.launch_settings(50, 96) == dict(fp8_gemv_module.LAUNCH, BLOCK_N=2, QUANTIZE_ONCE=True)
    assert fp8_gemv_module.launch_settings(50, 128) == fp8_gemv_module.LAUNCH
    with pytest.raises(ValueError, match="SPLIT_K"):
        fp8_gemv_module.launch_settings(50, 96, dict(SPLIT_K=2))


def test_fp8_gemv_declines_what_it_does_not_serve() -> None:
    codes, _ = random_fp8_weight(16, 32, seed=2)
    assert not fp8_gemv_module.fits(torch.randn(2, 32), codes)
    assert not fp8_gemv_module.fits(torch.randn(1, 32), codes.float())
    assert not fp8_gemv_module.fits(torch.randn(1, 32), codes.T.contiguous().T)
    assert not fp8_gemv_module.fits(torch.randn(1, 16), codes)
    assert not fp8_gemv_module.fits(torch.randn(1, 30), codes[:, :30])  # not whole int32 words
    with pytest.raises(ValueError, match="activations"):
        fp8_gemv_module.fp8_gemv(torch.randn(1, 32), codes, torch.ones(16), "token")


@pytest.mark.parametrize("rows", [1, 3])
def test_fp8_layer_takes_the_gemv_for_one_row(rows: int) -> None:
    """``--quantization fp8`` on a float layer (per-channel e4m3 at load, dynamic per-token inputs)
    where the fused kernels apply: one row through ``fp8_gemv``, more rows the FP8 matmul or its
    dequantizing stand-in; both the format's numbers."""
    torch.manual_seed(0)
    layer = ColumnParallelLinear(96, 40, bias=True, quant_method=Fp8LinearMethod({"quant_method": "fp8"}, "proj"))
    weight = torch.randn(40, 96)
    layer.weight.weight_loader(layer.weight, weight)
    layer.bias.data.copy_(torch.randn(40))
    layer.quant_method.process_weights_after_loading(layer)
    layer.to(DEVICE)
    x = torch.randn(rows, 96)
    channel_scale = weight.abs().amax(dim=1) / E4M3_MAX
    dequantized = (weight / channel_scale[:, None]).to(E4M3).double() * channel_scale.double()[:, None]
    expected = torch.stack([e4m3_input(row, "dynamic", 0) for row in x]) @ dequantized.T + layer.bias.double().cpu()
    spy = mock.Mock(wraps=fp8_gemv_module.fp8_gemv)
    with mock.patch("sglang_plugins.quant.fp8.method.use_fused", return_value=True), \
            mock.patch.object(fp8_gemv_module, "fp8_gemv", spy):
        got = layer(x.to(DEVICE)).cpu()
    assert spy.called == (rows == 1)
    rtol = 1e-5 if DEVICE == "cpu" else 2e-2  # on a GPU, several rows take _scaled_mm's bfloat16 output
    torch.testing.assert_close(got.double(), expected, rtol=rtol, atol=rtol * expected.abs().max().item())


INT_TILES = dict(BLOCK_N=16, BLOCK_K=32, num_warps=4, num_stages=1)
# (name, format, inputs, outputs, K shares): the packers of tests/test_int_matmul.py (checked against
# the formats' unpacking rules there); outputs not a multiple of 16, inputs of 32 only where a group
# needs it. GPTQ's zero points are stored minus one (v1) or as they are (v2).
INT_CASES = [
    ("gptq-4bit-asym-g16", gptq(4, 16, sym=False, desc_act=False), 96, 40, 2),  # the K step shrunk to a group
    ("gptq-4bit-sym-g64", gptq(4, 64, sym=True, desc_act=False), 128, 24, 3),  # two K steps a group
    ("gptq-8bit-asym-v2-channel", gptq(8, -1, sym=False, desc_act=False, checkpoint_format="gptq_v2"), 72, 40, 1),
    ("awq-g32", awq(32), 96, 40, 2),
    ("awq-g64", awq(64), 64, 56, 1),
    ("awq-g128", awq(128), 256, 24, 3),  # four K steps a group, shares of three steps
    ("awq-channel", awq(-1), 96, 40, 2),  # one group of all input features
    ("ct-w4-sym-g32", int_args(4, "group", group_size=32), 64, 40, 2),  # [out, in] words, no zero points
    ("ct-w4-asym-channel", int_args(4, "channel", symmetric=False), 72, 40, 2),  # [out / 8, 1] zero points
]


@pytest.mark.parametrize("name,fmt,inputs,outputs,split", INT_CASES, ids=[case[0] for case in INT_CASES])
def test_int_gemv_matches_float64_product(name, fmt, inputs, outputs, split):
    layer, weight = random_layer(fmt, inputs, outputs, seed=len(name))
    gen = torch.Generator().manual_seed(inputs)
    x = torch.randn(1, inputs, generator=gen).to(DEVICE)
    bias = torch.randn(outputs, generator=gen).to(DEVICE)
    packed = layer.quant_method.int_weight(layer)
    assert int_gemv.fits(x, packed, INT_TILES)
    expected = x.double() @ weight.to(DEVICE) + bias.double()
    for _ in range(2):  # the split shares' arrival counters are left ready for the next launch
        got = int_gemv.int_gemv(x, packed, bias, config=dict(INT_TILES, SPLIT_K=split))
        assert got.dtype == torch.float32 and got.shape == (1, outputs)
        torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("table,programs,grid", [(False, 1, (1, 1)), (True, 1, (3, 1)), (False, 8, (1, 2))],
                         ids=["default", "table", "auto-split"])
def test_int_gemv_16bit_default_launch(table, programs, grid, monkeypatch):
    """bfloat16, the default launch (its tile wider than this layer) or the table's entry for the
    layout and shape, and the split it chooses: with a device that wants 8 programs, K is split in
    its two whole groups (two shares, the second arriving one summing both)."""
    layer, weight = random_layer(awq(32), 64, 40, seed=3)
    packed = layer.quant_method.int_weight(layer)
    monkeypatch.setattr(int_gemv, "programs_to_fill", lambda device: programs)
    launches = []
    kernel = int_gemv._int_gemv_kernel
    monkeypatch.setattr(int_gemv, "_int_gemv_kernel", mock.MagicMock(
        __getitem__=lambda self, grid: launches.append(grid) or kernel[grid]))
    if table:
        monkeypatch.setattr(int_gemv, "LAUNCH_TABLE", {(40, 64): dict(BLOCK_N=16, BLOCK_K=16)})
        assert int_gemv.launch_settings(packed) == dict(int_gemv.LAUNCH, BLOCK_N=16, BLOCK_K=16)
    x = torch.randn(1, 1, 64, generator=torch.Generator().manual_seed(3)).to(DEVICE, torch.bfloat16)
    got = int_gemv.int_gemv(x, packed)
    assert launches == [grid]  # column tiles (40 outputs in tiles of 16 from the table), K shares
    assert got.dtype == torch.bfloat16 and got.shape == (1, 1, 40)
    torch.testing.assert_close(got.double(), x.double() @ weight.to(DEVICE), rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("fmt,rows,kernel", [
    (awq(32), 1, "int_gemv"), (awq(32), 3, "int_matmul"),
    (gptq(4, 32, sym=False, desc_act=True), 1, "int_matmul"),  # activation order: the general kernel
], ids=["awq-one-row", "awq-three-rows", "gptq-actorder-one-row"])
def test_packed_layer_dispatch(fmt, rows, kernel, monkeypatch):
    """Where the fused kernels apply, a packed layer's one-row product takes ``int_gemv`` and
    larger batches (or act-order groups) ``int_matmul``; either gives the format's numbers."""
    layer, weight = random_layer(fmt, 64, 40, seed=4)
    x = torch.randn(rows, 64, generator=torch.Generator().manual_seed(rows)).to(DEVICE)
    calls = []
    for module, name in ((int_gemv, "int_gemv"), (int_matmul, "int_matmul")):
        traced = getattr(module, name)
        monkeypatch.setattr(module, name,
                            lambda *a, traced=traced, name=name, **k: calls.append(name) or traced(*a, **k))
    monkeypatch.setattr(packing, "use_fused", lambda x: True)
    got = layer(x)
    assert calls == [kernel]
    torch.testing.assert_close(got.double(), x.double() @ weight.to(DEVICE), rtol=1e-5, atol=1e-5)


def test_int_gemv_declines_what_it_does_not_serve():
    layer, _ = random_layer(gptq(4, 32, sym=False, desc_act=True), 64, 40, seed=0)
    assert not int_gemv.fits(torch.randn(1, 64), layer.quant_method.int_weight(layer))  # g_idx
    layer, _ = random_layer(awq(32), 96, 40, seed=0)
    packed = layer.quant_method.int_weight(layer)
    assert not int_gemv.fits(torch.randn(2, 96), packed)
    assert not int_gemv.fits(torch.randn(1, 64), packed)
    assert not int_gemv.fits(torch.randn(1, 96), packed, dict(INT_TILES, BLOCK_K=24))  # 24 and 32 do not nest
    with pytest.raises(ValueError, match="BLOCK_K 24"):
        int_gemv.int_gemv(torch.randn(1, 96), packed, config=dict(INT_TILES, BLOCK_K=24))


def test_awq_model_decodes_through_int_gemv(tmp_path, monkeypatch):
    """A tiny AWQ Llama served in float32 with the packed layers using the CUDA kernels (on the CPU
    made to, in Triton's interpreter; with a GPU on CUDA, CUDA graphs included): its decode steps
    go through ``int_gemv`` and the greedy output equals HF float32's on the dequantised weights.
    (Biases: the kernel tests above.)"""
    from reference import hf_greedy
    from sglang_core.engine import Engine
    from test_quant_awq_gptq import GREEDY, quantized_model

    calls = []
    traced = int_gemv.int_gemv
    monkeypatch.setattr(int_gemv, "int_gemv", lambda *a, **k: calls.append(1) or traced(*a, **k))
    monkeypatch.setattr(packing, "use_fused", lambda x: True)
    hf = quantized_model(tmp_path, awq(64), seed=9)
    prompt = [5, 17, 99, 3, 250, 41]
    expected = hf_greedy(hf, prompt, 6)
    settings = {} if DEVICE == "cpu" else dict(device="cuda", dtype="float32", attention_backend="triton")
    with Engine(str(tmp_path), **settings) as engine:
        out = engine.generate(input_ids=prompt, sampling_params={**GREEDY, "max_new_tokens": 6})
    assert out["output_ids"] == expected
    assert calls, "the decode steps' products went through int_gemv"

"""The packed-integer matmul kernel (``plugins/quant/int_matmul.py``) against float64 products with
the weights the formats' published rules give.

Each case packs random integers, zero points and scales as its checkpoint format stores them
(the packers of tests/test_quant_awq_gptq.py and tests/test_quant_compressed_tensors.py, checked
there against hand-computed words), loads them into a layer through its method's weight loaders,
and runs the kernel on the layer's tensors as the method hands them over (``int_weight``, what its
CUDA forward uses). On the CPU the kernel runs in Triton's interpreter (``TRITON_INTERPRET=1``, set
by conftest.py), so shapes are tiny and tiles 16 wide: output features not a multiple of a tile,
ragged row counts, K split over programs. A tiny GPTQ model is also served through the kernel
(on the CPU, made to use it), and with a GPU tiny GPTQ and AWQ models are served on CUDA, where
the methods choose it; each against HF float32 on the dequantised weights.
"""

from __future__ import annotations

import os
import random

import pytest
import torch

pytest.importorskip("triton")  # in the test extra; absent only outside CI
from reference import hf_greedy  # noqa: E402
from sglang_core.engine import Engine  # noqa: E402
from sglang_core.layers.parallel import ColumnParallelLinear, RowParallelLinear, TPGroup  # noqa: E402
from sglang_core.layers.quant import QuantMethod  # noqa: E402
from sglang_plugins.quant import int_matmul as kernel  # noqa: E402
from sglang_plugins.quant import packing  # noqa: E402
from sglang_plugins.quant.awq.method import AWQMethod  # noqa: E402
from sglang_plugins.quant.compressed_tensors.packed import PackedIntMethod  # noqa: E402
from sglang_plugins.quant.gptq.method import GPTQMethod  # noqa: E402
from test_quant_awq_gptq import GREEDY, Quantized, group_index, quantized_model  # noqa: E402
from test_quant_compressed_tensors import input_groups, int_args, pack_quantized  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
INTERPRETED = os.environ.get("TRITON_INTERPRET", "").lower() in ("1", "true", "on")  # conftest.py, without a GPU
TILES = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, num_warps=4, num_stages=1)


def gptq(bits: int, group_size: int, sym: bool, desc_act: bool, checkpoint_format: str = "gptq") -> dict:
    return {"quant_method": "gptq", "bits": bits, "group_size": group_size, "sym": sym, "desc_act": desc_act,
            "checkpoint_format": checkpoint_format}


def awq(group_size: int) -> dict:
    return {"quant_method": "awq", "bits": 4, "group_size": group_size, "zero_point": True, "version": "gemm"}


def method_for(fmt: dict) -> QuantMethod:
    """The method of a GPTQ or AWQ ``quantization_config``, or of compressed-tensors weight arguments."""
    prefix = "model.layers.0.mlp.up_proj"
    if "quant_method" not in fmt:
        return PackedIntMethod(fmt, None, prefix)
    return (AWQMethod if fmt["quant_method"] == "awq" else GPTQMethod)(fmt, prefix)


def packed_weight(fmt: dict, inputs: int, outputs: int, seed: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """A random weight's checkpoint tensors in ``fmt``'s layout, and the weight ``[in, out]`` in float64."""
    gen = torch.Generator().manual_seed(seed)
    if "quant_method" not in fmt:
        g_idx = input_groups(inputs, fmt.get("group_size"), fmt.get("actorder") == "group", seed)
        tensors, dequantized = pack_quantized(torch.randn(outputs, inputs, generator=gen), fmt, g_idx)
        return tensors, dequantized.double().T
    quant = Quantized(fmt, inputs, outputs, gen, group_index(fmt, inputs, gen))
    return quant.tensors, (quant.values - quant.zeros[quant.g_idx]).double() * quant.scales.double()[quant.g_idx]


def loaded_layer(fmt: dict, tensors: dict[str, torch.Tensor], inputs: int, outputs: int,
                 tp: TPGroup | None = None) -> torch.nn.Module:
    """A column-parallel layer (or, with ``tp``, that rank's row-parallel layer) loaded with ``tensors``."""
    with torch.device(DEVICE):
        if tp is None:
            layer = ColumnParallelLinear(inputs, outputs, quant_method=method_for(fmt))
        else:
            layer = RowParallelLinear(inputs, outputs, tp=tp, quant_method=method_for(fmt))
    for name, tensor in tensors.items():
        param = getattr(layer, name)
        param.weight_loader(param, tensor.to(DEVICE))
    layer.quant_method.process_weights_after_loading(layer)
    return layer


def random_layer(fmt: dict, inputs: int, outputs: int, seed: int) -> tuple[torch.nn.Module, torch.Tensor]:
    """A layer holding a random weight in ``fmt``'s layout, and that weight ``[in, out]`` in float64."""
    tensors, weight = packed_weight(fmt, inputs, outputs, seed)
    return loaded_layer(fmt, tensors, inputs, outputs), weight


# (name, format, inputs, outputs, rows, K split)
CASES = [
    ("gptq-4bit-sym-g32", gptq(4, 32, sym=True, desc_act=False), 64, 40, 5, 1),
    ("gptq-4bit-asym-actorder", gptq(4, 32, sym=False, desc_act=True), 96, 48, 19, 3),
    ("gptq-8bit-asym-v2-channel", gptq(8, -1, sym=False, desc_act=False, checkpoint_format="gptq_v2"), 64, 40, 1, 2),
    ("gptq-8bit-sym-actorder-g16", gptq(8, 16, sym=True, desc_act=True), 48, 24, 17, 1),
    ("awq-g32", awq(32), 64, 40, 19, 1),
    ("awq-g16", awq(16), 64, 24, 3, 4),
    ("awq-channel", awq(-1), 64, 40, 17, 2),
    ("ct-w4-sym-g16", int_args(4, "group", group_size=16), 64, 40, 5, 2),
    ("ct-w4-asym-actorder", int_args(4, "group", symmetric=False, group_size=32, actorder="group"), 64, 40, 19, 1),
    ("ct-w8-sym-channel", int_args(8, "channel"), 48, 40, 1, 1),
    ("ct-w8-asym-actorder", int_args(8, "group", symmetric=False, group_size=16, actorder="group"), 48, 24, 17, 3),
    ("ct-w4-asym-channel", int_args(4, "channel", symmetric=False), 32, 40, 7, 1),
]


@pytest.mark.parametrize("name,fmt,inputs,outputs,rows,split", CASES, ids=[case[0] for case in CASES])
def test_kernel_matches_float64_product(name, fmt, inputs, outputs, rows, split):
    layer, weight = random_layer(fmt, inputs, outputs, seed=len(name))
    x = torch.randn(rows, inputs, generator=torch.Generator().manual_seed(rows)).to(DEVICE)
    got = kernel.int_matmul(x, layer.quant_method.int_weight(layer), config=dict(TILES, SPLIT_K=split))
    expected = x.double() @ weight.to(DEVICE)
    assert got.dtype == torch.float32 and got.shape == (rows, outputs)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype,fmt,inputs", [
    (torch.float16, gptq(4, 32, sym=False, desc_act=False), 64),  # groups narrower than the launch's K tile
    (torch.bfloat16, awq(128), 128),  # one group per K tile
    (torch.float16, gptq(8, 32, sym=False, desc_act=True), 64),
], ids=["fp16-gptq-g32", "bf16-awq-g128", "fp16-gptq-8bit-actorder"])
def test_16bit_rows_with_a_bias(dtype, fmt, inputs):
    """16-bit inputs of any leading shape, the launch the kernel picks itself, a bias added; the
    weights here are exact in 16 bits, so the product differs only by the output's rounding."""
    layer, weight = random_layer(fmt, inputs, 40, seed=7)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, inputs, generator=gen).to(DEVICE, dtype)
    bias = torch.randn(40, generator=gen).to(DEVICE, dtype)
    got = kernel.int_matmul(x, layer.quant_method.int_weight(layer), bias)
    expected = x.double() @ weight.to(DEVICE) + bias.double()
    assert got.dtype == dtype and got.shape == (2, 3, 40)
    tolerance = 1e-2 if dtype == torch.bfloat16 else 2e-3
    torch.testing.assert_close(got.double(), expected, rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("fmt", [gptq(4, 32, sym=False, desc_act=True),
                                 int_args(4, "group", symmetric=False, group_size=32, actorder="group")],
                         ids=["gptq-actorder", "ct-actorder"])
def test_row_parallel_ranks_with_act_order(fmt):
    """Under 2-way tensor parallelism a row-parallel rank holds half the input features but, in
    activation order, every group's scales and zero points: the ranks' products add up to the
    whole layer's."""
    inputs, outputs, tp = 128, 40, 2
    tensors, weight = packed_weight(fmt, inputs, outputs, seed=5)
    x = torch.randn(3, inputs, generator=torch.Generator().manual_seed(5)).to(DEVICE)
    total = 0
    for rank in range(tp):
        layer = loaded_layer(fmt, tensors, inputs, outputs, tp=TPGroup(group=None, rank=rank, size=tp))
        features = slice(rank * inputs // tp, (rank + 1) * inputs // tp)
        launch = dict(TILES, SPLIT_K=1)
        total = total + kernel.int_matmul(x[:, features], layer.quant_method.int_weight(layer), config=launch)
    torch.testing.assert_close(total.double(), x.double() @ weight.to(DEVICE), rtol=1e-5, atol=1e-5)


def test_launch_config_by_rows(monkeypatch):
    """Decode rows (up to GEMV_ROWS) share one program per column tile, larger batches tile M; K is
    split only while the tiles are fewer than the device wants programs, into no more shares than
    K tiles. (The numbers follow the module's launch settings: GEMV tiles 64 columns wide with K tiles
    of 128, GEMM tiles 64 x 128 with K tiles of 64.)"""
    monkeypatch.setattr(kernel, "programs_to_fill", lambda device: 264)
    cpu = torch.device("cpu")
    assert kernel.launch_config(16, 4096, 4096, cpu) == dict(kernel.GEMV_LAUNCH, SPLIT_K=5)  # 64 column tiles
    assert kernel.launch_config(1, 4096, 256, cpu)["SPLIT_K"] == 2  # only 2 K tiles of 128
    assert kernel.launch_config(17, 4096, 4096, cpu) == dict(kernel.GEMM_LAUNCH, SPLIT_K=9)  # 32 tiles
    assert kernel.launch_config(4096, 4096, 4096, cpu)["SPLIT_K"] == 1  # 2048 tiles


def test_wrong_input_width_is_an_error():
    layer, _ = random_layer(awq(32), 64, 40, seed=0)
    with pytest.raises(ValueError, match="64"):
        kernel.int_matmul(torch.zeros(2, 32, device=DEVICE), layer.quant_method.int_weight(layer))


ON_GPU = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
MODEL_CASES = [  # Qwen2's q/k/v have biases
    pytest.param("cpu", gptq(4, 32, sym=False, desc_act=True), "qwen2", id="cpu-gptq-actorder",
                 marks=pytest.mark.skipif(not INTERPRETED, reason="a compiled kernel takes no CPU tensors")),
    pytest.param("cuda", gptq(4, 32, sym=False, desc_act=True), "llama", id="gpu-gptq-actorder", marks=ON_GPU),
    pytest.param("cuda", awq(64), "qwen2", id="gpu-awq", marks=ON_GPU),
]


@pytest.mark.parametrize("device,fmt,family", MODEL_CASES)
def test_model_through_the_kernel(tmp_path, device, fmt, family, monkeypatch):
    """A tiny GPTQ / AWQ model served in float32 with every quantized projection computed by the
    kernel: greedy output equals HF float32's on the dequantised weights (what the dequantising path
    is tested to match, in tests/test_quant_awq_gptq.py). On CUDA the methods choose the kernel
    themselves; on the CPU they are made to, and it runs in Triton's interpreter."""
    calls = []
    traced = kernel.int_matmul
    monkeypatch.setattr(kernel, "int_matmul", lambda *a, **k: calls.append(1) or traced(*a, **k))
    if device == "cpu":
        monkeypatch.setattr(packing, "use_fused", lambda x: True)
    hf = quantized_model(tmp_path, fmt, seed=8, family=family)
    rng = random.Random(0)
    prompts = [[rng.randrange(3, 259) for _ in range(n)] for n in (5, 23)]
    expected = [hf_greedy(hf, p, 8) for p in prompts]
    settings = {} if device == "cpu" else dict(device="cuda", dtype="float32", attention_backend="triton",
                                               cuda_graph_max_bs=16)
    with Engine(str(tmp_path), **settings) as engine:
        for prompt, exp in zip(prompts, expected):
            out = engine.generate(input_ids=prompt, sampling_params={**GREEDY, "max_new_tokens": 8})
            assert out["output_ids"] == exp
    assert calls, "the quantized projections went through the kernel"

"""Dummy integer-quantized weights (``--load-format dummy`` on an AWQ, GPTQ or compressed-tensors
int config), for timing those formats on a config folder's shapes. The core's dummy init leaves the
codes random bits and every float normal noise; the formats' methods make the scales positive, static
input scales plausible and group indices valid. Checked here: the weights the raw parameters stand
for (unpacked in this file by each format's published layout) are finite and of about a bf16 dummy
model's std (0.02) in every output row, each layer computes with them, and a tiny engine on each
format (linear layers and MoE experts) generates finite log-probabilities.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from sglang_core.layers.experts import ExpertWeights
from sglang_core.layers.parallel import MergedColumnParallelLinear
from sglang_plugins.quant.awq.method import AWQMethod
from sglang_plugins.quant.compressed_tensors.method import CompressedTensorsMethod
from sglang_plugins.quant.gptq.method import GPTQMethod
from test_fp8_dummy import init_dummy_weights_once, serve_dummy_weights

INPUTS, PARTS = 128, [64, 32]  # a fused layer of two parts


def int_args(bits: int, strategy: str, symmetric: bool = True, dynamic: bool = False, **more) -> dict:
    return {"num_bits": bits, "type": "int", "strategy": strategy, "symmetric": symmetric, "dynamic": dynamic, **more}


def compressed_tensors(fmt: str, weights: dict, activations: dict | None = None) -> dict:
    return {"quant_method": "compressed-tensors", "format": fmt, "ignore": ["lm_head"],
            "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights,
                                          "input_activations": activations}}}


CASES = {
    "awq-g32": {"quant_method": "awq", "bits": 4, "group_size": 32, "zero_point": True, "version": "gemm"},
    "gptq-4bit-actorder": {"quant_method": "gptq", "bits": 4, "group_size": 32, "sym": True, "desc_act": True},
    "gptq-8bit-channel": {"quant_method": "gptq", "bits": 8, "group_size": -1, "sym": False, "desc_act": False,
                          "checkpoint_format": "gptq_v2"},
    "w4a16-asym-actorder": compressed_tensors("pack-quantized", int_args(4, "group", symmetric=False, group_size=32,
                                                                         actorder="group")),
    "w8a16-channel": compressed_tensors("pack-quantized", int_args(8, "channel")),
    "w8a8-static-asym": compressed_tensors("int-quantized", int_args(8, "tensor"),
                                           int_args(8, "tensor", symmetric=False)),
    "w8a8-dynamic": compressed_tensors("int-quantized", int_args(8, "channel"), int_args(8, "token", dynamic=True)),
}
METHODS = {"awq": AWQMethod, "gptq": GPTQMethod, "compressed-tensors": CompressedTensorsMethod}


def unpack(words: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Values ``bits`` wide, ``32 / bits`` to an int32 along ``dim``, value j of a word in bits ``bits * j``."""
    per_word = 32 // bits
    w = words.long().movedim(dim, -1) & 0xFFFFFFFF
    values = torch.stack([(w >> (bits * j)) & ((1 << bits) - 1) for j in range(per_word)], dim=-1)
    return values.flatten(-2).movedim(-1, dim)


def groups_of(g_idx: torch.Tensor | None, inputs: int, group_size: int) -> torch.Tensor:
    """Each input feature's group: by ``g_idx``, else consecutive runs of ``group_size`` (-1: one)."""
    if g_idx is not None:
        return g_idx.long()
    return torch.arange(inputs) // (inputs if group_size == -1 else group_size)


def dequantized(layer: torch.nn.Module, config: dict) -> torch.Tensor:
    """The ``[out, in]`` float weight a linear layer's raw parameters stand for, by the format's
    published layout (``config``: its quantization_config)."""
    if config["quant_method"] in ("awq", "gptq"):
        # Input features packed along dim 0 (AWQ's words repacked so after loading); zero points in output
        # order, stored less one in GPTQ v1, as they are in gptq_v2 and AWQ.
        bits = config["bits"]
        v1 = config["quant_method"] == "gptq" and config.get("checkpoint_format", "gptq") == "gptq"
        q, z = unpack(layer.qweight, bits, 0), unpack(layer.qzeros, bits, 1) + int(v1)
        g = groups_of(layer.g_idx if config.get("desc_act") else None, q.shape[0], config["group_size"])
        return ((q - z[g]) * layer.scales.float()[g]).t()
    weights = config["config_groups"]["group_0"]["weights"]
    if config["format"] == "pack-quantized":  # stored as the signed value + 2^(bits-1), zero points alike
        bits = weights["num_bits"]
        q = unpack(layer.weight_packed, bits, 1)
        g = groups_of(getattr(layer, "weight_g_idx", None), q.shape[1], weights.get("group_size") or -1)
        z = 1 << (bits - 1) if weights["symmetric"] else unpack(layer.weight_zero_point, bits, 0)[:, g]
        return (q - z) * layer.weight_scale.float()[:, g]
    return layer.weight.float() * layer.weight_scale.reshape(-1, 1)  # int8: a scale per row after loading


def dummy_layer(config: dict) -> torch.nn.Module:
    """A fused layer of ``config``'s format filled by the core's dummy init, then laid out as after loading."""
    method = METHODS[config["quant_method"]].for_layer(config, "model.layers.0.mlp.gate_up_proj")
    layer = MergedColumnParallelLinear(INPUTS, PARTS, quant_method=method)
    init_dummy_weights_once(layer)
    method.process_weights_after_loading(layer)
    return layer


@pytest.mark.parametrize("name", CASES)
def test_dummy_layer_holds_plausible_weights_and_computes_with_them(name):
    """Finite weights of about the std of the core's float noise (0.02) in every output row, none
    huge; the layer's forward is ``x W^T`` of them (W8A8: activations rounded to int8, a few percent)."""
    config = CASES[name]
    layer = dummy_layer(config)
    weight = dequantized(layer, config)
    assert bool(torch.isfinite(weight).all()) and float(weight.abs().max()) < 0.2
    row_std = weight.std(dim=1)
    assert bool((row_std > 0.006).all() & (row_std < 0.045).all()), row_std
    x = torch.randn(3, INPUTS, generator=torch.Generator().manual_seed(1))
    got, want = layer(x), x @ weight.t()
    assert float((got - want).norm() / want.norm()) < (0.05 if config.get("format") == "int-quantized" else 1e-5)


@pytest.mark.parametrize("name", [name for name in CASES if name != "w8a8-static-asym"])  # int8 experts: per channel
def test_dummy_experts_draw_each_parameter_once(name):
    """Experts' codes come from the core's noise, their scales (and group indices) from the
    method's own fill, no parameter from both (``init_dummy_weights_once`` checks)."""
    config = CASES[name]
    method = METHODS[config["quant_method"]].for_experts(config, "model.layers.0.mlp.experts")
    init_dummy_weights_once(ExpertWeights(2, INPUTS, 64, quant_method=method))


def tiny_config(architecture: str, quantization_config: dict) -> dict:
    """A two-layer config of ``architecture`` (Mixtral: four routed experts, two per token)."""
    config = {"architectures": [f"{architecture.capitalize()}ForCausalLM"], "model_type": architecture,
              "hidden_size": 64, "intermediate_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2,
              "num_hidden_layers": 2, "vocab_size": 256, "max_position_embeddings": 256, "rms_norm_eps": 1e-5,
              "tie_word_embeddings": False, "torch_dtype": "bfloat16", "quantization_config": quantization_config}
    return {**config, "num_local_experts": 4, "num_experts_per_tok": 2} if architecture == "mixtral" else config


@pytest.mark.parametrize("architecture, name", [("llama", "w8a8-static-asym"), ("mixtral", "gptq-4bit-actorder"),
                                                ("mixtral", "w4a16-asym-actorder"), ("mixtral", "w8a8-dynamic"),
                                                ("mixtral", "awq-g32")])
def test_tiny_engine_serves_dummy_integer_weights(tmp_path: Path, architecture: str, name: str):
    """Finite log-probabilities (prompt, output, top 5) from dummy weights; Mixtral's experts (each
    expert's gate, up and down) hold positive scales."""
    model = serve_dummy_weights(tmp_path, tiny_config(architecture, CASES[name]))
    experts = [m for m in model.modules() if isinstance(m, ExpertWeights)]
    assert len(experts) == (2 if architecture == "mixtral" else 0)
    for module in experts:
        scales = [p for n, p in module.named_parameters() if n.endswith(("scales", "weight_scale"))]
        assert len(scales) == 2 and all(bool((s > 0).all() & (s < 0.01).all()) for s in scales)

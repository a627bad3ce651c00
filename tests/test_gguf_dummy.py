"""Dummy GGUF weights (``--load-format dummy`` with ``quantization_config.dummy_ggml_type``), for timing
a block type's kernels on a config folder's shapes: the random blocks are valid (finite, of the core's
float noise's size, as the ``gguf`` package dequantizes them), the kernels multiply them as that
package's dequantization says, and a tiny engine built on them generates what HF transformers
float32 generates from the same dequantized weights.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T
from gguf.quants import dequantize as gguf_dequantize
from torch import nn
from transformers import AutoConfig, LlamaConfig, LlamaForCausalLM

from gguf_blocks import QUANTIZED
from reference import hf_greedy
from sglang_core.engine import Engine
from sglang_core.weights.loader import init_dummy_weights
from sglang_plugins.quant.gguf import kernels
from sglang_plugins.quant.gguf.method import GGUFMethod

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FEATURES = 512  # two K-quant super-blocks, sixteen small blocks per row
ROWS = [48, 16]  # a fused layer of two parts


def dummy_layer(qtype: T) -> tuple[nn.Module, GGUFMethod]:
    """A fused GGUF layer filled by the core's dummy init, then laid out as after loading."""
    model, method = nn.Module(), GGUFMethod({"blocks": "ggml", "dummy_ggml_type": qtype.name}, "merged_proj")
    model.quant_method = method
    with torch.device(DEVICE):
        method.create_weights(model, FEATURES, ROWS, torch.float32, None)
    init_dummy_weights(model, seed=int(qtype))
    method.process_weights_after_loading(model)
    return model, method


def package_dequantized(layer: nn.Module) -> torch.Tensor:
    """The layer's weight ``[out, in]`` float32 as the ``gguf`` package dequantizes its stored blocks."""
    (qtype, rows, offset, width), = layer.quant_method.segments
    raw = layer.qweight[offset:offset + rows * width].view(rows, width).cpu().numpy()
    return torch.from_numpy(gguf_dequantize(raw, qtype).astype(np.float32))


@pytest.mark.parametrize("qtype", QUANTIZED, ids=lambda t: t.name)
def test_every_dummy_block_dequantizes_to_finite_values_of_the_float_noise_size(qtype):
    layer, method = dummy_layer(qtype)
    assert layer.qweight_type.tolist() == [qtype] and method.segments[0][:2] == (qtype, sum(ROWS))
    weight = package_dequantized(layer)
    assert bool(torch.isfinite(weight).all())
    per_block = weight.reshape(-1, 256 if qtype in (T.Q4_K, T.Q5_K, T.Q6_K) else 32)
    # Every block holds values of a plausible weight (the core's float noise has std 0.02), none all zero.
    assert float(per_block.abs().max()) < 0.25 and bool((per_block.std(dim=1) > 0.002).all())
    assert 0.012 < float(weight.std()) < 0.03
    torch.testing.assert_close(method.dequantized_weight(layer).cpu(), weight, rtol=0, atol=0)  # the CPU path


@pytest.mark.parametrize("qtype", QUANTIZED, ids=lambda t: t.name)
def test_kernels_multiply_dummy_blocks_as_the_gguf_package_dequantizes_them(qtype):
    """A decode step's row (the GEMV) and a prefill's rows (dequantize + matmul) on the Triton kernels."""
    layer, method = dummy_layer(qtype)
    want_weight = package_dequantized(layer).double()
    for tokens in (1, kernels.GEMV_MAX_ROWS + 1):
        x = torch.randn(tokens, FEATURES, generator=torch.Generator().manual_seed(tokens))
        got = method.kernel_product(layer, x.to(DEVICE), None).cpu()
        torch.testing.assert_close(got.double(), x.double() @ want_weight.T, atol=1e-5, rtol=1e-4)


def test_dummy_weights_without_a_type_or_with_partial_blocks_name_the_field():
    layer, method = nn.Module(), GGUFMethod({"blocks": "ggml"}, "model.layers.0.mlp.down_proj")
    method.create_weights(layer, 256, [8], torch.float32, None)
    with pytest.raises(ValueError, match=r"quantization_config.dummy_ggml_type: None is not one of Q4_0, Q4_1"):
        method.init_dummy_weights(layer, torch.Generator())
    method = GGUFMethod({"blocks": "ggml", "dummy_ggml_type": "Q4_K"}, "model.layers.0.mlp.down_proj")
    method.create_weights(layer, 96, [8], torch.float32, None)
    with pytest.raises(ValueError, match=r"down_proj: quantization_config.dummy_ggml_type: 96 input features are "
                                         r"not whole Q4_K blocks"):
        method.init_dummy_weights(layer, torch.Generator())


TINY = dict(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False)
QUANTIZED_MODULES = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "o_proj": ("o_proj",),
                     "gate_up_proj": ("gate_proj", "up_proj"), "down_proj": ("down_proj",),
                     "embed_tokens": ("embed_tokens",), "lm_head": ("lm_head",)}


def hf_with_the_engines_weights(model: nn.Module, config: LlamaConfig) -> LlamaForCausalLM:
    """HF's Llama holding the engine's weights: every GGUF layer as the ``gguf`` package dequantizes
    its blocks, fused layers split into their parts, the norms as they are."""
    hf = LlamaForCausalLM(config).eval()
    state = {}
    for name, module in model.named_modules():
        head, _, leaf = name.rpartition(".")
        if leaf in QUANTIZED_MODULES:
            parts = QUANTIZED_MODULES[leaf]
            sizes = [hf.get_submodule(f"{head}.{part}".lstrip(".")).weight.shape[0] for part in parts]
            for part, weight in zip(parts, package_dequantized(module).split(sizes)):
                state[f"{head}.{part}.weight".lstrip(".")] = weight
    state.update({name: p.detach() for name, p in model.named_parameters() if name.endswith("norm.weight")})
    hf.load_state_dict(state)
    return hf


def test_tiny_engine_on_dummy_q4_k_weights_generates_what_transformers_does(tmp_path: Path):
    """Every linear layer, the token embedding and the LM head hold Q4_K blocks the dummy init made;
    greedy tokens equal HF transformers float32's on the same dequantized weights."""
    config = {**LlamaConfig(**TINY).to_dict(), "architectures": ["LlamaForCausalLM"],
              "quantization_config": {"quant_method": "gguf", "blocks": "ggml", "dummy_ggml_type": "Q4_K"}}
    (tmp_path / "config.json").write_text(json.dumps(config))
    prompts = [[5, 17, 300, 42], list(range(20, 50))]
    greedy = {"temperature": 0, "ignore_eos": True, "max_new_tokens": 6}
    with Engine(str(tmp_path), load_format="dummy", chunked_prefill_size=16) as engine:
        results = engine.generate(input_ids=prompts, sampling_params=greedy)
        model = engine.core.core.runner.model
    types = {name: module.qweight_type.tolist() for name, module in model.named_modules()
             if name.rpartition(".")[2] in QUANTIZED_MODULES}
    assert len(types) == 2 * 4 + 2 and set(map(tuple, types.values())) == {(T.Q4_K,)}
    hf = hf_with_the_engines_weights(model, LlamaConfig(**TINY))
    assert [r["output_ids"] for r in results] == [hf_greedy(hf, prompt, greedy["max_new_tokens"]) for prompt in prompts]


def test_benchmark_floor_counts_the_q4_k_blocks_of_every_matrix_and_the_head():
    """``gpu_llama8b.py --config benchmarks/configs/llama-3.1-8b-gguf-q4k --runs floor``: a Q4_K
    super-block is 144 bytes for 256 values; the untied embedding is not read whole, norms are bf16."""
    benchmarks = Path(__file__).parent.parent / "benchmarks"
    spec = importlib.util.spec_from_file_location("gpu_llama8b", benchmarks / "gpu_llama8b.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    c = AutoConfig.from_pretrained(benchmarks / "configs" / "llama-3.1-8b-gguf-q4k")
    h, kv = c.hidden_size, c.num_key_value_heads * c.head_dim
    matrices = c.num_hidden_layers * (h * (h + 2 * kv) + h * h + 3 * h * c.intermediate_size) + c.vocab_size * h
    norms = (2 * c.num_hidden_layers + 1) * h
    assert bench.weight_bytes(c) == (matrices * 144 / 256 + norms * 2,) * 2

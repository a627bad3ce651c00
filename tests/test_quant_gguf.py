"""GGUF linear layers kept quantized (the ``gguf`` quant plugin): ggml blocks dequantized on the fly.

The dequantizers are checked against the ``gguf`` package's own (an independent implementation) on
random blocks of every type; whole models against HF transformers float32 loading the same GGUF.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as T
from gguf.quants import dequantize as gguf_dequantize
from transformers import AutoModelForCausalLM, LlamaConfig, PhiConfig

from gguf_blocks import FLOATS, QUANTIZED, random_blocks
from gguf_writer import VOCAB_SIZE, finish_gguf, gguf_with_metadata
from reference import hf_greedy
from sglang_core.engine import Engine
from sglang_core.layers.parallel import LinearBase
from sglang_core.model_executor.model_api import ModelContext
from sglang_plugins.models.phi.model import PhiForCausalLM
from sglang_plugins.quant.gguf.blocks import dequantize, row_bytes
from sglang_plugins.quant.gguf.method import GGUFMethod


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


# ---- a tiny Llama GGUF of mixed block types, served kept quantized ----

# Per layer and llama.cpp stem, the type each matrix is stored as. The fused layers mix types the
# way llama.cpp's Q4_K_M mixes Q4_K and Q6_K: q/k/v of layer 0 and gate/up of both layers.
LAYER_TYPES = ({"attn_q": T.Q4_K, "attn_k": T.Q4_K, "attn_v": T.Q6_K, "attn_output": T.Q5_K,
                "ffn_gate": T.Q4_0, "ffn_up": T.Q4_1, "ffn_down": T.Q8_0},
               {"attn_q": T.F16, "attn_k": T.BF16, "attn_v": T.F32, "attn_output": T.Q6_K,
                "ffn_gate": T.Q8_0, "ffn_up": T.Q8_0, "ffn_down": T.Q4_K})
TINY = dict(vocab_size=VOCAB_SIZE, hidden_size=256, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128, bos_token_id=1, eos_token_id=2, rope_theta=10000.0,
            rms_norm_eps=1e-5)
GREEDY = {"temperature": 0, "ignore_eos": True, "max_new_tokens": 6}


def write_tiny_gguf(path: Path, layer_types: tuple[dict[str, T], ...] = LAYER_TYPES) -> Path:
    """A tiny Llama GGUF of random blocks (all zeros for a type ``random_blocks`` does not build)."""
    rng = np.random.default_rng(0)
    writer = gguf_with_metadata(LlamaConfig(**TINY), path)
    hidden, ffn, kv = TINY["hidden_size"], TINY["intermediate_size"], TINY["num_key_value_heads"] * 64
    shapes = {"attn_q": (hidden, hidden), "attn_k": (kv, hidden), "attn_v": (kv, hidden),
              "attn_output": (hidden, hidden), "ffn_gate": (ffn, hidden), "ffn_up": (ffn, hidden),
              "ffn_down": (hidden, ffn)}

    def add(name: str, qtype: T, rows: int, features: int) -> None:
        if qtype in (*QUANTIZED, *FLOATS, T.BF16):
            blocks = random_blocks(qtype, rows, features, rng)
        else:
            values, nbytes = GGML_QUANT_SIZES[qtype]
            blocks = np.zeros((rows, features // values * nbytes), np.uint8)
        writer.add_tensor(name, blocks, raw_dtype=qtype)

    add("token_embd.weight", T.Q4_K, VOCAB_SIZE, hidden)
    for layer, types in enumerate(layer_types):
        for norm in ("attn_norm", "ffn_norm"):
            writer.add_tensor(f"blk.{layer}.{norm}.weight", (1 + 0.1 * rng.standard_normal(hidden)).astype(np.float32))
        for stem, qtype in types.items():
            add(f"blk.{layer}.{stem}.weight", qtype, *shapes[stem])
    writer.add_tensor("output_norm.weight", np.ones(hidden, np.float32))
    add("output.weight", T.Q6_K, VOCAB_SIZE, hidden)
    finish_gguf(writer)
    return path


@pytest.fixture(scope="module")
def tiny_quantized_gguf(tmp_path_factory) -> Path:
    return write_tiny_gguf(tmp_path_factory.mktemp("tiny_gguf") / "model.gguf")


@pytest.fixture(scope="module")
def tiny_reference(tiny_quantized_gguf) -> tuple[list[list[int]], list[list[int]]]:
    """Prompts of 3, 17 and 30 tokens and the greedy tokens of HF transformers float32 reading the
    tiny GGUF (its own dequantization and q/k un-permutation)."""
    ref = AutoModelForCausalLM.from_pretrained(str(tiny_quantized_gguf.parent), gguf_file=tiny_quantized_gguf.name,
                                               dtype=torch.float32).eval()
    rng = torch.Generator().manual_seed(2)
    prompts = [torch.randint(3, VOCAB_SIZE, (n,), generator=rng).tolist() for n in (3, 17, 30)]
    return prompts, [hf_greedy(ref, prompt, GREEDY["max_new_tokens"]) for prompt in prompts]


def test_tiny_mixed_type_gguf_serves_as_transformers_reads_it(tiny_quantized_gguf, tiny_reference):
    """The engine, keeping the blocks of every linear layer, of the Q4_K token embedding and of the
    untied Q6_K LM head, generates HF transformers' greedy tokens."""
    prompts, expected = tiny_reference
    with Engine(str(tiny_quantized_gguf), load_format="gguf_quantized", chunked_prefill_size=8) as engine:
        results = engine.generate(input_ids=prompts, sampling_params=GREEDY)
        engine.check_memory()
        model = engine.core.core.runner.model
    qkv, embed, head = model.model.layers[0].self_attn.qkv_proj, model.model.embed_tokens, model.lm_head
    assert qkv.qweight.dtype == torch.uint8 and qkv.qweight_type.tolist() == [T.Q4_K, T.Q4_K, T.Q6_K]
    assert embed.qweight.dtype == torch.uint8 and embed.qweight_type.tolist() == [T.Q4_K]
    assert head is not embed and head.qweight.dtype == torch.uint8 and head.qweight_type.tolist() == [T.Q6_K]
    assert [result["output_ids"] for result in results] == expected


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_tiny_mixed_type_gguf_on_cuda_through_the_kernels(tiny_quantized_gguf, tiny_reference, monkeypatch):
    """On CUDA (float32 activations, CUDA graphs) the quantized runs go through the Triton kernels,
    the 50-token prefill through dequantize + cuBLAS and the 3-request decode through the GEMV, and
    give the greedy tokens the CPU path gives (HF transformers')."""
    from sglang_plugins.quant.gguf import kernels

    calls = {"gemv": 0, "dequantize": 0}

    def counted(name):
        launch = getattr(kernels, name)

        def run(*args):
            calls[name] += 1
            return launch(*args)
        return run

    for name in calls:
        monkeypatch.setattr(kernels, name, counted(name))
    prompts, expected = tiny_reference
    with Engine(str(tiny_quantized_gguf), load_format="gguf_quantized", device="cuda", dtype="float32",
                attention_backend="triton", cuda_graph_max_bs=16) as engine:
        results = engine.generate(input_ids=prompts, sampling_params=GREEDY)
        qkv = engine.core.core.runner.model.model.layers[0].self_attn.qkv_proj
    assert qkv.qweight.is_cuda and qkv.qweight.dtype == torch.uint8
    assert calls["gemv"] > 0 and calls["dequantize"] > 0
    assert [result["output_ids"] for result in results] == expected


def test_default_model_served_quantized_as_transformers_reads_it(hf_model, hf_tokenizer):
    """The embedded SmolLM2 (Q4_1 layers, a Q8_0 embedding tied to the LM head) kept quantized: the
    greedy tokens of HF float32 on the same GGUF, with every linear layer holding its blocks (a sixth
    of float32's bytes) and the head projecting through the embedding's one Q8_0 table."""
    prompt = hf_tokenizer("The capital of France is")["input_ids"]
    with Engine(load_format="gguf_quantized") as engine:
        result = engine.generate(input_ids=prompt, sampling_params=GREEDY)
        model = engine.core.core.runner.model
    embed = model.model.embed_tokens
    assert model.lm_head is embed and embed.qweight.dtype == torch.uint8 and embed.qweight_type.tolist() == [T.Q8_0]
    assert embed.qweight.numel() == model.config.vocab_size * row_bytes(T.Q8_0, model.config.hidden_size)
    linear = [m for m in model.modules() if isinstance(m, LinearBase)]
    assert len(linear) == 4 * model.config.num_hidden_layers  # qkv, o, gate_up, down
    assert all(m.qweight.dtype == torch.uint8 and m.qweight_type.tolist() == [T.Q4_1] * len(m.output_sizes)
               for m in linear)
    stored = sum(m.qweight.numel() for m in linear)
    as_float32 = sum(4 * sum(m.output_sizes) * m.input_size for m in linear)
    assert stored < as_float32 / 6  # Q4_1: 20 bytes per 32 values
    assert result["output_ids"] == hf_greedy(hf_model, prompt, GREEDY["max_new_tokens"])


def test_quantization_gguf_without_the_blocks_format_is_refused(tiny_quantized_gguf):
    with pytest.raises(ValueError, match=r"quantization_config\.blocks must be 'ggml'.*--load-format gguf_quantized"):
        Engine(str(tiny_quantized_gguf), quantization="gguf")


def test_unsupported_block_type_names_the_layer_and_the_way_out(tmp_path):
    path = write_tiny_gguf(tmp_path / "model.gguf", (LAYER_TYPES[0], {**LAYER_TYPES[1], "ffn_down": T.Q2_K}))
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.down_proj: GGUF tensor type Q2_K is not supported "
                                         r".*--load-format gguf reads the file dequantized"):
        Engine(str(path), load_format="gguf_quantized")


def test_tied_head_with_a_bias_cannot_share_a_quantized_table():
    """Phi's head has a bias of its own: tied, it would need the embedding's blocks as its table."""
    config = PhiConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                       tie_word_embeddings=True)
    ctx = ModelContext(embedding_method_for=lambda prefix: GGUFMethod({"blocks": "ggml"}, prefix))
    with pytest.raises(ValueError, match=r"tie_word_embeddings with an LM head bias"):
        PhiForCausalLM(config, ctx)

"""GGUF models against independent references: config and tokenizer written into a folder once,
weights streamed from the file tensor by tensor (the ``gguf`` weight format).

The embedded SmolLM2 GGUF is checked against transformers' own GGUF loader (weights, config,
tokenizer); a tiny synthetic GGUF, written here the way llama.cpp writes one (q/k rows permuted,
llama3 rope as per-frequency divisors), checks the un-permutation and rope recovery on their own.
"""

from __future__ import annotations

import json
import math
import re
import time
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from gguf_writer import llama_cpp_permute, tokenizer_metadata
from sglang_core.weights import gguf_convert
from sglang_core.weights.default_model import find_default_gguf, gguf_to_cached_folder
from sglang_core.weights.gguf_convert import GGUF_LINK, write_gguf_folder
from sglang_plugins.weights.gguf import format as gguf_format
from sglang_plugins.weights.gguf.format import GGUFFormat

CONFIG_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "head_dim", "rms_norm_eps", "max_position_embeddings",
                 "tie_word_embeddings", "bos_token_id", "eos_token_id", "model_type")


def streamed(path: Path) -> dict[str, torch.Tensor]:
    return dict(GGUFFormat().iter_weights(path))


@pytest.fixture(scope="module")
def default_gguf() -> Path:
    return find_default_gguf()


@pytest.fixture(scope="module")
def converted(tmp_path_factory, default_gguf):
    """The default GGUF's config folder, written once into a private cache (kept as the cache for this module)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SGLANG_CORE_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
        start = time.perf_counter()
        folder = gguf_to_cached_folder(default_gguf)
        print(f"\nwrote the config folder of {default_gguf.name} in {time.perf_counter() - start:.1f}s")
        yield folder


@pytest.fixture(scope="module")
def hf_reference(default_gguf):
    """transformers' own GGUF loader: an independent dequantize/rename/un-permute path."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(default_gguf.parent), gguf_file=default_gguf.name,
                                                dtype=torch.float32)


def test_streamed_weights_match_transformers_gguf_loader(default_gguf, hf_reference):
    ours = streamed(default_gguf)
    ref = hf_reference.state_dict()
    assert hf_reference.config.tie_word_embeddings
    assert "lm_head.weight" not in ours  # tied: the engine reuses the embedding
    assert set(ours) == set(ref) - {"lm_head.weight"}
    for name, tensor in ours.items():
        assert tensor.dtype == torch.float32 and torch.equal(tensor, ref[name]), name


def test_weights_stream_one_tensor_at_a_time(default_gguf, monkeypatch):
    """The first tensor arrives after one dequantization, not after the whole file's."""
    calls = []
    dequantize = gguf_format._dequantize
    monkeypatch.setattr(gguf_format, "_dequantize", lambda *args: calls.append(1) or dequantize(*args))
    weights = GGUFFormat().iter_weights(default_gguf)
    assert not calls  # a generator: nothing read before the loader asks
    next(weights)
    assert len(calls) == 1
    next(weights)
    assert len(calls) == 2


def test_folder_holds_config_tokenizer_and_a_link_but_no_weights(converted, default_gguf):
    assert (converted / GGUF_LINK).resolve() == default_gguf.resolve()
    assert sorted(p.name for p in converted.iterdir()) == sorted(
        ["config.json", "generation_config.json", GGUF_LINK, "tokenizer.json", "tokenizer_config.json"])
    # The folder is a model path of its own: the gguf format claims it and reads the linked file.
    assert GGUFFormat().claims(converted) and GGUFFormat().config_folder(converted) == converted


def test_config_matches_transformers(converted, hf_reference):
    from transformers import AutoConfig

    ours, ref = AutoConfig.from_pretrained(str(converted)), hf_reference.config
    for field in CONFIG_FIELDS:
        assert getattr(ours, field) == getattr(ref, field), field
    assert ours.rope_parameters == ref.rope_parameters  # rope_theta 100000, no scaling
    assert ours.architectures == ["LlamaForCausalLM"] and ours.dtype == torch.float32
    raw = json.loads((converted / "config.json").read_text())
    assert raw["rope_theta"] == 100000.0 and raw["torch_dtype"] == "float32" and "rope_scaling" not in raw
    assert json.loads((converted / "generation_config.json").read_text())["eos_token_id"] == 2


def test_tokenizer_matches_transformers(converted, default_gguf):
    from transformers import AutoTokenizer

    from sglang_core.tokenizer import eos_token_ids, load_tokenizer

    ours = load_tokenizer(converted)
    ref = AutoTokenizer.from_pretrained(str(default_gguf.parent), gguf_file=default_gguf.name)
    assert (ours.eos_token, ours.eos_token_id) == ("<|im_end|>", 2)
    assert eos_token_ids(ours, converted) == {2}
    assert "chat_template" in json.loads((converted / "tokenizer_config.json").read_text())
    messages = [{"role": "user", "content": "What is 2+2?"}]
    prompt = ours.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert prompt == ref.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert prompt.startswith("<|im_start|>system\n") and prompt.endswith("<|im_start|>assistant\n")
    texts = ["Hello, world!", "  leading spaces and\ttabs\n\nnewlines", "def f(x):\n    return x ** 2  # square",
             "emoji 🙂🚀 and accents: café naïve", "中文测试，日本語のテキスト", "<|im_start|>user\nhi<|im_end|>", prompt]
    for text in texts:
        ids = ours.encode(text, add_special_tokens=False)
        assert ids == ref.encode(text, add_special_tokens=False), text
        assert ours.decode(ids) == text
    assert ours.encode(prompt, add_special_tokens=False)[:1] == [ours.convert_tokens_to_ids("<|im_start|>")]


def test_second_call_reuses_cache(converted, default_gguf, monkeypatch):
    def must_not_run(*args, **kwargs):
        raise AssertionError("rewrote a cached GGUF folder")

    monkeypatch.setattr(gguf_convert, "write_gguf_folder", must_not_run)
    mtime = converted.stat().st_mtime_ns
    start = time.perf_counter()
    assert gguf_to_cached_folder(default_gguf) == converted
    assert gguf_to_cached_folder(converted / GGUF_LINK) == converted  # the link names the same file
    assert time.perf_counter() - start < 1.0
    assert converted.stat().st_mtime_ns == mtime
    assert not list(converted.parent.glob("*.tmp-*"))  # no temp folders left behind


@pytest.mark.parametrize("content", [b"", b"GGUF" + bytes(range(256)) * 8, np.random.default_rng(0).bytes(4096)],
                         ids=["empty", "bad-header", "random"])
def test_malformed_file_raises_value_error(tmp_path, content):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(content)
    with pytest.raises(ValueError, match=re.escape(str(bad))):
        write_gguf_folder(bad, tmp_path / "out")
    with pytest.raises(ValueError, match=re.escape(str(bad))):
        streamed(bad)
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["broken.gguf"]


# ---- a tiny synthetic GGUF, written as llama.cpp's converter writes one ----

HIDDEN, HEADS, KV_HEADS, HEAD_DIM, FFN, LAYERS = 128, 4, 2, 32, 96, 2
THETA = 10000.0
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 64}


def _llama3_rope_factors() -> np.ndarray:
    """Per-frequency divisors as llama.cpp writes them for a Llama 3.1 rope config."""
    old, low, high, factor = (LLAMA3[k] for k in ("original_max_position_embeddings", "low_freq_factor",
                                                   "high_freq_factor", "factor"))
    factors = []
    for i in range(0, HEAD_DIM, 2):
        wavelen = 2 * math.pi * THETA ** (i / HEAD_DIM)
        if wavelen < old / high:
            factors.append(1.0)
        elif wavelen > old / low:
            factors.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(factors, dtype=np.float32)


def _write_tiny_gguf(path: Path, arch: str = "llama") -> dict[str, np.ndarray]:
    """Write a 2-layer GQA llama GGUF (Q8_0, F16 and F32 tensors, untied output, llama3 rope).

    Returns the original float32 tensors under their Hugging Face names.
    """
    rng = np.random.default_rng(0)
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(LAYERS)
    writer.add_context_length(256)
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_rope_dimension_count(HEAD_DIM)
    writer.add_rope_freq_base(THETA)
    writer.add_layer_norm_rms_eps(1e-5)
    vocab = tokenizer_metadata(writer)
    writer.add_vocab_size(vocab)

    originals: dict[str, np.ndarray] = {}

    def add(gguf_name: str, hf_name: str, shape: tuple[int, ...], qtype: gguf.GGMLQuantizationType,
            permute_heads: int | None = None) -> None:
        w = (rng.standard_normal(shape) * (0.02 if len(shape) == 2 else 1.0)).astype(np.float32)
        originals[hf_name] = w
        stored = llama_cpp_permute(w, permute_heads) if permute_heads else w
        if qtype == gguf.GGMLQuantizationType.Q8_0:
            writer.add_tensor(gguf_name, gguf.quants.quantize(stored, qtype), raw_dtype=qtype)
        else:
            writer.add_tensor(gguf_name, stored.astype(np.float16 if qtype == gguf.GGMLQuantizationType.F16
                                                       else np.float32))

    q8, f16, f32 = (gguf.GGMLQuantizationType.Q8_0, gguf.GGMLQuantizationType.F16,
                    gguf.GGMLQuantizationType.F32)
    add("token_embd.weight", "model.embed_tokens.weight", (vocab, HIDDEN), q8)
    for i in range(LAYERS):
        hf = f"model.layers.{i}"
        add(f"blk.{i}.attn_norm.weight", f"{hf}.input_layernorm.weight", (HIDDEN,), f32)
        add(f"blk.{i}.attn_q.weight", f"{hf}.self_attn.q_proj.weight", (HEADS * HEAD_DIM, HIDDEN), q8, HEADS)
        add(f"blk.{i}.attn_k.weight", f"{hf}.self_attn.k_proj.weight", (KV_HEADS * HEAD_DIM, HIDDEN), f16, KV_HEADS)
        add(f"blk.{i}.attn_v.weight", f"{hf}.self_attn.v_proj.weight", (KV_HEADS * HEAD_DIM, HIDDEN), q8)
        add(f"blk.{i}.attn_output.weight", f"{hf}.self_attn.o_proj.weight", (HIDDEN, HEADS * HEAD_DIM), q8)
        add(f"blk.{i}.ffn_norm.weight", f"{hf}.post_attention_layernorm.weight", (HIDDEN,), f32)
        add(f"blk.{i}.ffn_gate.weight", f"{hf}.mlp.gate_proj.weight", (FFN, HIDDEN), q8)
        add(f"blk.{i}.ffn_up.weight", f"{hf}.mlp.up_proj.weight", (FFN, HIDDEN), f16)
        add(f"blk.{i}.ffn_down.weight", f"{hf}.mlp.down_proj.weight", (HIDDEN, FFN), q8)
    add("output_norm.weight", "model.norm.weight", (HIDDEN,), f32)
    add("output.weight", "lm_head.weight", (vocab, HIDDEN), f16)
    writer.add_tensor("rope_freqs.weight", _llama3_rope_factors())

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return originals


def test_synthetic_gguf_round_trips(tmp_path):
    originals = _write_tiny_gguf(tmp_path / "tiny.gguf")
    ours = streamed(tmp_path / "tiny.gguf")
    assert set(ours) == set(originals)  # untied: lm_head.weight kept, rope_freqs dropped
    for name, w in originals.items():
        got = ours[name].numpy()
        assert got.shape == w.shape, name
        err = np.abs(got - w)
        if w.ndim == 2:
            # Q8_0 rounds each 32-value block to steps of absmax/127 (half a step, plus a little for its
            # fp16 scale); F16 rounding is finer still.
            bound = np.abs(w).reshape(-1, 32).max(axis=1, keepdims=True) / 127 * 0.6
            assert (err.reshape(-1, 32) <= bound).all(), name
        else:
            assert (err == 0).all(), name  # F32 norms are stored exactly

    folder = write_gguf_folder(tmp_path / "tiny.gguf", tmp_path / "hf")
    config = json.loads((folder / "config.json").read_text())
    assert config["num_attention_heads"] == HEADS and config["num_key_value_heads"] == KV_HEADS
    assert config["head_dim"] == HEAD_DIM and config["tie_word_embeddings"] is False
    assert config["rope_scaling"] == LLAMA3 and config["rope_theta"] == THETA
    assert json.loads((folder / "generation_config.json").read_text())["eos_token_id"] == [2, 3]
    assert streamed(folder).keys() == ours.keys()  # through the folder's link


def test_synthetic_unpermute_is_exact(tmp_path):
    """Row-wise quantization commutes with a row permutation, so q/k must match dequant(quant(w)) bit for bit."""
    originals = _write_tiny_gguf(tmp_path / "tiny.gguf")
    ours = streamed(tmp_path / "tiny.gguf")
    q8 = gguf.GGMLQuantizationType.Q8_0
    for i in range(LAYERS):
        q = f"model.layers.{i}.self_attn.q_proj.weight"
        k = f"model.layers.{i}.self_attn.k_proj.weight"
        np.testing.assert_array_equal(ours[q].numpy(), gguf.quants.dequantize(gguf.quants.quantize(originals[q], q8), q8))
        np.testing.assert_array_equal(ours[k].numpy(), originals[k].astype(np.float16).astype(np.float32))


def test_synthetic_rope_and_tokenizer_load_in_transformers(tmp_path):
    from transformers import AutoConfig, AutoTokenizer
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    _write_tiny_gguf(tmp_path / "tiny.gguf")
    folder = write_gguf_folder(tmp_path / "tiny.gguf", tmp_path / "hf")
    config = AutoConfig.from_pretrained(str(folder))
    inv_freq, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    base = 1.0 / THETA ** (torch.arange(0, HEAD_DIM, 2, dtype=torch.float64) / HEAD_DIM)
    torch.testing.assert_close(inv_freq.double(), base / torch.from_numpy(_llama3_rope_factors()).double(),
                               rtol=1e-5, atol=0)

    tok = AutoTokenizer.from_pretrained(str(folder))
    assert (tok.bos_token, tok.eos_token) == ("<s>", "</s>")
    assert tok.apply_chat_template([{"role": "user", "content": "hey"}], tokenize=False) == "<s>hey</s>"
    assert tok.decode(tok.encode("hello there", add_special_tokens=False)) == "hello there"


def test_truncated_gguf_raises_value_error(tmp_path):
    path = tmp_path / "tiny.gguf"
    _write_tiny_gguf(path)
    path.write_bytes(path.read_bytes()[:-5000])  # header intact, tensor data cut short
    with pytest.raises(ValueError, match=re.escape(str(path))):
        streamed(path)

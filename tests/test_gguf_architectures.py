"""GGUF files of every dense architecture the ``gguf`` weight format reads, against the Hugging Face
model they were written from.

Each case builds a tiny random transformers model and writes it as llama.cpp's converter would
(``tests/gguf_writer.py``). transformers' own GGUF loader reading the file back to the model's
weights shows the writer is right; then the config folder and the streamed ``(name, tensor)`` pairs
must give the model back: the same config fields, the same state dict (a tied head may be absent),
and the same logits when a model built from our config runs our weights.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from transformers import (AutoConfig, AutoModelForCausalLM, AutoTokenizer, Gemma2Config, Gemma3TextConfig,
                          LlamaConfig, Phi3Config, Qwen2Config, Qwen3Config, StableLmConfig, Starcoder2Config)

from gguf_writer import F16, F32, Q4_0, Q4_1, Q8_0, VOCAB_SIZE, write_gguf
from sglang_core.engine import Engine
from sglang_core.weights.gguf_architectures import ARCHITECTURES
from sglang_core.weights.gguf_convert import write_gguf_folder
from sglang_plugins.weights.gguf.format import GGUFFormat

SMALL = dict(vocab_size=VOCAB_SIZE, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=128, bos_token_id=1, eos_token_id=2, pad_token_id=None)
LONGROPE = {"rope_type": "longrope", "long_factor": [1.0, 1.5, 2.5, 4.0], "short_factor": [1.0, 1.1, 1.2, 1.3]}
GEMMA3_ROPE = {"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1_000_000.0},
               "sliding_attention": {"rope_type": "default", "rope_theta": 20_000.0}}

# id -> (config, storage type of the matrices: 4-bit blocks too, kept so by the gguf_quantized load,
# Phi-3's fused q/k/v and gate/up among them). Together the cases set every config field each
# architecture's GGUF carries: biases, tied and untied heads, head sizes apart from hidden/heads,
# windows and which layers use them, soft-caps, rope scaling (yarn, linear, LongRoPE), partial rotary,
# norm offsets and epsilons, parallel residuals, per-head q/k norms.
CASES = {
    "llama": (LlamaConfig(**SMALL, head_dim=32, rope_theta=500_000.0, rms_norm_eps=1e-6, attention_bias=True), F16),
    "qwen2-yarn": (Qwen2Config(**SMALL, rms_norm_eps=1e-5, rope_theta=1e6, rope_scaling={
        "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}), Q8_0),
    "qwen2-tied": (Qwen2Config(**SMALL, tie_word_embeddings=True), F16),
    "qwen3": (Qwen3Config(**{**SMALL, "num_attention_heads": 2, "num_key_value_heads": 1}, head_dim=128,
                          tie_word_embeddings=True), F32),
    "qwen3-bias": (Qwen3Config(**SMALL, head_dim=128, attention_bias=True, rms_norm_eps=1e-5), F32),
    # Phi-3 pads with <|endoftext|> (transformers' GGUF loader would take 32000 from the class otherwise).
    "phi3-window": (Phi3Config(**{**SMALL, "pad_token_id": 2}, sliding_window=8, original_max_position_embeddings=128,
                               rope_theta=20_000.0), Q4_1),
    "phi3-longrope": (Phi3Config(**{**SMALL, "max_position_embeddings": 64, "pad_token_id": 2},
                                 original_max_position_embeddings=16, partial_rotary_factor=0.5, rope_scaling=LONGROPE,
                                 tie_word_embeddings=True), F32),
    "gemma2": (Gemma2Config(**{**SMALL, "num_hidden_layers": 4}, head_dim=32, query_pre_attn_scalar=32,
                            sliding_window=8, attn_logit_softcapping=20.0, final_logit_softcapping=15.0), F32),
    "gemma3": (Gemma3TextConfig(**{**SMALL, "num_hidden_layers": 7}, head_dim=32, query_pre_attn_scalar=32,
                                sliding_window=8, rope_parameters=GEMMA3_ROPE, final_logit_softcapping=25.0,
                                tie_word_embeddings=False), F32),
    "gemma3-global": (Gemma3TextConfig(**SMALL, head_dim=32, query_pre_attn_scalar=32, sliding_window_pattern=1,
                                       rms_norm_eps=1e-5), F32),
    "stablelm-2": (StableLmConfig(**SMALL, use_qkv_bias=True, layer_norm_eps=1e-6), Q4_0),
    "stablelm-2-12b": (StableLmConfig(**SMALL, use_parallel_residual=True, qk_layernorm=True, partial_rotary_factor=0.5,
                                      tie_word_embeddings=True), F32),
    "starcoder2": (Starcoder2Config(**SMALL, norm_epsilon=1e-6, rope_theta=100_000.0), F16),
    "starcoder2-no-bias": (Starcoder2Config(**SMALL, use_bias=False, tie_word_embeddings=False), F32),
}
# Weights only one of the model and transformers' reading of its GGUF has: that reader's config never
# sets attention_bias (Llama, Qwen3), qk_layernorm (StableLM) or use_bias (StarCoder2, default on).
TRANSFORMERS_GAPS = {"llama": r".*self_attn\.[qkvo]_proj\.bias", "qwen3-bias": r".*self_attn\.[qkvo]_proj\.bias",
                     "stablelm-2-12b": r".*_layernorm\.norms\.\d+\.weight",
                     "starcoder2-no-bias": r".*(_proj|c_fc)\.bias"}
# Fields that are no model's business (bookkeeping, training-only values), and ones transformers
# derives from others that are compared: the top-level partial_rotary_factor (a copy of the rope
# parameters' own) and Gemma 3's sliding_window_pattern (layer_types).
IGNORED_FIELDS = {"_name_or_path", "architectures", "dtype", "transformers_version", "torch_dtype",
                  "use_cache", "initializer_range", "output_attentions", "output_hidden_states", "return_dict",
                  "partial_rotary_factor", "sliding_window_pattern", "_sliding_window_pattern"}


def test_cases_cover_every_table_architecture():
    covered = {re.sub(r"^gemma3_text$", "gemma3", config.model_type) for config, _ in CASES.values()}
    assert covered == set(ARCHITECTURES)


def random_model(config) -> torch.nn.Module:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        for param in model.parameters():  # norms and biases too: an unapplied offset must show
            param.normal_(0.0, 0.2)
    return model


@pytest.fixture(scope="module", params=list(CASES))
def case(request, tmp_path_factory):
    """The HF model, its GGUF, transformers' reading of the GGUF, our folder and our streamed tensors."""
    config, qtype = CASES[request.param]
    model = random_model(config)
    folder = tmp_path_factory.mktemp(request.param)
    write_gguf(model, folder / "model.gguf", qtype)
    from_gguf, info = AutoModelForCausalLM.from_pretrained(str(folder), gguf_file="model.gguf", dtype=torch.float32,
                                                           output_loading_info=True)
    ours = write_gguf_folder(folder / "model.gguf", folder / "hf")
    return {"id": request.param, "model": model, "qtype": qtype, "from_gguf": from_gguf, "info": info,
            "folder": ours, "streamed": dict(GGUFFormat().iter_weights(folder / "model.gguf"))}


def assert_stored_close(got: torch.Tensor, want: torch.Tensor, qtype: gguf.GGMLQuantizationType, name: str) -> None:
    """``got`` equals ``want`` up to the rounding of the type llama.cpp stored it as."""
    assert got.shape == want.shape and got.dtype == torch.float32, name
    if want.ndim == 1 or name.endswith("norm.weight") or qtype == F32:
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6, msg=name)  # F32; Gemma's +1 -1 rounds once
    elif qtype == F16:
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-7, msg=name)
    elif qtype == Q8_0:  # steps of absmax/127 per 32 values (half a step, plus a little for the fp16 scale)
        bound = want.reshape(-1, 32).abs().amax(dim=1, keepdim=True) / 127 * 0.6
        assert ((got - want).reshape(-1, 32).abs() <= bound).all(), name
    else:  # 4-bit blocks (along each row): what the gguf package's own quantization gives back
        stored = gguf.quants.dequantize(gguf.quants.quantize(want.numpy(), qtype), qtype)
        torch.testing.assert_close(got, torch.from_numpy(stored).reshape(want.shape), rtol=0, atol=1e-6, msg=name)


def test_transformers_reads_the_written_gguf(case):
    """The writer is right: transformers' own GGUF loader gets the model's weights back."""
    want, got = case["model"].state_dict(), case["from_gguf"].state_dict()
    missing = set(case["info"]["missing_keys"])
    gap = re.compile(TRANSFORMERS_GAPS.get(case["id"], "(?!)"))
    assert {name for name in (want.keys() ^ got.keys()) | missing if not gap.fullmatch(name)} == set()
    for name in got.keys() & want.keys() - missing:
        assert_stored_close(got[name], want[name], case["qtype"], name)


def test_streamed_tensors_are_the_models_state_dict(case):
    want = case["model"].state_dict()
    streamed = case["streamed"]
    tied = case["model"].config.tie_word_embeddings
    assert set(streamed) == set(want) - ({"lm_head.weight"} if tied else set())
    read_by_transformers = case["from_gguf"].state_dict()
    for name, tensor in streamed.items():
        assert_stored_close(tensor, want[name], case["qtype"], name)
        if name in read_by_transformers.keys() - set(case["info"]["missing_keys"]):
            assert torch.equal(tensor, read_by_transformers[name]), name  # the same bytes, the same values


def same_value(ours, ref) -> bool:
    """Equal, floats compared as the float32 a GGUF stores them in."""
    if isinstance(ours, float) or isinstance(ref, float):
        return ours is not None and ref is not None and np.float32(ours) == np.float32(ref)
    if isinstance(ours, dict) and isinstance(ref, dict):
        return ours.keys() == ref.keys() and all(same_value(ours[k], ref[k]) for k in ours)
    if isinstance(ours, list) and isinstance(ref, list):
        return len(ours) == len(ref) and all(map(same_value, ours, ref))
    return ours == ref


def test_config_folder_is_the_models_config(case):
    assert_config_is_models(case["model"], case["folder"])


def assert_config_is_models(model: torch.nn.Module, folder: Path) -> None:
    ref = model.config
    ours = AutoConfig.from_pretrained(str(folder))
    assert type(ours) is type(ref) and ours.architectures == [type(model).__name__]
    assert ours.dtype == torch.float32
    ours_fields, ref_fields = ours.to_dict(), ref.to_dict()
    # Classes without a head_dim field derive it as hidden_size / heads; ours states it.
    ref_fields.setdefault("head_dim", ref.hidden_size // ref.num_attention_heads)
    if "attention_factor" not in ref.rope_parameters and "attention_factor" in ours.rope_parameters:
        # LongRoPE's factor, which llama.cpp stores and transformers derives from the two lengths.
        stated = ours_fields["rope_parameters"].pop("attention_factor")
        assert same_value(stated, model.model.rotary_emb.attention_scaling)
    differing = {key for key in (ours_fields.keys() | ref_fields.keys()) - IGNORED_FIELDS
                 if not same_value(ours_fields.get(key), ref_fields.get(key))}
    assert not differing, {key: (ours_fields.get(key), ref_fields.get(key)) for key in differing}


@pytest.mark.parametrize("config_class, layers", [(Gemma2Config, 46), (Gemma3TextConfig, 62)])
def test_gemma_27b_scales_attention_by_hidden_size_over_heads(tmp_path, config_class, layers):
    """GGUF stores no query_pre_attn_scalar: llama.cpp tells the 27B models by their layer count and
    scales by hidden_size / heads there (8 here), by the head size (16) elsewhere."""
    model = random_model(config_class(**{**SMALL, "hidden_size": 32, "intermediate_size": 32,
                                         "num_hidden_layers": layers}, head_dim=16, query_pre_attn_scalar=8))
    write_gguf(model, tmp_path / "model.gguf")
    assert_config_is_models(model, write_gguf_folder(tmp_path / "model.gguf", tmp_path / "hf"))


def test_folder_tokenizer_is_transformers_gguf_tokenizer(case):
    ours = AutoTokenizer.from_pretrained(str(case["folder"]))
    ref = AutoTokenizer.from_pretrained(str(case["folder"].parent), gguf_file="model.gguf")
    for text in ("hello there", "  two spaces\nand a line", "café 🙂", "<s>hi</s>"):
        ids = ours.encode(text)
        assert ids == ref.encode(text), text
        assert ours.decode(ids, skip_special_tokens=True) == ref.decode(ids, skip_special_tokens=True), text


def test_our_config_and_weights_give_the_models_logits(case):
    """A model built from our config, running our weights, computes what the HF model computes with
    them: past the sliding windows and LongRoPE's original length (24 tokens)."""
    streamed, tied = case["streamed"], case["model"].config.tie_word_embeddings
    config = AutoConfig.from_pretrained(str(case["folder"]))
    ours = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    ref = type(case["model"])(case["model"].config).eval()
    for model in (ours, ref):
        missing, unexpected = model.load_state_dict(streamed, strict=False)
        assert (set(missing), unexpected) == ({"lm_head.weight"} if tied else set(), [])
    ids = torch.randint(0, VOCAB_SIZE, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, ref(ids).logits, rtol=0, atol=1e-5)


def test_config_records_what_transformers_cannot_rebuild(case):
    """Spot checks on fields GGUF keeps only implicitly (layer counts, tensor presence, 0 for none)."""
    raw = json.loads((case["folder"] / "config.json").read_text())
    expected = {"phi3-longrope": {"sliding_window": None},
                "gemma3-global": {"layer_types": ["full_attention"] * 2},
                "stablelm-2-12b": {"use_parallel_residual": True, "qk_layernorm": True, "use_qkv_bias": False},
                "starcoder2-no-bias": {"use_bias": False, "tie_word_embeddings": False}}.get(case["id"], {})
    assert {key: raw[key] for key in expected} == expected


# ---- files the table refuses ----

def _write_header_only(path: Path, arch: str, **keys) -> None:
    writer = gguf.GGUFWriter(str(path), arch)
    for key, value in keys.items():
        writer.add_uint32(f"{arch}.{key}", value)
    writer.add_tensor("token_embd.weight", np.zeros((4, 32), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_unsupported_architecture_names_the_supported_ones(tmp_path):
    path = tmp_path / "other.gguf"
    _write_header_only(path, "mamba", block_count=1)
    for read in (lambda: write_gguf_folder(path, tmp_path / "out"), lambda: list(GGUFFormat().iter_weights(path))):
        with pytest.raises(ValueError, match=rf"{re.escape(str(path))}.*'mamba' is not supported.*qwen2"):
            read()
    assert not (tmp_path / "out").exists()


def test_partial_rotary_is_refused_where_the_model_rotates_whole_heads(tmp_path):
    path = tmp_path / "qwen2.gguf"
    _write_header_only(path, "qwen2", embedding_length=32, **{"attention.head_count": 2, "rope.dimension_count": 8},
                       block_count=1, feed_forward_length=64, context_length=64)
    with pytest.raises(ValueError, match=r"qwen2\.rope\.dimension_count is 8 but the head size is 16"):
        write_gguf_folder(path, tmp_path / "out")


def test_missing_required_key_is_named(tmp_path):
    path = tmp_path / "gemma2.gguf"
    _write_header_only(path, "gemma2", embedding_length=32, block_count=1, feed_forward_length=64, context_length=64,
                       **{"attention.head_count": 2})
    with pytest.raises(ValueError, match=r"lacks gemma2\.attention\.layer_norm_rms_epsilon"):
        write_gguf_folder(path, tmp_path / "out")


@pytest.mark.parametrize("load_format", ["gguf", "gguf_quantized"])
def test_engine_serves_the_gguf_as_the_model_computes(case, load_format):
    """End to end: the engine, given the GGUF file, picks the architecture's model plugin and
    generates the greedy tokens of the HF model holding the same (stored) weights, for a batch
    of prompts past the sliding windows and prefill chunks; with the weights dequantized at load
    (``gguf``) or the linear layers keeping their stored blocks (``gguf_quantized``)."""
    ref = type(case["model"])(case["model"].config).eval()
    ref.load_state_dict(case["streamed"], strict=False)
    rng = torch.Generator().manual_seed(2)
    prompts = [torch.randint(3, VOCAB_SIZE, (n,), generator=rng).tolist() for n in (3, 17, 30)]
    with Engine(str(case["folder"].parent / "model.gguf"), load_format=load_format, chunked_prefill_size=8) as engine:
        results = engine.generate(input_ids=prompts, sampling_params={"temperature": 0, "ignore_eos": True,
                                                                      "max_new_tokens": 6})
        engine.check_memory()
    for prompt, result in zip(prompts, results):
        ids = list(prompt)
        with torch.no_grad():
            for _ in range(6):
                ids.append(int(ref(torch.tensor([ids])).logits[0, -1].argmax()))
        assert result["output_ids"] == ids[len(prompt):], f"prompt of {len(prompt)} tokens"

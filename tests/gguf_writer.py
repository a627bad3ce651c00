"""Write a Hugging Face model as a GGUF file the way llama.cpp's ``convert_hf_to_gguf.py`` does.

Test-side reference for the ``gguf`` weight format: for each architecture it mirrors the converter's
metadata keys (``set_gguf_parameters``) and its tensor changes (``modify_tensors``: Llama's q/k row
permutation, +1 on Gemma's norm weights, StableLM's per-head norms stacked, Phi-3's LongRoPE factors
as tensors). Tensor names come from the ``gguf`` package's own ``TensorNameMap`` (llama.cpp's table).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Iterator

import gguf
import numpy as np
import torch

# Hugging Face model_type -> GGUF architecture.
GGUF_ARCH = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "phi3": "phi3", "gemma2": "gemma2",
             "gemma3_text": "gemma3", "stablelm": "stablelm", "starcoder2": "starcoder2"}
F32, F16, Q8_0 = gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16, gguf.GGMLQuantizationType.Q8_0
Q4_0, Q4_1 = gguf.GGMLQuantizationType.Q4_0, gguf.GGMLQuantizationType.Q4_1


SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<|eot|>"]


def tokenizer_metadata(writer: gguf.GGUFWriter) -> int:
    """A byte-level BPE vocabulary (4 specials, 256 bytes, one merge); returns its size."""
    from tokenizers import pre_tokenizers

    tokens = SPECIAL_TOKENS + sorted(pre_tokenizers.ByteLevel.alphabet()) + ["he"]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([gguf.TokenType.CONTROL] * len(SPECIAL_TOKENS)
                           + [gguf.TokenType.NORMAL] * (len(tokens) - len(SPECIAL_TOKENS)))
    writer.add_token_merges(["h e"])
    _special_token_ids(writer)
    return len(tokens)


def sentencepiece_metadata(writer: gguf.GGUFWriter) -> int:
    """A sentencepiece vocabulary as llama.cpp's _set_vocab_sentencepiece writes one (4 specials, 256
    byte pieces, the word-start piece); returns its size."""
    tokens = SPECIAL_TOKENS + [f"<0x{byte:02X}>" for byte in range(256)] + ["\u2581"]
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores([0.0] * (len(tokens) - 1) + [-1.0])
    writer.add_token_types([gguf.TokenType.UNKNOWN] + [gguf.TokenType.CONTROL] * 3 + [gguf.TokenType.BYTE] * 256
                           + [gguf.TokenType.NORMAL])
    _special_token_ids(writer)
    return len(tokens)


def _special_token_ids(writer: gguf.GGUFWriter) -> None:
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_eot_token_id(3)
    writer.add_unk_token_id(0)
    writer.add_chat_template("{% for m in messages %}<s>{{ m['content'] }}</s>{% endfor %}")


VOCAB_SIZE = 261  # both vocabularies' size: a model written here must have this many rows


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's q/k permutation for Llama (rotate-half -> interleaved rope rows)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(model: torch.nn.Module, path: Path, qtype: gguf.GGMLQuantizationType = F32) -> None:
    """Write ``model`` (a ``*ForCausalLM``) to ``path``; matrices as ``qtype``, vectors always F32."""
    hparams = model.config.to_dict()
    arch = GGUF_ARCH[hparams["model_type"]]
    writer = gguf_with_metadata(model.config, path)
    model_arch = next(key for key, value in gguf.MODEL_ARCH_NAMES.items() if value == arch)
    name_map = gguf.get_tensor_name_map(model_arch, hparams["num_hidden_layers"])
    for name, data in _converted_tensors(arch, model, hparams):
        _add_tensor(writer, name_map.get_name(name, try_suffixes=(".weight", ".bias")), data, qtype)
    finish_gguf(writer)


def gguf_with_metadata(config, path: Path) -> gguf.GGUFWriter:
    """A writer for ``path`` holding the tokenizer and the metadata llama.cpp writes for ``config``
    (a Hugging Face config); add the tensors, then ``finish_gguf``."""
    hparams = config.to_dict()
    arch = GGUF_ARCH[hparams["model_type"]]
    writer = gguf.GGUFWriter(str(path), arch)
    # llama.cpp writes Gemma's and Phi-3's tokenizer.model as sentencepiece, and tokenizer.json as BPE.
    if arch in ("gemma2", "gemma3", "phi3"):
        assert sentencepiece_metadata(writer) == hparams["vocab_size"]
        if arch != "phi3":
            writer.add_add_space_prefix(False)
    else:
        assert tokenizer_metadata(writer) == hparams["vocab_size"]
    if hparams.get("pad_token_id") is not None:  # SpecialVocab copies the tokenizer's pad token
        writer.add_pad_token_id(hparams["pad_token_id"])
    _METADATA[arch](writer, hparams)
    return writer


def finish_gguf(writer: gguf.GGUFWriter) -> None:
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _add_tensor(writer: gguf.GGUFWriter, name: str | None, data: np.ndarray, qtype: gguf.GGMLQuantizationType) -> None:
    assert name is not None, "no llama.cpp name"
    if data.ndim == 1 or name.endswith("norm.weight") or qtype == F32:
        writer.add_tensor(name, data.astype(np.float32))
    elif qtype == F16:
        writer.add_tensor(name, data.astype(np.float16))
    else:
        writer.add_tensor(name, gguf.quants.quantize(data.astype(np.float32), qtype), raw_dtype=qtype)


def _converted_tensors(arch: str, model: torch.nn.Module, hparams: dict[str, Any]) -> Iterator[tuple[str, np.ndarray]]:
    """``modify_tensors`` of each converter class, on the checkpoint's tensors (a tied head is not one)."""
    state = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    if hparams["tie_word_embeddings"] or arch == "gemma2":  # llama.cpp skips Gemma 2's lm_head outright
        state.pop("lm_head.weight", None)
    heads, kv_heads = hparams["num_attention_heads"], hparams["num_key_value_heads"]
    for name, data in state.items():
        if arch == "llama" and name.endswith(("q_proj.weight", "q_proj.bias")):
            data = llama_cpp_permute(data, heads)
        elif arch == "llama" and name.endswith(("k_proj.weight", "k_proj.bias")):
            data = llama_cpp_permute(data, kv_heads)
        elif arch in ("gemma2", "gemma3") and name.endswith("norm.weight"):
            data = data + 1
        elif arch == "stablelm" and ".norms." in name:
            # Stacked once per layer: the per-head norms into one [heads, head_dim] tensor.
            if not name.endswith(".norms.0.weight"):
                continue
            module = name.removesuffix(".norms.0.weight")
            count = heads if module.endswith("q_layernorm") else kv_heads
            name, data = f"{module}.weight", np.stack([state[f"{module}.norms.{h}.weight"] for h in range(count)])
        yield name, data
    if arch == "phi3" and (long_factor := hparams["rope_parameters"].get("long_factor")):
        yield "rope_factors_long.weight", np.array(long_factor, np.float32)
        yield "rope_factors_short.weight", np.array(hparams["rope_parameters"]["short_factor"], np.float32)


# ---- set_gguf_parameters, per converter class (the order of the keys does not matter) ----

def _put(w: gguf.GGUFWriter, h: dict[str, Any], **keys: str) -> None:
    """``w.add_<key>(h[<hparam>])`` for each ``key=hparam``."""
    for key, hparam in keys.items():
        getattr(w, f"add_{key}")(h[hparam])


def _sizes(w: gguf.GGUFWriter, h: dict[str, Any]) -> None:
    """The size keys every converter writes."""
    _put(w, h, block_count="num_hidden_layers", context_length="max_position_embeddings",
         embedding_length="hidden_size", feed_forward_length="intermediate_size", head_count="num_attention_heads",
         head_count_kv="num_key_value_heads")


def _text_model(w: gguf.GGUFWriter, h: dict[str, Any]) -> None:
    """TextModel.set_gguf_parameters (Qwen2, Qwen3, StarCoder2 use it as is)."""
    _sizes(w, h)
    rope = h["rope_parameters"].get("full_attention", h["rope_parameters"])
    if rope.get("rope_type") == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(rope["factor"])
    elif rope.get("rope_type") == "yarn":
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(rope["factor"])
        w.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
        if "beta_fast" in rope:
            w.add_rope_scaling_yarn_beta_fast(rope["beta_fast"])
        if "beta_slow" in rope:
            w.add_rope_scaling_yarn_beta_slow(rope["beta_slow"])
    w.add_rope_freq_base(rope["rope_theta"])
    if (local := h["rope_parameters"].get("sliding_attention")) is not None:
        w.add_rope_freq_base_swa(local["rope_theta"])
    if "rms_norm_eps" in h:
        w.add_layer_norm_rms_eps(h["rms_norm_eps"])
    if (eps := h.get("layer_norm_eps", h.get("norm_epsilon"))) is not None:
        w.add_layer_norm_eps(eps)
    if h.get("head_dim") is not None:
        w.add_key_length(h["head_dim"])
        w.add_value_length(h["head_dim"])


def _llama(w: gguf.GGUFWriter, h: dict[str, Any]) -> None:
    _text_model(w, h)
    w.add_vocab_size(h["vocab_size"])
    w.add_rope_dimension_count(h.get("head_dim") or h["hidden_size"] // h["num_attention_heads"])


def _phi3(w: gguf.GGUFWriter, h: dict[str, Any]) -> None:
    # TextModel.__init__ copies a top-level original_max_position_embeddings into the rope parameters.
    rope = {"original_max_position_embeddings": h["original_max_position_embeddings"], **h["rope_parameters"]}
    rope_dims = int(rope.get("partial_rotary_factor", 1.0) * h["hidden_size"]) // h["num_attention_heads"]
    _sizes(w, h)
    w.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
    w.add_layer_norm_rms_eps(h["rms_norm_eps"])
    w.add_rope_dimension_count(rope_dims)
    w.add_rope_freq_base(rope["rope_theta"])
    w.add_sliding_window(h.get("sliding_window") or 0)
    if rope.get("long_factor"):
        scale = h["max_position_embeddings"] / rope["original_max_position_embeddings"]
        orig = rope["original_max_position_embeddings"]
        w.add_rope_scaling_attn_factors(math.sqrt(1 + math.log(scale) / math.log(orig)) if scale > 1.0 else 1.0)


def _gemma2(w: gguf.GGUFWriter, h: dict[str, Any]) -> None:
    _sizes(w, h)
    _put(w, h, layer_norm_rms_eps="rms_norm_eps", key_length="head_dim", value_length="head_dim",
         attn_logit_softcapping="attn_logit_softcapping", final_logit_softcapping="final_logit_softcapping",
         sliding_window="sliding_window")


def _gemma3(w: gguf.GGUFWriter, h: dict[str, Any]) -> None:
    _text_model(w, h)  # the keys below overwrite some of its values
    w.add_rope_freq_base(h["rope_parameters"]["full_attention"]["rope_theta"])
    if h.get("final_logit_softcapping"):
        w.add_final_logit_softcapping(h["final_logit_softcapping"])
    if h.get("_sliding_window_pattern") != 1:
        w.add_sliding_window(h["sliding_window"])


def _stablelm(w: gguf.GGUFWriter, h: dict[str, Any]) -> None:
    _sizes(w, h)
    head_dim = h["hidden_size"] // h["num_attention_heads"]
    w.add_rope_dimension_count(int(h["rope_parameters"]["partial_rotary_factor"] * head_dim))
    w.add_parallel_residual(h["use_parallel_residual"])
    w.add_layer_norm_eps(h["layer_norm_eps"])


_METADATA = {"llama": _llama, "qwen2": _text_model, "qwen3": _text_model, "phi3": _phi3, "gemma2": _gemma2,
             "gemma3": _gemma3, "stablelm": _stablelm, "starcoder2": _text_model}

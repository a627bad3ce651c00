"""What each GGUF architecture (``general.architecture``) means as a Hugging Face model: one entry of
``ARCHITECTURES`` per architecture, holding its config fields (from the GGUF's metadata), its tensor
names and the fixes llama.cpp's converter asks for (un-permuted q/k rows, Gemma's norm offset, ...).

``gguf_convert`` writes the config from an entry; the ``gguf`` weight format streams the tensors under
the entry's names. Adding an architecture is one entry here.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import numpy as np

TensorFix = Callable[[str, np.ndarray, "GGUFMetadata"], Iterator[tuple[str, np.ndarray]]]


class GGUFMetadata:
    """An open GGUF's metadata (keys of its own architecture read without the prefix) and tensor list."""

    def __init__(self, reader, path: Path):
        self.reader, self.path = reader, path
        self.arch = self.field("general.architecture")
        self.tensors = {tensor.name: tensor for tensor in reader.tensors}

    def field(self, key: str, default: Any = None) -> Any:
        """A metadata value under its full key (``"tokenizer.ggml.bos_token_id"``), or ``default``."""
        found = self.reader.fields.get(key)
        return default if found is None else found.contents()

    def get(self, key: str, default: Any = None) -> Any:
        """A value of this architecture (``get("block_count")`` reads ``"<arch>.block_count"``)."""
        return self.field(f"{self.arch}.{key}", default)

    def need(self, key: str) -> Any:
        value = self.get(key)
        if value is None:
            raise ValueError(f"{self.path}: GGUF metadata lacks {self.arch}.{key}")
        return value

    def has(self, tensor_name: str) -> bool:
        return tensor_name in self.tensors

    def values(self, tensor_name: str) -> np.ndarray:
        """A small float tensor's values (rope factors), as stored."""
        return np.asarray(self.tensors[tensor_name].data, np.float64)

    def vocab_size(self) -> int:
        """The embedding's row count: llama.cpp's converters may cut a vocabulary's unused rows."""
        if (embedding := self.tensors.get("token_embd.weight")) is not None:
            return int(embedding.shape[-1])  # GGUF lists dims innermost first
        tokens = self.field("tokenizer.ggml.tokens")
        size = self.get("vocab_size") or (len(tokens) if tokens else None)
        if size is None:
            raise ValueError(f"{self.path}: GGUF metadata gives no vocabulary size")
        return size


def _as_stored(name: str, data: np.ndarray, meta: GGUFMetadata) -> Iterator[tuple[str, np.ndarray]]:
    yield name, data


@dataclass(frozen=True)
class GGUFArchitecture:
    """One GGUF architecture as a Hugging Face ``*ForCausalLM``: its config, its tensor names, its fixes."""

    hf_architecture: str  # config.architectures[0]
    model_type: str
    config: Callable[[GGUFMetadata], dict[str, Any]]  # the Hugging Face config's fields
    block_tensors: Mapping[str, str]  # blk.N.<stem> -> model.layers.N.<module path>
    fix_tensor: TensorFix = _as_stored  # (HF name, stored data) -> the HF tensor(s)
    # Tensors that the config carries instead (rope factors); they are not weights of the model.
    config_tensors: frozenset[str] = frozenset({"rope_freqs"})


def architecture_of(meta: GGUFMetadata) -> GGUFArchitecture:
    if meta.arch not in ARCHITECTURES:
        raise ValueError(f"{meta.path}: GGUF architecture {meta.arch!r} is not supported "
                         f"(supported: {', '.join(sorted(ARCHITECTURES))})")
    return ARCHITECTURES[meta.arch]


# ---- config fields ----

def _decoder_config(meta: GGUFMetadata, head_dim: int | None = None, partial_rotary: bool = False) -> dict[str, Any]:
    """The fields every decoder shares. ``partial_rotary``: the model honours ``partial_rotary_factor``;
    otherwise a rotary size other than the head size is refused rather than silently widened."""
    hidden, heads = meta.need("embedding_length"), meta.need("attention.head_count")
    head_dim = head_dim or meta.get("attention.key_length") or hidden // heads
    config = {
        "vocab_size": meta.vocab_size(),
        "hidden_size": hidden,
        "intermediate_size": meta.need("feed_forward_length"),
        "num_hidden_layers": meta.need("block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": meta.get("attention.head_count_kv", heads),
        "head_dim": head_dim,
        "max_position_embeddings": meta.need("context_length"),
        "rope_theta": float(meta.get("rope.freq_base", 10000.0)),  # llama.cpp's default when absent
        "tie_word_embeddings": not meta.has("output.weight"),
    }
    rotary = meta.get("rope.dimension_count", head_dim)
    if partial_rotary:
        config["partial_rotary_factor"] = rotary / head_dim
    elif rotary != head_dim:
        raise ValueError(f"{meta.path}: {meta.arch}.rope.dimension_count is {rotary} but the head size is {head_dim}; "
                         f"{meta.arch} rotates whole heads")
    return config


def _llama_config(meta: GGUFMetadata) -> dict[str, Any]:
    if meta.get("expert_count", 0):
        raise ValueError(f"{meta.path}: mixture-of-experts llama GGUFs are not supported")
    config = _decoder_config(meta, head_dim=meta.get("attention.key_length") or meta.get("rope.dimension_count"))
    return config | {"hidden_act": "silu", "rms_norm_eps": float(meta.get("attention.layer_norm_rms_epsilon", 1e-5)),
                     "attention_bias": meta.has("blk.0.attn_q.bias"), "mlp_bias": False}


def _qwen2_config(meta: GGUFMetadata) -> dict[str, Any]:
    # Qwen2's q/k/v always carry a bias: its config has no switch for it.
    return _decoder_config(meta) | {"hidden_act": "silu",
                                    "rms_norm_eps": float(meta.need("attention.layer_norm_rms_epsilon"))}


def _qwen3_config(meta: GGUFMetadata) -> dict[str, Any]:
    return _qwen2_config(meta) | {"attention_bias": meta.has("blk.0.attn_q.bias")}


def _phi3_config(meta: GGUFMetadata) -> dict[str, Any]:
    config = _decoder_config(meta, partial_rotary=True)
    config |= {"hidden_act": "silu", "rms_norm_eps": float(meta.need("attention.layer_norm_rms_epsilon")),
               # llama.cpp writes 0 for "no window" (Phi-4).
               "sliding_window": meta.get("attention.sliding_window") or None,
               "original_max_position_embeddings": meta.get("rope.scaling.original_context_length",
                                                            config["max_position_embeddings"])}
    if meta.has("rope_factors_long.weight"):  # LongRoPE (the 128k models): per-frequency factors as tensors
        scaling = {"rope_type": "longrope", "long_factor": meta.values("rope_factors_long.weight").tolist(),
                   "short_factor": meta.values("rope_factors_short.weight").tolist()}
        if (attention_factor := meta.get("rope.scaling.attn_factor")) is not None:
            scaling["attention_factor"] = float(attention_factor)
        config["rope_scaling"] = scaling
    return config


def _gemma_config(meta: GGUFMetadata, layers_of_27b: int) -> dict[str, Any]:
    config = _decoder_config(meta)
    # GGUF has no query_pre_attn_scalar; llama.cpp scales by the head size except for the 27B models
    # (told apart by their layer count), which scale by hidden_size / heads.
    is_27b = config["num_hidden_layers"] == layers_of_27b
    scalar = config["hidden_size"] // config["num_attention_heads"] if is_27b else config["head_dim"]
    return config | {"hidden_activation": "gelu_pytorch_tanh", "query_pre_attn_scalar": scalar,
                     "rms_norm_eps": float(meta.need("attention.layer_norm_rms_epsilon")), "attention_bias": False}


def _layer_types(layers: int, sliding_period: int) -> list[str]:
    """Every ``sliding_period``-th layer global, the others sliding (llama.cpp's swa pattern)."""
    return ["full_attention" if (i + 1) % sliding_period == 0 else "sliding_attention" for i in range(layers)]


def _gemma2_config(meta: GGUFMetadata) -> dict[str, Any]:
    config = _gemma_config(meta, layers_of_27b=46)
    # The defaults are llama.cpp's (and Gemma 2's) for files that leave the keys out.
    return config | {"sliding_window": meta.get("attention.sliding_window", 4096),
                     "layer_types": _layer_types(config["num_hidden_layers"], 2),
                     "attn_logit_softcapping": float(meta.get("attn_logit_softcapping", 50.0)),
                     "final_logit_softcapping": float(meta.get("final_logit_softcapping", 30.0))}


def _gemma3_config(meta: GGUFMetadata) -> dict[str, Any]:
    config = _gemma_config(meta, layers_of_27b=62)
    # No window: every layer global (the file of a sliding_window_pattern 1 model); the config keeps
    # its class's window then, which no layer uses.
    window = meta.get("attention.sliding_window")
    softcap = meta.get("final_logit_softcapping")
    return config | ({"sliding_window": window} if window else {}) | {
        "layer_types": _layer_types(config["num_hidden_layers"], 6 if window else 1),
        "rope_local_base_freq": float(meta.get("rope.freq_base_swa", 10000.0)),
        "final_logit_softcapping": None if softcap is None else float(softcap)}


def _stablelm_config(meta: GGUFMetadata) -> dict[str, Any]:
    return _decoder_config(meta, partial_rotary=True) | {
        "hidden_act": "silu",
        "layer_norm_eps": float(meta.need("attention.layer_norm_epsilon")),
        "use_qkv_bias": meta.has("blk.0.attn_q.bias"),
        "qk_layernorm": meta.has("blk.0.attn_q_norm.weight"),
        # llama.cpp runs the parallel residual wherever a block has no ffn_norm.
        "use_parallel_residual": not meta.has("blk.0.ffn_norm.weight"),
    }


def _starcoder2_config(meta: GGUFMetadata) -> dict[str, Any]:
    # llama.cpp stores no sliding window for StarCoder2 and attends to the whole context.
    return _decoder_config(meta) | {"hidden_act": "gelu_pytorch_tanh",
                                    "norm_epsilon": float(meta.need("attention.layer_norm_epsilon")),
                                    "use_bias": meta.has("blk.0.attn_q.bias"), "sliding_window": None}


# ---- tensor fixes: each turns a stored tensor back into the Hugging Face tensor(s) ----

def _unpermute_qk(name: str, data: np.ndarray, meta: GGUFMetadata) -> Iterator[tuple[str, np.ndarray]]:
    """Undo llama.cpp's q/k row permutation (it interleaves each head's two rotary halves):
    llama.cpp stores ``w.reshape(n_head, 2, rows // n_head // 2, ...).swapaxes(1, 2)``."""
    heads = meta.need("attention.head_count")
    if ".self_attn.q_proj." in name:
        data = _interleaved_to_halves(data, heads)
    elif ".self_attn.k_proj." in name:
        data = _interleaved_to_halves(data, meta.get("attention.head_count_kv", heads))
    yield name, data


def _interleaved_to_halves(w: np.ndarray, n_head: int) -> np.ndarray:
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _remove_norm_offset(name: str, data: np.ndarray, meta: GGUFMetadata) -> Iterator[tuple[str, np.ndarray]]:
    """Gemma's RMSNorm scales by ``1 + weight``; llama.cpp stores ``1 + weight`` itself."""
    yield name, (data - np.float32(1.0) if name.endswith("norm.weight") else data)


def _split_per_head_norms(name: str, data: np.ndarray, meta: GGUFMetadata) -> Iterator[tuple[str, np.ndarray]]:
    """StableLM's per-head q/k LayerNorms, which llama.cpp stacks into one [heads, head_dim] tensor."""
    module, _, kind = name.rpartition(".")
    if module.endswith(("q_layernorm", "k_layernorm")):
        for head, row in enumerate(data):
            yield f"{module}.norms.{head}.{kind}", row
    else:
        yield name, data


# ---- the table ----

_LLAMA_BLOCK = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_QK_NORM = {"attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm"}
# Gemma 2/3 norm both sides of attention and of the MLP; llama.cpp's ffn_norm is the pre-MLP one.
_GEMMA_BLOCK = _LLAMA_BLOCK | {"post_attention_norm": "post_attention_layernorm",
                               "ffn_norm": "pre_feedforward_layernorm",
                               "post_ffw_norm": "post_feedforward_layernorm"}

ARCHITECTURES: dict[str, GGUFArchitecture] = {
    "llama": GGUFArchitecture("LlamaForCausalLM", "llama", _llama_config, _LLAMA_BLOCK, _unpermute_qk),
    "qwen2": GGUFArchitecture("Qwen2ForCausalLM", "qwen2", _qwen2_config, _LLAMA_BLOCK),
    "qwen3": GGUFArchitecture("Qwen3ForCausalLM", "qwen3", _qwen3_config, _LLAMA_BLOCK | _QK_NORM),
    # Phi-3 keeps its fused projections: ffn_up holds gate and up stacked, as mlp.gate_up_proj.
    "phi3": GGUFArchitecture(
        "Phi3ForCausalLM", "phi3", _phi3_config,
        {"attn_norm": "input_layernorm", "attn_qkv": "self_attn.qkv_proj", "attn_output": "self_attn.o_proj",
         "ffn_norm": "post_attention_layernorm", "ffn_up": "mlp.gate_up_proj", "ffn_down": "mlp.down_proj"},
        config_tensors=frozenset({"rope_freqs", "rope_factors_long", "rope_factors_short"})),
    "gemma2": GGUFArchitecture("Gemma2ForCausalLM", "gemma2", _gemma2_config, _GEMMA_BLOCK, _remove_norm_offset),
    "gemma3": GGUFArchitecture("Gemma3ForCausalLM", "gemma3_text", _gemma3_config, _GEMMA_BLOCK | _QK_NORM,
                               _remove_norm_offset),
    "stablelm": GGUFArchitecture(
        "StableLmForCausalLM", "stablelm", _stablelm_config,
        _LLAMA_BLOCK | {"attn_q_norm": "self_attn.q_layernorm", "attn_k_norm": "self_attn.k_layernorm"},
        _split_per_head_norms),
    "starcoder2": GGUFArchitecture(
        "Starcoder2ForCausalLM", "starcoder2", _starcoder2_config,
        {**{k: v for k, v in _LLAMA_BLOCK.items() if k != "ffn_gate"}, "ffn_up": "mlp.c_fc", "ffn_down": "mlp.c_proj"}),
}

"""Stream a llama GGUF's tensors under their Hugging Face names, dequantized one at a time.

The config and tokenizer come from the GGUF's metadata, written once into a cached folder
(``sglang_core.weights.default_model.gguf_to_cached_folder``); the weights are read from the GGUF
itself at every load, never converted into a second copy.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from sglang_core.weights.default_model import gguf_to_cached_folder
from sglang_core.weights.format import WeightFormat
from sglang_core.weights.gguf_convert import gguf_field, open_gguf

# GGUF block tensor name -> Hugging Face module path inside model.layers.N.
_LAYER_TENSORS = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GLOBAL_TENSORS = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_BLOCK_RE = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")


class GGUFFormat(WeightFormat):
    def claims(self, path: Path) -> bool:
        if path.is_file():
            return path.suffix == ".gguf"
        return path.is_dir() and len(list(path.glob("*.gguf"))) == 1

    def config_folder(self, path: Path) -> Path:
        return gguf_to_cached_folder(_gguf_file(path))

    def iter_weights(self, path: Path) -> Iterator[tuple[str, torch.Tensor]]:
        file = _gguf_file(path)
        reader = open_gguf(file)
        heads = gguf_field(reader, "llama.attention.head_count")
        kv_heads = gguf_field(reader, "llama.attention.head_count_kv", heads)
        for tensor in reader.tensors:
            name = _hf_name(tensor.name, file)
            if name is None:
                continue
            data = _dequantize(tensor, file)
            if ".self_attn.q_proj." in name:
                data = _unpermute(data, heads)
            elif ".self_attn.k_proj." in name:
                data = _unpermute(data, kv_heads)
            # F32 data is a read-only view of the mapped file; torch needs a writable array.
            yield name, torch.from_numpy(np.require(data, np.float32, ["C", "W"]))


def _gguf_file(path: Path) -> Path:
    if path.is_file():
        return path
    found = sorted(path.glob("*.gguf"))
    if len(found) != 1:
        raise ValueError(f"model_path {str(path)!r}: load_format gguf needs exactly one .gguf file, found {len(found)}")
    return found[0]


def _hf_name(gguf_name: str, path: Path) -> str | None:
    """The Hugging Face name of a GGUF tensor, or None for one that the config replaces."""
    if gguf_name == "rope_freqs.weight":
        return None  # carried by config.rope_scaling
    stem, _, kind = gguf_name.rpartition(".")
    if stem in _GLOBAL_TENSORS and kind in ("weight", "bias"):
        return f"{_GLOBAL_TENSORS[stem]}.{kind}"
    match = _BLOCK_RE.fullmatch(gguf_name)
    if match and match[2] in _LAYER_TENSORS:
        return f"model.layers.{match[1]}.{_LAYER_TENSORS[match[2]]}.{match[3]}"
    raise ValueError(f"{path}: tensor {gguf_name!r} has no llama equivalent")


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation (it interleaves each head's two rotary halves).

    llama.cpp: ``w.reshape(n_head, 2, d // n_head // 2, ...).swapaxes(1, 2)``; this is its inverse.
    """
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _dequantize(tensor, path: Path) -> np.ndarray:
    from gguf.quants import dequantize

    try:
        data = dequantize(tensor.data, tensor.tensor_type)
    except NotImplementedError as exc:
        raise ValueError(f"{path}: tensor {tensor.name!r}: {exc}") from None
    except ValueError as exc:  # data cut short: a truncated file
        raise ValueError(f"{path}: tensor {tensor.name!r} cannot be read: {exc}") from None
    # GGUF lists dims innermost first; Hugging Face wants [out, in].
    return data.reshape(tuple(int(d) for d in reversed(tensor.shape)))

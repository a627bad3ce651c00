"""Stream a GGUF's tensors under their Hugging Face names, one at a time: ``GGUFFormat`` dequantizes
every tensor to float32; ``GGUFQuantizedFormat`` passes the linear layers' weights on as their
stored ggml blocks, for the ``gguf`` quant method (``plugins/quant/gguf``) to keep.

Which names, and which fixes each tensor needs (llama.cpp's q/k permutation, Gemma's norm offset, ...),
come from the file's architecture entry in ``sglang_core.weights.gguf_architectures``.

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
from sglang_core.weights.gguf_architectures import GGUFArchitecture, GGUFMetadata, architecture_of
from sglang_core.weights.gguf_convert import open_gguf

_GLOBAL_TENSORS = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_BLOCK_RE = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")


class GGUFFormat(WeightFormat):
    """Every tensor dequantized to float32 as it is read."""

    def claims(self, path: Path) -> bool:
        if path.is_file():
            return path.suffix == ".gguf"
        return path.is_dir() and len(list(path.glob("*.gguf"))) == 1

    def config_folder(self, path: Path) -> Path:
        return gguf_to_cached_folder(_gguf_file(path))

    def iter_weights(self, path: Path) -> Iterator[tuple[str, torch.Tensor]]:
        file = _gguf_file(path)
        meta = GGUFMetadata(open_gguf(file), file)
        arch = architecture_of(meta)
        for tensor in meta.tensors.values():
            name = _hf_name(tensor.name, arch, meta)
            if name is None:
                continue
            yield from self._tensors(name, tensor, arch, meta)

    def _tensors(self, name: str, tensor, arch: GGUFArchitecture,
                 meta: GGUFMetadata) -> Iterator[tuple[str, torch.Tensor]]:
        for hf_name, data in arch.fix_tensor(name, _dequantize(tensor, meta.path), meta):
            # F32 data is a read-only view of the mapped file; torch needs a writable array.
            yield hf_name, torch.from_numpy(np.require(data, np.float32, ["C", "W"]))


class GGUFQuantizedFormat(GGUFFormat):
    """Linear layers' weights as their stored blocks, the rest dequantized as ``GGUFFormat`` does.

    A linear weight (a block tensor's 2-D ``weight`` that is no norm, the token embedding, the LM
    head) of any ggml type, F16/F32 included, becomes ``<layer>.qweight`` (its rows' bytes, ``[rows, row_bytes]`` uint8) and
    ``<layer>.qweight_type`` (the ggml type); the config folder carries
    ``quantization_config: {"quant_method": "gguf", "blocks": "ggml"}``, so the engine builds those
    layers and tables with the ``gguf`` quant method. Norms and biases are dequantized to float32
    at load. The architecture's fixes apply to the bytes:
    llama.cpp's q/k permutation moves whole rows, and a row's blocks run along the input features,
    so permuting byte rows permutes weight rows.
    """

    QUANTIZATION_CONFIG = {"quantization_config": {"quant_method": "gguf", "blocks": "ggml"}}

    def config_folder(self, path: Path) -> Path:
        return gguf_to_cached_folder(_gguf_file(path), self.QUANTIZATION_CONFIG)

    def _tensors(self, name: str, tensor, arch: GGUFArchitecture,
                 meta: GGUFMetadata) -> Iterator[tuple[str, torch.Tensor]]:
        stem, _, kind = tensor.name.rpartition(".")
        matrix = stem.startswith("blk.") or stem in ("token_embd", "output")
        if not (matrix and kind == "weight" and len(tensor.shape) == 2 and not stem.endswith("norm")):
            yield from super()._tensors(name, tensor, arch, meta)
            return
        if tensor.data.nbytes != tensor.n_bytes:
            raise ValueError(f"{meta.path}: tensor {tensor.name!r} cannot be read: {tensor.data.nbytes} of its "
                             f"{tensor.n_bytes} bytes are in the file")
        rows = int(tensor.shape[1])  # GGUF lists dims innermost first
        blocks = np.ascontiguousarray(tensor.data).view(np.uint8).reshape(rows, -1)
        for hf_name, data in arch.fix_tensor(name, blocks, meta):
            layer = hf_name.removesuffix(".weight")
            yield f"{layer}.qweight_type", torch.tensor(int(tensor.tensor_type), dtype=torch.int32)
            yield f"{layer}.qweight", torch.from_numpy(np.require(data, np.uint8, ["C", "W"]))


def _gguf_file(path: Path) -> Path:
    if path.is_file():
        return path
    found = sorted(path.glob("*.gguf"))
    if len(found) != 1:
        raise ValueError(f"model_path {str(path)!r}: load_format gguf needs exactly one .gguf file, found {len(found)}")
    return found[0]


def _hf_name(gguf_name: str, arch: GGUFArchitecture, meta: GGUFMetadata) -> str | None:
    """The Hugging Face name of a GGUF tensor, or None for one that the config replaces."""
    stem, _, kind = gguf_name.rpartition(".")
    if stem in arch.config_tensors:
        return None
    if stem in _GLOBAL_TENSORS and kind in ("weight", "bias"):
        return f"{_GLOBAL_TENSORS[stem]}.{kind}"
    match = _BLOCK_RE.fullmatch(gguf_name)
    if match and match[2] in arch.block_tensors:
        return f"model.layers.{match[1]}.{arch.block_tensors[match[2]]}.{match[3]}"
    raise ValueError(f"{meta.path}: tensor {gguf_name!r} has no {arch.hf_architecture} equivalent")


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

"""Convert a llama-architecture GGUF file into a Hugging Face folder (config, safetensors, tokenizer)."""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

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
_SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Shard like Hugging Face checkpoints so a large model is never held in memory whole.
_SHARD_BYTES = 4 << 30


def convert_gguf(gguf_path: str | Path, out_dir: str | Path, dtype: torch.dtype = torch.float32,
                 progress: bool = True) -> Path:
    """Write ``out_dir`` as a ``LlamaForCausalLM`` folder holding ``gguf_path``'s dequantized weights.

    The folder is built under a temporary name beside ``out_dir`` and renamed into place at the end,
    so ``out_dir`` either does not exist or is complete. Raises ``ValueError`` for a file that is not a
    readable llama GGUF.
    """
    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    if dtype not in _SUPPORTED_DTYPES:
        raise ValueError(f"dtype {dtype} is not supported for GGUF conversion (use one of {_SUPPORTED_DTYPES})")
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise FileExistsError(f"{out_dir} already exists and is not an empty folder")
    reader = _open(gguf_path)
    config = _build_config(reader, gguf_path, dtype)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    # Not tempfile.mkdtemp: its 0700 mode would outlive the rename; mkdir honours the umask.
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    tmp.mkdir()
    try:
        _write_tokenizer(reader, gguf_path, tmp)  # first: it fails in seconds, the weights take longer
        _write_weights(reader, gguf_path, config, tmp, dtype, progress)
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        (tmp / "generation_config.json").write_text(json.dumps(_generation_config(reader), indent=2) + "\n")
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _open(path: Path):
    from gguf import GGUFReader

    if not path.is_file():
        raise ValueError(f"GGUF file {path} does not exist")
    try:
        return GGUFReader(path)
    except Exception as exc:  # the reader fails with assorted errors on bad bytes; report one clear error
        raise ValueError(f"{path} is not a readable GGUF file: {exc}") from None


def _meta(reader, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def _build_config(reader, path: Path, dtype: torch.dtype) -> dict[str, Any]:
    arch = _meta(reader, "general.architecture")
    if arch != "llama":
        raise ValueError(f"{path}: GGUF architecture {arch!r} is not supported (only 'llama')")
    if _meta(reader, "llama.expert_count", 0):
        raise ValueError(f"{path}: mixture-of-experts llama GGUFs are not supported")

    def need(key: str) -> Any:
        value = _meta(reader, f"llama.{key}")
        if value is None:
            raise ValueError(f"{path}: GGUF metadata lacks llama.{key}")
        return value

    hidden, heads = need("embedding_length"), need("attention.head_count")
    head_dim = _meta(reader, "llama.attention.key_length") or _meta(reader, "llama.rope.dimension_count") \
        or hidden // heads
    tokens = _meta(reader, "tokenizer.ggml.tokens")
    tensor_names = {t.name for t in reader.tensors}
    theta = float(_meta(reader, "llama.rope.freq_base", 10000.0))
    dtype_name = str(dtype).removeprefix("torch.")
    config: dict[str, Any] = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": _meta(reader, "llama.vocab_size") or (len(tokens) if tokens else None),
        "hidden_size": hidden,
        "intermediate_size": need("feed_forward_length"),
        "num_hidden_layers": need("block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": _meta(reader, "llama.attention.head_count_kv", heads),
        "head_dim": head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": need("context_length"),
        "rms_norm_eps": float(_meta(reader, "llama.attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_theta": theta,
        "attention_bias": "blk.0.attn_q.bias" in tensor_names,
        "mlp_bias": False,
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "bos_token_id": _meta(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": _meta(reader, "tokenizer.ggml.eos_token_id"),
        "pad_token_id": _meta(reader, "tokenizer.ggml.padding_token_id"),
        # transformers >= 4.56 reads "dtype", older versions "torch_dtype".
        "torch_dtype": dtype_name,
        "dtype": dtype_name,
    }
    if (scaling := _rope_scaling(reader, path, theta, head_dim)) is not None:
        config["rope_scaling"] = scaling
    if config["vocab_size"] is None:
        raise ValueError(f"{path}: GGUF metadata gives no vocabulary size")
    return config


def _rope_scaling(reader, path: Path, theta: float, head_dim: int) -> dict[str, Any] | None:
    kind = _meta(reader, "llama.rope.scaling.type", "none")
    factor = _meta(reader, "llama.rope.scaling.factor")
    if kind in ("linear", "yarn") and factor is None:
        raise ValueError(f"{path}: rope scaling type {kind!r} without llama.rope.scaling.factor")
    if kind == "linear":
        return {"rope_type": "linear", "factor": float(factor)}
    if kind == "yarn":
        scaling = {"rope_type": "yarn", "factor": float(factor)}
        for key, hf_key in (("original_context_length", "original_max_position_embeddings"),
                            ("yarn_beta_fast", "beta_fast"), ("yarn_beta_slow", "beta_slow")):
            if (value := _meta(reader, f"llama.rope.scaling.{key}")) is not None:
                scaling[hf_key] = value
        return scaling
    if kind != "none":
        raise ValueError(f"{path}: rope scaling type {kind!r} is not supported (linear, yarn, or llama3 rope_freqs)")
    freqs = next((t for t in reader.tensors if t.name == "rope_freqs.weight"), None)
    return None if freqs is None else _llama3_scaling(np.asarray(freqs.data, np.float64), path, theta, head_dim)


def _llama3_scaling(factors: np.ndarray, path: Path, theta: float, head_dim: int) -> dict[str, Any] | None:
    """Recover Llama 3.1 rope-scaling parameters from llama.cpp's per-frequency divisors.

    llama.cpp stores only the divisors; a Hugging Face config needs the parameters. The blended band
    satisfies ``smooth = old_len / (high - low) / wavelen - low / (high - low)``, a line in
    ``1 / wavelen``, and the divisors fix (old_len, low, high) only up to a common scale, so this takes
    Llama 3's ``low_freq_factor = 1`` and checks that the result reproduces every divisor.
    """
    factor = float(factors.max())
    if factor <= 1.0 + 1e-6:
        return None
    inv_freq = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    wavelen = 2 * np.pi / inv_freq
    if factors.shape != wavelen.shape:
        raise ValueError(f"{path}: rope_freqs has {factors.size} entries, expected {wavelen.size}")
    blended = (factors > 1 + 1e-6) & (factors < factor * (1 - 1e-6))
    if blended.sum() < 2:
        raise ValueError(f"{path}: cannot recover llama3 rope scaling from rope_freqs (too few blended frequencies)")
    smooth = (1 / factors[blended] - 1 / factor) / (1 - 1 / factor)
    slope, intercept = np.polyfit(1 / wavelen[blended], smooth, 1)
    high, old_len = round(1 - 1 / intercept, 4), round(-slope / intercept)
    scaling = {"rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0, "high_freq_factor": high,
               "original_max_position_embeddings": old_len}
    rebuilt = np.clip((old_len / wavelen - 1.0) / (high - 1.0), 0.0, 1.0)
    if not np.allclose(1 / ((1 - rebuilt) / factor + rebuilt), factors, rtol=1e-3):
        raise ValueError(f"{path}: rope_freqs does not follow the llama3 rope-scaling rule")
    return scaling


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
    # GGUF lists dims innermost first; Hugging Face wants [out, in].
    return data.reshape(tuple(int(d) for d in reversed(tensor.shape)))


def _write_weights(reader, path: Path, config: dict[str, Any], out: Path, dtype: torch.dtype,
                   progress: bool) -> None:
    from safetensors.torch import save_file
    from tqdm import tqdm

    named = [(t, name) for t in reader.tensors if (name := _hf_name(t.name, path)) is not None]
    itemsize = torch.empty((), dtype=dtype).element_size()
    shards: list[list[tuple[Any, str]]] = [[]]
    size = 0
    for tensor, name in named:
        nbytes = int(tensor.n_elements) * itemsize
        if shards[-1] and size + nbytes > _SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append((tensor, name))
        size += nbytes
    files = ["model.safetensors"] if len(shards) == 1 else \
        [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    bar = tqdm(total=len(named), desc=f"Converting {path.name}", unit="tensor", disable=not progress)
    weight_map: dict[str, str] = {}
    with bar:
        for file, shard in zip(files, shards):
            tensors: dict[str, torch.Tensor] = {}
            for tensor, name in shard:
                data = _dequantize(tensor, path)
                if ".self_attn.q_proj." in name:
                    data = _unpermute(data, heads)
                elif ".self_attn.k_proj." in name:
                    data = _unpermute(data, kv_heads)
                # F32 data is a read-only view of the mapped file; torch needs a writable array.
                tensors[name] = torch.from_numpy(np.require(data, np.float32, ["C", "W"])).to(dtype)
                weight_map[name] = file
                bar.update()
            save_file(tensors, str(out / file), metadata={"format": "pt"})
    if len(files) > 1:
        total = sum(int(t.n_elements) * itemsize for t, _ in named)
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def _write_tokenizer(reader, path: Path, out: Path) -> None:
    """Save the GGUF's tokenizer through transformers' GGUF support, pinning bos/eos and the template."""
    from transformers import AutoTokenizer

    if _meta(reader, "tokenizer.ggml.model") is None:
        raise ValueError(f"{path}: GGUF file has no tokenizer metadata")
    try:
        tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name, local_files_only=True)
    except Exception as exc:
        raise ValueError(f"{path}: cannot build a tokenizer from the GGUF metadata: {exc}") from exc
    tokens = _meta(reader, "tokenizer.ggml.tokens")
    for attr in ("bos", "eos"):
        token_id = _meta(reader, f"tokenizer.ggml.{attr}_token_id")
        if token_id is not None and getattr(tok, f"{attr}_token_id") != token_id:
            setattr(tok, f"{attr}_token", tokens[token_id])
    template = _meta(reader, "tokenizer.chat_template")
    if template and not tok.chat_template:
        tok.chat_template = template
    # Keep the template inside tokenizer_config.json, where every transformers version looks.
    tok.save_pretrained(str(out), save_jinja_files=False)


def _generation_config(reader) -> dict[str, Any]:
    # Chat GGUFs often name an end-of-turn token apart from eos; generation should stop at either.
    eos = [i for key in ("eos", "eot", "eom")
           if (i := _meta(reader, f"tokenizer.ggml.{key}_token_id")) is not None]
    eos = list(dict.fromkeys(eos))
    gen: dict[str, Any] = {"bos_token_id": _meta(reader, "tokenizer.ggml.bos_token_id"),
                           "eos_token_id": eos[0] if len(eos) == 1 else eos or None}
    return {k: v for k, v in gen.items() if v is not None}

"""Write a GGUF file's metadata as a Hugging Face folder: config.json,
generation_config.json and the tokenizer, beside a link to the file itself (``model.gguf``).

The weights stay in the GGUF: the ``gguf`` weight format (``plugins/weights/gguf``) streams them
from the file tensor by tensor when a model loads.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from sglang_core.weights.gguf_architectures import GGUFMetadata, architecture_of

# The link to the GGUF inside a written folder: the folder is then a model path of its own, and
# transformers loads it with ``from_pretrained(folder, gguf_file=GGUF_LINK)``.
GGUF_LINK = "model.gguf"


def write_gguf_folder(gguf_path: str | Path, out_dir: str | Path, extra_config: Mapping[str, Any] | None = None) -> Path:
    """Write ``out_dir`` as the Hugging Face config folder for ``gguf_path`` (its architecture's entry in
    ``gguf_architectures.ARCHITECTURES`` says which model and which fields), with ``extra_config``'s
    fields added to ``config.json``.

    The folder is built under a temporary name beside ``out_dir`` and renamed into place at the end,
    so ``out_dir`` either does not exist or is complete. Raises ``ValueError`` for a file that is not a
    readable GGUF of a supported architecture.
    """
    gguf_path, out_dir = Path(gguf_path).resolve(), Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise FileExistsError(f"{out_dir} already exists and is not an empty folder")
    meta = GGUFMetadata(open_gguf(gguf_path), gguf_path)
    config = _build_config(meta) | dict(extra_config or {})
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    # Not tempfile.mkdtemp: its 0700 mode would outlive the rename; mkdir honours the umask.
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    tmp.mkdir()
    try:
        _write_tokenizer(meta, tmp)
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        (tmp / "generation_config.json").write_text(json.dumps(_generation_config(meta), indent=2) + "\n")
        (tmp / GGUF_LINK).symlink_to(gguf_path)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def open_gguf(path: Path):
    """A ``gguf.GGUFReader`` over ``path``; ``ValueError`` naming the file if it is not a readable GGUF."""
    from gguf import GGUFReader

    if not path.is_file():
        raise ValueError(f"GGUF file {path} does not exist")
    try:
        return GGUFReader(path)
    except Exception as exc:  # the reader fails with assorted errors on bad bytes; report one clear error
        raise ValueError(f"{path} is not a readable GGUF file: {exc}") from None


def _build_config(meta: GGUFMetadata) -> dict[str, Any]:
    arch = architecture_of(meta)
    config: dict[str, Any] = {
        "architectures": [arch.hf_architecture],
        "model_type": arch.model_type,
        **arch.config(meta),
        "bos_token_id": meta.field("tokenizer.ggml.bos_token_id"),
        "eos_token_id": meta.field("tokenizer.ggml.eos_token_id"),
        "pad_token_id": meta.field("tokenizer.ggml.padding_token_id"),
        # The compute dtype (weights stream as float32 or dequantize to it). transformers >= 4.56 reads
        # "dtype", older "torch_dtype".
        "torch_dtype": "float32",
        "dtype": "float32",
    }
    if "rope_scaling" not in config:  # an architecture may carry its own (Phi-3's LongRoPE)
        rotary_dim = round(config["head_dim"] * config.get("partial_rotary_factor", 1.0))
        if (scaling := _rope_scaling(meta, config["rope_theta"], rotary_dim)) is not None:
            config["rope_scaling"] = scaling
    return config


def _rope_scaling(meta: GGUFMetadata, theta: float, rotary_dim: int) -> dict[str, Any] | None:
    path = meta.path
    kind = meta.get("rope.scaling.type", "none")
    factor = meta.get("rope.scaling.factor")
    if kind in ("linear", "yarn") and factor is None:
        raise ValueError(f"{path}: rope scaling type {kind!r} without {meta.arch}.rope.scaling.factor")
    if kind == "linear":
        return {"rope_type": "linear", "factor": float(factor)}
    if kind == "yarn":
        scaling = {"rope_type": "yarn", "factor": float(factor)}
        for key, hf_key in (("original_context_length", "original_max_position_embeddings"),
                            ("yarn_beta_fast", "beta_fast"), ("yarn_beta_slow", "beta_slow")):
            if (value := meta.get(f"rope.scaling.{key}")) is not None:
                scaling[hf_key] = value
        return scaling
    if kind != "none":
        raise ValueError(f"{path}: rope scaling type {kind!r} is not supported (linear, yarn, or llama3 rope_freqs)")
    if not meta.has("rope_freqs.weight"):
        return None
    return _llama3_scaling(meta.values("rope_freqs.weight"), path, theta, rotary_dim)


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


def _write_tokenizer(meta: GGUFMetadata, out: Path) -> None:
    """Save the GGUF's tokenizer through transformers' GGUF support, pinning bos/eos and the template."""
    from transformers import AutoTokenizer

    path = meta.path
    if meta.field("tokenizer.ggml.model") is None:
        raise ValueError(f"{path}: GGUF file has no tokenizer metadata")
    try:
        tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name, local_files_only=True)
    except Exception as exc:
        raise ValueError(f"{path}: cannot build a tokenizer from the GGUF metadata: {exc}") from exc
    tokens = meta.field("tokenizer.ggml.tokens")
    for attr in ("bos", "eos"):
        token_id = meta.field(f"tokenizer.ggml.{attr}_token_id")
        if token_id is not None and getattr(tok, f"{attr}_token_id") != token_id:
            setattr(tok, f"{attr}_token", tokens[token_id])
    template = meta.field("tokenizer.chat_template")
    if template and not tok.chat_template:
        tok.chat_template = template
    # Keep the template inside tokenizer_config.json, where every transformers version looks.
    tok.save_pretrained(str(out), save_jinja_files=False)


def _generation_config(meta: GGUFMetadata) -> dict[str, Any]:
    # Chat GGUFs often name an end-of-turn token apart from eos; generation should stop at either.
    eos = [i for key in ("eos", "eot", "eom")
           if (i := meta.field(f"tokenizer.ggml.{key}_token_id")) is not None]
    eos = list(dict.fromkeys(eos))
    gen: dict[str, Any] = {"bos_token_id": meta.field("tokenizer.ggml.bos_token_id"),
                           "eos_token_id": eos[0] if len(eos) == 1 else eos or None}
    return {k: v for k, v in gen.items() if v is not None}

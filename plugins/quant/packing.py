"""What the AWQ and GPTQ methods share: reading their ``quantization_config`` and unpacking
integers stored several to an int32."""

from __future__ import annotations

from typing import Any

import torch


def config_value(config: Any, field: str, default: Any = None) -> Any:
    """``config[field]`` of a ``quantization_config`` given as a dict or as an object; a field
    written as null (transformers' configs write unset fields so) counts as absent."""
    value = config.get(field) if isinstance(config, dict) else getattr(config, field, None)
    return default if value is None else value


def require_bool(config: Any, field: str, default: bool) -> bool:
    value = config_value(config, field, default)
    if not isinstance(value, bool):
        raise ValueError(f"quantization_config.{field} must be true or false, not {value!r}")
    return value


def unpack_ints(words: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """The ``32 // bits`` unsigned ``bits``-wide integers of each int32 of ``words``, lowest bits
    first, laid out one after another along ``dim`` (which grows by ``32 // bits``)."""
    per_word = 32 // bits
    w = words.movedim(dim, -1).to(torch.int64)  # int64: shifting a negative int32 keeps its bits
    shifts = torch.arange(0, 32, bits, device=words.device)
    values = (w.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    return values.reshape(*w.shape[:-1], w.shape[-1] * per_word).movedim(-1, dim)

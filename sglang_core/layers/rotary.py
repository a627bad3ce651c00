"""Rotary position embedding with the rope-scaling variants of Hugging Face configs."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from sglang_core.kernels import use_fused


def _default_inv_freq(rotary_dim: int, base: float) -> torch.Tensor:
    return 1.0 / (base ** (torch.arange(0, rotary_dim, 2, dtype=torch.int64).float() / rotary_dim))


def _llama3_inv_freq(inv_freq: torch.Tensor, scaling: dict[str, Any]) -> torch.Tensor:
    """Llama 3.1: long wavelengths divided by ``factor``, short kept, a smooth blend between."""
    factor = scaling["factor"]
    low, high = scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
    old_len = scaling["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, blended, scaled)


def _yarn_inv_freq(inv_freq: torch.Tensor, rotary_dim: int, base: float, scaling: dict[str, Any],
                   max_pos: int) -> tuple[torch.Tensor, float]:
    """YaRN: interpolate low frequencies, keep high ones, ramp between; returns the attention factor too."""
    factor = scaling["factor"]
    old_len = scaling.get("original_max_position_embeddings") or max_pos
    beta_fast, beta_slow = scaling.get("beta_fast", 32), scaling.get("beta_slow", 1)

    def dim_for(rotations: float) -> float:
        return rotary_dim * math.log(old_len / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(dim_for(beta_fast)), 0)
    high = min(math.ceil(dim_for(beta_slow)), rotary_dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = ((torch.arange(rotary_dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolation = 1 - ramp
    inv = inv_freq / factor * (1 - extrapolation) + inv_freq * extrapolation
    attention_factor = scaling.get("attention_factor") or (0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0)
    return inv, attention_factor


class RotaryEmbedding(nn.Module):
    """Applies rotary embedding in the "rotate half" (GPT-NeoX) layout used by Llama checkpoints."""

    def __init__(self, head_dim: int, max_position: int, base: float, rope_scaling: dict[str, Any] | None = None,
                 rotary_dim: int | None = None):
        super().__init__()
        self.head_dim = head_dim
        self.rotary_dim = rotary_dim or head_dim
        inv_freq = _default_inv_freq(self.rotary_dim, base)
        attention_factor = 1.0
        kind = (rope_scaling or {}).get("rope_type", (rope_scaling or {}).get("type", "default"))
        if kind == "linear":
            inv_freq = inv_freq / rope_scaling["factor"]
        elif kind == "llama3":
            inv_freq = _llama3_inv_freq(inv_freq, rope_scaling)
        elif kind == "yarn":
            inv_freq, attention_factor = _yarn_inv_freq(inv_freq, self.rotary_dim, base, rope_scaling, max_position)
        elif kind != "default":
            raise ValueError(f"rope_scaling type {kind!r} is not supported (supported: default, linear, llama3, yarn)")
        freqs = torch.outer(torch.arange(max_position, dtype=torch.float32), inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        self.register_buffer("cos_cache", emb.cos() * attention_factor, persistent=False)
        self.register_buffer("sin_cache", emb.sin() * attention_factor, persistent=False)

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q: [T, heads, head_dim], k: [T, kv_heads, head_dim]. On CUDA, rotated in place."""
        if use_fused(q) and q.stride(2) == 1 and k.stride(2) == 1:
            from sglang_core.kernels.fused import rotary_inplace

            half = self.rotary_dim // 2
            both = _adjacent_heads(q, k)
            for x in [both] if both is not None else [q, k]:
                rotary_inplace(x, positions, self.cos_cache[:, :half], self.sin_cache[:, :half], self.rotary_dim)
            return q, k
        cos = self.cos_cache[positions].unsqueeze(1)
        sin = self.sin_cache[positions].unsqueeze(1)
        return self._rotate(q, cos, sin), self._rotate(k, cos, sin)

    def _rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        rot, rest = x[..., : self.rotary_dim], x[..., self.rotary_dim :]
        half = self.rotary_dim // 2
        rotated_half = torch.cat((-rot[..., half:], rot[..., :half]), dim=-1)
        out = (rot.float() * cos + rotated_half.float() * sin).to(x.dtype)
        return torch.cat((out, rest), dim=-1) if rest.numel() else out


def _adjacent_heads(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor | None:
    """q and k as one [T, heads + kv_heads, head_dim] view when k's heads follow q's in memory
    (views of one fused QKV projection), so one kernel launch rotates both; else None."""
    tokens, heads, dim = q.shape
    same_layout = q.stride() == k.stride() and q.stride(1) == dim and k.shape[2] == dim and k.shape[0] == tokens
    if same_layout and k.data_ptr() == q.data_ptr() + heads * dim * q.element_size():
        return q.as_strided((tokens, heads + k.shape[1], dim), q.stride())
    return None


def rope_from_config(config, head_dim: int) -> RotaryEmbedding:
    """The rotary embedding a Hugging Face config describes, in either of its spellings:
    ``rope_theta`` + ``rope_scaling`` (transformers 4) or ``rope_parameters`` (transformers 5)."""
    params = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    base = params.pop("rope_theta", None) or getattr(config, "rope_theta", None) or 10000.0
    scaling = params if params.get("rope_type", params.get("type", "default")) != "default" else None
    rotary_dim = int(head_dim * getattr(config, "partial_rotary_factor", 1.0))
    return RotaryEmbedding(head_dim, config.max_position_embeddings, base, scaling, rotary_dim)


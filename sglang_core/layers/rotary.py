"""Rotary position embedding with the rope-scaling variants of Hugging Face configs.

Both layouts: "rotate half" (GPT-NeoX, Llama and most checkpoints: frequency ``i`` turns dims
``i`` and ``i + rotary_dim / 2``) and interleaved (GPT-J: dims ``2i`` and ``2i + 1``); partial
rotary (only the first ``rotary_dim`` dims of a head turn). Scalings (``rope_type``): ``default``,
``linear``, ``dynamic``, ``yarn``, ``longrope`` and ``llama3``, computed as
``transformers.modeling_rope_utils`` does.

Length-dependent scalings. Hugging Face recomputes the frequencies of ``dynamic`` (NTK) and
``longrope`` from the length of the sequence in each forward pass. ``longrope`` holds a table
for each of its factor sets and chooses per token (``LongRopeRotaryEmbedding``, which also says
how a sequence crossing the original length is recomputed) when the served
length (``rope_from_config(max_position=...)``, the context the server serves) exceeds
``original_max_position_embeddings``; within it, the short factors' table alone. ``dynamic``'s
table is built once, for sequences up to ``max_position`` tokens, with the frequencies Hugging
Face uses for a sequence of that length: the unscaled frequencies when ``max_position`` is within
``original_max_position_embeddings``, else a base stretched for ``max_position`` tokens. So it
equals Hugging Face's for any sequence within the original length, and for sequences of exactly
``max_position`` tokens beyond it; a shorter sequence beyond the original length turns with the
frequencies of the longer one.

Multimodal rotary (M-RoPE, Qwen2-VL: ``MRotaryEmbedding``, chosen by ``mrope_section`` in the
rope parameters): positions become [3, T] (temporal, height, width), and each band of frequencies
(``mrope_section``) takes its cos/sin from the row of its own position component. The extension
point is ``RotaryEmbedding.cos_sin``: a subclass overrides it to gather per-token cos/sin
[T, rotary_dim // 2] from positions of its own shape; both the PyTorch path and the fused kernel
then rotate with those rows. One-dimensional positions index the table directly.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from sglang_core.kernels import use_fused
from sglang_core.model_executor.forward_batch import ForwardBatch

ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "longrope", "llama3")
# Older spellings of a rope type: Phi-3's first configs said "su"; Qwen2-VL's say "mrope" for the
# default frequencies split into bands.
_ROPE_TYPE_ALIASES = {"su": "longrope", "mrope": "default"}


def _frequency_exponents(rotary_dim: int) -> torch.Tensor:
    return torch.arange(0, rotary_dim, 2, dtype=torch.int64).float() / rotary_dim


def _default_inv_freq(rotary_dim: int, base: float) -> torch.Tensor:
    return 1.0 / (base ** _frequency_exponents(rotary_dim))


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


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN's magnitude correction ``0.1 * mscale * ln(factor) + 1`` (1 when not stretching)."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def _yarn_inv_freq(rotary_dim: int, base: float, scaling: dict[str, Any]) -> tuple[torch.Tensor, float]:
    """YaRN: interpolate low frequencies, keep high ones, ramp between; returns the attention factor
    (the cos/sin multiplier) too: ``mscale / mscale_all_dim`` corrections when both are given
    (DeepSeek), else YaRN's default for ``factor``."""
    factor = scaling["factor"]
    old_len = scaling["original_max_position_embeddings"]
    beta_fast, beta_slow = scaling.get("beta_fast") or 32, scaling.get("beta_slow") or 1

    def dim_for(rotations: float) -> float:
        return rotary_dim * math.log(old_len / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = dim_for(beta_fast), dim_for(beta_slow)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, rotary_dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = ((torch.arange(rotary_dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolation = 1 - ramp
    powers = base ** _frequency_exponents(rotary_dim)
    inv = 1.0 / (factor * powers) * (1 - extrapolation) + 1.0 / powers * extrapolation
    attention_factor = scaling.get("attention_factor")
    if attention_factor is None:
        mscale, mscale_all_dim = scaling.get("mscale"), scaling.get("mscale_all_dim")
        if mscale and mscale_all_dim:
            attention_factor = yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all_dim)
        else:
            attention_factor = yarn_mscale(factor)
    return inv, attention_factor


def _dynamic_ntk_inv_freq(rotary_dim: int, base: float, scaling: dict[str, Any], seq_len: int) -> torch.Tensor:
    """NTK-aware dynamic scaling for a sequence of ``seq_len`` tokens: the base grows with the
    length beyond ``original_max_position_embeddings``; unchanged within it."""
    factor, old_len = scaling["factor"], scaling["original_max_position_embeddings"]
    seq_len = max(seq_len, old_len)
    stretched = base * ((factor * seq_len / old_len) - (factor - 1)) ** (rotary_dim / (rotary_dim - 2))
    return _default_inv_freq(rotary_dim, stretched)


def _longrope_inv_freq(rotary_dim: int, base: float, scaling: dict[str, Any], seq_len: int,
                       ) -> tuple[torch.Tensor, float]:
    """LongRoPE (Phi-3): per-frequency divisors, ``long_factor`` for sequences longer than
    ``original_max_position_embeddings``, ``short_factor`` otherwise; the attention factor
    corrects for the overall stretch ``factor`` whichever set is used."""
    old_len = scaling["original_max_position_embeddings"]
    divisors = scaling["long_factor"] if seq_len > old_len else scaling["short_factor"]
    inv = 1.0 / (torch.tensor(divisors, dtype=torch.float32) * base ** _frequency_exponents(rotary_dim))
    attention_factor = scaling.get("attention_factor")
    if attention_factor is None:
        factor = scaling.get("factor") or seq_len / old_len
        attention_factor = 1.0 if factor <= 1 else math.sqrt(1 + math.log(factor) / math.log(old_len))
    return inv, attention_factor


def rope_type_of(scaling: dict[str, Any] | None) -> str:
    """The ``rope_type`` of a scaling dict, read from ``rope_type`` or its old name ``type``."""
    kind = (scaling or {}).get("rope_type") or (scaling or {}).get("type") or "default"
    return _ROPE_TYPE_ALIASES.get(kind, kind)


def rope_frequencies(rotary_dim: int, base: float, scaling: dict[str, Any] | None,
                     max_position: int) -> tuple[torch.Tensor, float]:
    """``(inv_freq [rotary_dim // 2], attention_factor)`` of a rope scaling, for a table serving
    sequences up to ``max_position`` tokens. Missing ``original_max_position_embeddings`` means
    ``max_position``, as Hugging Face defaults it to ``max_position_embeddings``."""
    kind = rope_type_of(scaling)
    if kind not in ROPE_TYPES:
        raise ValueError(f"rope_scaling: rope_type {kind!r} is not supported (supported: {', '.join(ROPE_TYPES)})")
    if kind == "default":
        return _default_inv_freq(rotary_dim, base), 1.0
    scaling = {"original_max_position_embeddings": max_position, **scaling}
    if kind == "linear":
        return _default_inv_freq(rotary_dim, base) / scaling["factor"], 1.0
    if kind == "llama3":
        return _llama3_inv_freq(_default_inv_freq(rotary_dim, base), scaling), 1.0
    if kind == "dynamic":
        return _dynamic_ntk_inv_freq(rotary_dim, base, scaling, max_position), 1.0
    if kind == "yarn":
        return _yarn_inv_freq(rotary_dim, base, scaling)
    return _longrope_inv_freq(rotary_dim, base, scaling, max_position)


class RotaryEmbedding(nn.Module):
    """Rotates q and k by position; see the module docstring for layouts, scalings and M-RoPE."""

    def __init__(self, head_dim: int, max_position: int, base: float, rope_scaling: dict[str, Any] | None = None,
                 rotary_dim: int | None = None, interleaved: bool = False):
        super().__init__()
        self.head_dim = head_dim
        self.rotary_dim = rotary_dim or head_dim
        self.interleaved = interleaved
        cos, sin = _cos_sin_table(*rope_frequencies(self.rotary_dim, base, rope_scaling, max_position), max_position)
        # [max_position, rotary_dim // 2]: one column per frequency, whatever the layout.
        self.register_buffer("cos_cache", cos, persistent=False)
        self.register_buffer("sin_cache", sin, persistent=False)

    def token_positions(self, positions: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        """What ``forward`` takes as positions, from a batch's [T] positions: those themselves
        here; a subclass whose rotation needs more per token returns its own shape (LongRoPE)."""
        return positions

    def cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token cos and sin, [T, rotary_dim // 2] each, for ``positions`` [T]. The extension
        point for other position schemes (M-RoPE's [3, T]): override it in a subclass."""
        return self.cos_cache[positions], self.sin_cache[positions]

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                q_out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """q: [T, heads, head_dim], k: [T, kv_heads, head_dim]. On CUDA, rotated in place.
        ``q_out`` (q's shape, where whole heads turn): takes the rotated q, and is returned for it
        (on CUDA written by the same launch: a query assembled in place)."""
        if q_out is not None and (q_out.shape != q.shape or q.shape[-1] != self.rotary_dim):
            raise ValueError(f"q_out: {tuple(q_out.shape)} must be q's shape {tuple(q.shape)}, whole heads turning")
        if use_fused(q) and q.stride(2) == 1 and k.stride(2) == 1 and (q_out is None or q_out.stride(2) == 1):
            from sglang_core.kernels.fused import rotary_inplace

            if positions.dim() == 1:
                rows, cos, sin = positions, self.cos_cache, self.sin_cache
            else:  # per-token rows from a subclass's cos_sin (M-RoPE)
                cos, sin = self.cos_sin(positions)
                rows = torch.arange(q.shape[0], device=q.device)
            rotary_inplace(q, rows, cos, sin, self.rotary_dim, self.interleaved, other=k, x_out=q_out)  # one launch
            return (q if q_out is None else q_out), k
        cos, sin = self.cos_sin(positions)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        rotated = self._rotate(q, cos, sin)
        return (rotated if q_out is None else q_out.copy_(rotated)), self._rotate(k, cos, sin)

    def _rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        rot, rest = x[..., : self.rotary_dim], x[..., self.rotary_dim :]
        if self.interleaved:
            x1, x2 = rot[..., 0::2].float(), rot[..., 1::2].float()
        else:
            half = self.rotary_dim // 2
            x1, x2 = rot[..., :half].float(), rot[..., half:].float()
        # Each pair (x1, x2) turns by its frequency's angle: (x1 cos - x2 sin, x2 cos + x1 sin).
        out1, out2 = x1 * cos - x2 * sin, x2 * cos + x1 * sin
        out = torch.stack((out1, out2), dim=-1).flatten(-2) if self.interleaved else torch.cat((out1, out2), dim=-1)
        out = out.to(x.dtype)
        return torch.cat((out, rest), dim=-1) if rest.numel() else out


class LongRopeRotaryEmbedding(RotaryEmbedding):
    """LongRoPE with its factors chosen per token, as Hugging Face chooses them per forward pass
    (by its last position + 1): ``long_factor`` for a token whose sequence is longer than
    ``original_max_position_embeddings`` (``original_max_position``) when the token is processed,
    ``short_factor`` otherwise (the attention factor scales both). A prompt's tokens go by the
    prompt's length, also when it is prefilled in chunks (Hugging Face takes a prompt in one pass);
    a decoded token at position ``p`` by ``p + 1``; a request retracted and prefilled again by its
    whole length, output included. Both tables are held, short rows then long rows.

    ``token_positions`` gives ``forward`` positions [2, T]: each token's position and the length
    its factors are chosen by (its request's ``ForwardBatch.fill_lens``), computed on the device,
    so a captured decode graph replays the choice.

    K is cached as it was turned, so what a sequence crossing the original length holds depends on
    the model. Phi-3's ``generate`` drops its KV cache at the crossing and turns every token again
    by the long factors: its plugin declares ``kv_recompute_length = original_max_position``, and
    the scheduler prefills such a request again and keeps short- and long-factor tokens apart in
    the prefix cache (``scheduler/length_regimes.py``), so every sequence's K is turned by the
    factors of its current length, as ``generate``'s. A model that declares nothing keeps its early
    tokens' short-factor K beside later long-factor ones, as Hugging Face's forward stepped with
    one KV cache does (transformers' other classes reading a ``longrope`` config), and its prefix
    cache reuses tokens whatever factors turned them."""

    def __init__(self, head_dim: int, max_position: int, base: float, rope_scaling: dict[str, Any],
                 rotary_dim: int | None = None, interleaved: bool = False):
        super().__init__(head_dim, max_position, base, rope_scaling, rotary_dim, interleaved)
        self.max_position = max_position
        self.original_max_position = rope_scaling["original_max_position_embeddings"]
        short = rope_frequencies(self.rotary_dim, base, rope_scaling, self.original_max_position)
        long = rope_frequencies(self.rotary_dim, base, rope_scaling, self.original_max_position + 1)
        tables = [_cos_sin_table(*freqs, max_position) for freqs in (short, long)]
        self.cos_cache = torch.cat([cos for cos, _ in tables])
        self.sin_cache = torch.cat([sin for _, sin in tables])

    def token_positions(self, positions: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        lengths = batch.seq_lens if batch.fill_lens is None else batch.fill_lens
        if len(lengths) != len(positions):  # else one token per request (decode): already per token
            lengths = torch.repeat_interleave(lengths, batch.seq_lens - batch.prefix_lens, output_size=len(positions))
        return torch.stack((positions, lengths))

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                q_out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        if positions.dim() != 2:  # plain positions would silently take the short factors
            raise ValueError("LongRoPE rotates by positions [2, T] from token_positions (position, sequence length)")
        return super().forward(positions, q, k, q_out)

    def cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``positions`` [2, T] from ``token_positions``."""
        rows = positions[0] + self.max_position * (positions[1] > self.original_max_position)
        return self.cos_cache[rows], self.sin_cache[rows]


class MRotaryEmbedding(RotaryEmbedding):
    """M-RoPE: positions [components, T] (Qwen2-VL's temporal, height and width); the frequencies
    are cut into consecutive bands of ``sections`` and band ``i`` turns by component
    ``i % components``. Positions [T] mean every component equals the token's position (text, and
    every decoded token), which turns each band exactly as the one-dimensional table does."""

    def __init__(self, head_dim: int, max_position: int, base: float, rope_scaling: dict[str, Any] | None,
                 rotary_dim: int | None = None, interleaved: bool = False, *, sections: list[int]):
        super().__init__(head_dim, max_position, base, rope_scaling, rotary_dim, interleaved)
        if sum(sections) != self.rotary_dim // 2:
            raise ValueError(f"mrope_section: {sections} must add up to half the rotary dims ({self.rotary_dim // 2})")
        self.sections = list(sections)

    def cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if positions.dim() == 1:
            return super().cos_sin(positions)
        components = positions.shape[0]

        def banded(table: torch.Tensor) -> torch.Tensor:
            bands = table[positions].split(self.sections, dim=-1)  # each [components, T, band]
            return torch.cat([band[i % components] for i, band in enumerate(bands)], dim=-1)

        return banded(self.cos_cache), banded(self.sin_cache)


def _cos_sin_table(inv_freq: torch.Tensor, attention_factor: float, max_position: int,
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin [max_position, len(inv_freq)] of each position's angles, times the attention factor."""
    freqs = torch.outer(torch.arange(max_position, dtype=torch.float32), inv_freq)
    return freqs.cos() * attention_factor, freqs.sin() * attention_factor


def rope_parameters(config, layer_type: str | None = None) -> dict[str, Any]:
    """A Hugging Face config's rope settings as one dict: ``rope_type``, ``rope_theta``,
    ``partial_rotary_factor`` and the scaling's own keys, read from ``rope_parameters``
    (transformers 5; nested per ``layer_type`` in e.g. Gemma 3) or ``rope_theta`` +
    ``rope_scaling`` (transformers 4, ``type`` an old name of ``rope_type``). The original
    context length is filled in as transformers does (Phi-3's top-level
    ``original_max_position_embeddings`` first; ``max_position_embeddings`` for ``dynamic``)."""
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if layer_type is not None:
        params = params[layer_type]
    params = dict(params)
    params["rope_type"] = rope_type_of(params)
    params.pop("type", None)
    params["rope_theta"] = params.get("rope_theta") or getattr(config, "rope_theta", None) or 10000.0
    partial = params.get("partial_rotary_factor") or getattr(config, "partial_rotary_factor", None)
    params["partial_rotary_factor"] = partial or getattr(config, "rotary_pct", None) or 1.0
    max_len = config.max_position_embeddings
    if params["rope_type"] == "dynamic":
        params["original_max_position_embeddings"] = max_len
    elif params["rope_type"] != "default":
        old_len = getattr(config, "original_max_position_embeddings", None)
        params["original_max_position_embeddings"] = old_len or params.get("original_max_position_embeddings",
                                                                          max_len)
        if params["rope_type"] in ("yarn", "longrope") and params.get("factor") is None:
            params["factor"] = max_len / params["original_max_position_embeddings"]
    return params


def yarn_softmax_scale(params: dict[str, Any], scale: float) -> float:
    """The attention softmax scale of a model that also corrects the non-rotary dims for YaRN
    (DeepSeek's MLA): ``scale * yarn_mscale(factor, mscale_all_dim) ** 2`` when the config sets
    ``mscale_all_dim``; ``params`` as from ``rope_parameters``."""
    if params["rope_type"] == "default" or not params.get("mscale_all_dim"):
        return scale
    return scale * yarn_mscale(params["factor"], params["mscale_all_dim"]) ** 2


def rope_from_config(config, head_dim: int, *, interleaved: bool = False, max_position: int | None = None,
                     layer_type: str | None = None, partial_rotary: bool = True) -> RotaryEmbedding:
    """The rotary embedding a Hugging Face config describes (see ``rope_parameters``).

    ``head_dim``: the dims per head the rotation applies to (a part of them with
    ``partial_rotary_factor``, or GPT-J's ``rotary_dim``, unless ``partial_rotary`` is off: for a
    family whose transformers class turns whole heads whatever those fields say); ``interleaved``:
    GPT-J's layout, which configs do not state; ``max_position``: the longest sequence served (default
    ``max_position_embeddings``), which decides the length-dependent scalings (module docstring)."""
    params = rope_parameters(config, layer_type)
    rotary_dim = head_dim
    if partial_rotary:
        rotary_dim = getattr(config, "rotary_dim", None) or int(head_dim * params["partial_rotary_factor"])
    scaling = params if params["rope_type"] != "default" else None
    max_position = max_position or config.max_position_embeddings
    # LongRoPE serving only sequences within the original length needs the short table alone.
    longrope = params["rope_type"] == "longrope" and max_position > params["original_max_position_embeddings"]
    if params.get("mrope_section"):
        if longrope:
            raise ValueError("mrope_section: M-RoPE with LongRoPE's per-length factors is not supported")
        return MRotaryEmbedding(head_dim, max_position, params["rope_theta"], scaling, rotary_dim, interleaved,
                                sections=params["mrope_section"])
    rotary_cls = LongRopeRotaryEmbedding if longrope else RotaryEmbedding
    return rotary_cls(head_dim, max_position, params["rope_theta"], scaling, rotary_dim, interleaved)

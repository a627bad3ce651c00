"""Float32 references for architectures whose checkpoints ship their own modeling code (transformers
has no class for them), written in plain PyTorch from the public definitions:

- InternLM2 / InternLM2.5: modeling_internlm2.py and configuration_internlm2.py as the checkpoints
  ship them (InternLM/InternLM's tools/convert2llama.py documents the grouped ``wqkv`` layout);
- MiniCPM 1/2/4: model/modeling_minicpm.py and configuration_minicpm.py in OpenBMB/MiniCPM, and
  MiniCPM 4's ``MiniCPMLongRoPE`` as its checkpoints' modeling_minicpm.py builds it.

Straightforward and unoptimised: every call runs the whole sequence (no KV cache). The state dicts
are named as the real checkpoints are, and each config saves as the checkpoints' config.json does:
only the fields given, with ``model_type``, ``architectures`` and ``auto_map``; a field left out
takes the config class's default here, as it does when transformers runs that class.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers.activations import ACT2FN


class CustomCodeConfig:
    """A custom-code checkpoint's config: its config.json fields as attributes, saved verbatim
    (transformers 5 would rewrite ``rope_scaling``, which these checkpoints still spell the old way)."""

    def __init__(self, **fields: Any):
        self.__dict__["fields"] = fields

    def __getattr__(self, name: str) -> Any:
        try:
            return self.__dict__["fields"][name]
        except KeyError:
            raise AttributeError(name) from None

    def __setattr__(self, name: str, value: Any) -> None:
        self.fields[name] = value

    def get(self, name: str, default: Any) -> Any:
        """The field, or the config class's ``default`` when config.json leaves it out."""
        return self.fields.get(name, default)

    def save_pretrained(self, folder: str | Path) -> None:
        (Path(folder) / "config.json").write_text(json.dumps(self.fields, indent=2))


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))


def rope_cos_sin(config: CustomCodeConfig, head_dim: int, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin [seq_len, head_dim] (each frequency twice, "rotate half" layout) of the rotary
    classes both files define, chosen by ``rope_scaling``'s ``type`` (MiniCPM 4: ``rope_type``)."""
    base = float(config.get("rope_theta", 10000.0))
    max_len = config.max_position_embeddings
    scaling = config.get("rope_scaling", None) or {}
    kind = scaling.get("type") or scaling.get("rope_type")
    exponents = torch.arange(0, head_dim, 2).float() / head_dim
    positions = torch.arange(seq_len).float()
    magnitude = 1.0
    if kind == "dynamic" and seq_len > max_len:  # NTK: a larger base for sequences past the trained length
        factor = scaling["factor"]
        base = base * ((factor * seq_len / max_len) - (factor - 1)) ** (head_dim / (head_dim - 2))
    inv_freq = 1.0 / base**exponents
    if kind == "linear":
        positions = positions / scaling["factor"]
    elif kind == "longrope":
        # MiniCPMLongRoPE's table is built for max(max_position_embeddings, seq_len) positions.
        old_len = scaling["original_max_position_embeddings"]
        factors = scaling["long_factor"] if max(max_len, seq_len) > old_len else scaling["short_factor"]
        inv_freq = inv_freq / torch.tensor(factors, dtype=torch.float32)
        magnitude = math.sqrt(1 + math.log(max_len / old_len) / math.log(old_len))
    elif kind not in (None, "dynamic"):
        raise ValueError(f"unknown rope scaling {kind!r}")
    angles = torch.outer(positions, inv_freq)
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos() * magnitude, angles.sin() * magnitude


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, heads, head_dim] turned by position: ``x cos + rotate_half(x) sin``."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None] + rotated * sin[:, None]


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor,
                     sin: torch.Tensor) -> torch.Tensor:
    """q [T, heads, d], k and v [T, kv_heads, d] -> [T, heads * d]; query head i reads kv head
    ``i // (heads / kv_heads)``; softmax scale ``1 / sqrt(d)``."""
    tokens, heads, dim = q.shape
    q, k = rotate(q, cos, sin), rotate(k, cos, sin)
    repeat = heads // k.shape[1]
    k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(dim)
    future = torch.ones(tokens, tokens, dtype=torch.bool).triu(1)
    weights = scores.masked_fill(future, float("-inf")).softmax(dim=-1)
    return torch.einsum("hqk,khd->qhd", weights, v).reshape(tokens, heads * dim)


class GatedFeedForward(nn.Module):
    """``down(act(gate(x)) * up(x))`` without biases; ``names``: (gate, up, down) as the checkpoint
    names them."""

    def __init__(self, config: CustomCodeConfig, names: tuple[str, str, str]):
        super().__init__()
        self.names = names
        sizes = [(config.hidden_size, config.intermediate_size)] * 2 + [(config.intermediate_size, config.hidden_size)]
        for name, (inputs, outputs) in zip(names, sizes):
            setattr(self, name, nn.Linear(inputs, outputs, bias=False))
        self.act = ACT2FN[config.get("hidden_act", "silu")]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up, down = (getattr(self, name) for name in self.names)
        return down(self.act(gate(x)) * up(x))


class PreNormLayer(nn.Module):
    """``x += scale * attention(norm1(x)); x += scale * mlp(norm2(x))``; ``names``: (attention,
    mlp, norm1, norm2) as the checkpoint names them."""

    def __init__(self, config: CustomCodeConfig, names: tuple[str, str, str, str], attention: nn.Module,
                 mlp: nn.Module, residual_scale: float = 1.0):
        super().__init__()
        self.names, self.residual_scale = names, residual_scale
        eps = config.get("rms_norm_eps", 1e-6)
        norms = RMSNorm(config.hidden_size, eps), RMSNorm(config.hidden_size, eps)
        for name, module in zip(names, (attention, mlp, *norms)):
            setattr(self, name, module)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        attention, mlp, norm1, norm2 = (getattr(self, name) for name in self.names)
        x = x + attention(norm1(x), cos, sin) * self.residual_scale
        return x + mlp(norm2(x)) * self.residual_scale


class DecoderReference(nn.Module):
    """``model.<embed>``, ``model.layers``, ``model.norm`` and a bias-free head ``<head>``, tied to
    the embedding when ``tied``: logits of ``head(norm(layers(embed(ids) * embedding_scale)) /
    head_divisor)``."""

    def __init__(self, config: CustomCodeConfig, layers: list[nn.Module], embed: str, head: str, tied: bool,
                 embedding_scale: float = 1.0, head_divisor: float = 1.0):
        super().__init__()
        self.config, self.embed, self.head = config, embed, head
        self.embedding_scale, self.head_divisor = embedding_scale, head_divisor
        self.model = nn.Module()
        setattr(self.model, embed, nn.Embedding(config.vocab_size, config.hidden_size))
        self.model.layers = nn.ModuleList(layers)
        self.model.norm = RMSNorm(config.hidden_size, config.get("rms_norm_eps", 1e-6))
        setattr(self, head, nn.Linear(config.hidden_size, config.vocab_size, bias=False))
        if tied:
            getattr(self, head).weight = getattr(self.model, embed).weight

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = getattr(self.model, self.embed)(input_ids[0]) * self.embedding_scale
        cos, sin = rope_cos_sin(self.config, heads_of(self.config)[2], x.shape[0])
        for layer in self.model.layers:
            x = layer(x, cos, sin)
        return getattr(self, self.head)(self.model.norm(x) / self.head_divisor)[None]


def heads_of(config: CustomCodeConfig) -> tuple[int, int, int]:
    """(heads, kv_heads, head_dim): both files take ``head_dim = hidden_size / heads`` and default
    ``num_key_value_heads`` to the number of heads."""
    heads = config.num_attention_heads
    return heads, config.get("num_key_value_heads", None) or heads, config.hidden_size // heads


# --- InternLM2 -----------------------------------------------------------------------------------


class InternLM2Attention(nn.Module):
    def __init__(self, config: CustomCodeConfig):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads_of(config)
        bias = config.get("bias", True)
        self.wqkv = nn.Linear(config.hidden_size, (self.heads + 2 * self.kv_heads) * self.head_dim, bias=bias)
        self.wo = nn.Linear(self.heads * self.head_dim, config.hidden_size, bias=bias)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        # Per kv head: its query heads, then its key head, then its value head.
        groups = self.wqkv(x).view(x.shape[0], self.kv_heads, self.heads // self.kv_heads + 2, self.head_dim)
        q = groups[:, :, :-2].reshape(x.shape[0], self.heads, self.head_dim)
        return self.wo(causal_attention(q, groups[:, :, -2], groups[:, :, -1], cos, sin))


def internlm2(**fields: Any) -> tuple[CustomCodeConfig, DecoderReference]:
    """A config as InternLM2(.5) checkpoints' config.json has it, with ``fields``, and its reference:
    ``model.tok_embeddings``, ``model.layers.N.{attention.{wqkv,wo}, feed_forward.{w1,w3,w2},
    attention_norm, ffn_norm}``, ``model.norm``, ``output``."""
    config = CustomCodeConfig(**{
        "architectures": ["InternLM2ForCausalLM"], "model_type": "internlm2",
        "auto_map": {"AutoConfig": "configuration_internlm2.InternLM2Config",
                     "AutoModelForCausalLM": "modeling_internlm2.InternLM2ForCausalLM",
                     "AutoModel": "modeling_internlm2.InternLM2ForCausalLM"},
        "attn_implementation": "eager", "hidden_act": "silu", "initializer_range": 0.02, "torch_dtype": "bfloat16",
        "transformers_version": "4.41.0", "use_cache": True, **fields})
    layers = [PreNormLayer(config, ("attention", "feed_forward", "attention_norm", "ffn_norm"),
                           InternLM2Attention(config), GatedFeedForward(config, ("w1", "w3", "w2")))
              for _ in range(config.num_hidden_layers)]
    return config, DecoderReference(config, layers, "tok_embeddings", "output",
                                    tied=config.get("tie_word_embeddings", False))


# --- MiniCPM -------------------------------------------------------------------------------------


class MiniCPMAttention(nn.Module):
    def __init__(self, config: CustomCodeConfig):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads_of(config)
        bias, hidden = config.get("attention_bias", False), config.hidden_size
        self.q_proj = nn.Linear(hidden, self.heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(hidden, self.kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(hidden, self.kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.heads * self.head_dim, hidden, bias=bias)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        tokens = x.shape[0]
        q = self.q_proj(x).view(tokens, self.heads, self.head_dim)
        k = self.k_proj(x).view(tokens, self.kv_heads, self.head_dim)
        v = self.v_proj(x).view(tokens, self.kv_heads, self.head_dim)
        return self.o_proj(causal_attention(q, k, v, cos, sin))


def minicpm(**fields: Any) -> tuple[CustomCodeConfig, DecoderReference]:
    """A config as MiniCPM checkpoints' config.json has it, with ``fields``, and its reference:
    Llama's names; embeddings times ``scale_emb``, ``scale_depth / sqrt(layers)`` on each sublayer's
    output, the head reading ``hidden / (hidden_size / dim_model_base)``, tied unless
    ``tie_word_embeddings`` is false."""
    config = CustomCodeConfig(**{
        "architectures": ["MiniCPMForCausalLM"], "model_type": "minicpm",
        "auto_map": {"AutoConfig": "configuration_minicpm.MiniCPMConfig",
                     "AutoModel": "modeling_minicpm.MiniCPMModel",
                     "AutoModelForCausalLM": "modeling_minicpm.MiniCPMForCausalLM",
                     "AutoModelForSeq2SeqLM": "modeling_minicpm.MiniCPMForCausalLM",
                     "AutoModelForSequenceClassification": "modeling_minicpm.MiniCPMForSequenceClassification"},
        "hidden_act": "silu", "initializer_range": 0.1, "torch_dtype": "bfloat16", "transformers_version": "4.36.0",
        "use_cache": True, **fields})
    residual_scale = config.get("scale_depth", 1) / math.sqrt(config.num_hidden_layers)
    layers = [PreNormLayer(config, ("self_attn", "mlp", "input_layernorm", "post_attention_layernorm"),
                           MiniCPMAttention(config), GatedFeedForward(config, ("gate_proj", "up_proj", "down_proj")),
                           residual_scale)
              for _ in range(config.num_hidden_layers)]
    return config, DecoderReference(config, layers, "embed_tokens", "lm_head",
                                    tied=config.get("tie_word_embeddings", True),
                                    embedding_scale=config.get("scale_emb", 1),
                                    head_divisor=config.hidden_size / config.get("dim_model_base", 1))

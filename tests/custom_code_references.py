"""Float32 references for architectures whose checkpoints ship their own modeling code (transformers
has no class for them), written in plain PyTorch from the public definitions:

- InternLM2 / InternLM2.5: modeling_internlm2.py and configuration_internlm2.py as the checkpoints
  ship them (InternLM/InternLM's tools/convert2llama.py documents the grouped ``wqkv`` layout);
- MiniCPM 1/2/4: model/modeling_minicpm.py and configuration_minicpm.py in OpenBMB/MiniCPM, and
  MiniCPM 4's ``MiniCPMLongRoPE`` as its checkpoints' modeling_minicpm.py builds it;
- Grok-1: modeling_grok1.py and configuration_grok1.py of hpcai-tech/grok-1 (as copied in
  tenstorrent/tt-metal models/experimental/grok/reference/), cross-checked with xai-org/grok-1's
  JAX model.py (routing weights not renormalised; RMSNorm weights named ``scale``).

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
    """``weight * x / rms(x)``; ``weight_name``: the scale's name in the checkpoint (Grok-1: ``scale``)."""

    def __init__(self, size: int, eps: float, weight_name: str = "weight"):
        super().__init__()
        self.weight_name = weight_name
        setattr(self, weight_name, nn.Parameter(torch.ones(size)))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = getattr(self, self.weight_name)
        return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))


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


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                     scale: float | None = None, cap: float | None = None) -> torch.Tensor:
    """q [T, heads, d], k and v [T, kv_heads, d] -> [T, heads * d]; query head i reads kv head
    ``i // (heads / kv_heads)``; logits ``q.k * scale`` (default ``1 / sqrt(d)``), soft-capped to
    ``cap * tanh(logits / cap)`` when ``cap`` is given."""
    tokens, heads, dim = q.shape
    cos, sin = cos.to(q.device), sin.to(q.device)  # the tables are built on the CPU
    q, k = rotate(q, cos, sin), rotate(k, cos, sin)
    repeat = heads // k.shape[1]
    k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q, k) * (scale if scale is not None else 1 / math.sqrt(dim))
    if cap is not None:
        scores = cap * torch.tanh(scores / cap)
    future = torch.ones(tokens, tokens, dtype=torch.bool, device=q.device).triu(1)
    weights = scores.masked_fill(future, float("-inf")).softmax(dim=-1)
    return torch.einsum("hqk,khd->qhd", weights, v).reshape(tokens, heads * dim)


class GatedFeedForward(nn.Module):
    """``down(act(gate(x)) * up(x))`` without biases; ``names``: (gate, up, down) as the checkpoint
    names them; ``act``: an activation the model fixes (default: the config's ``hidden_act``)."""

    def __init__(self, config: CustomCodeConfig, names: tuple[str, str, str], act: str | None = None):
        super().__init__()
        self.names = names
        sizes = [(config.hidden_size, config.intermediate_size)] * 2 + [(config.intermediate_size, config.hidden_size)]
        for name, (inputs, outputs) in zip(names, sizes):
            setattr(self, name, nn.Linear(inputs, outputs, bias=False))
        self.act = ACT2FN[act or config.get("hidden_act", "silu")]

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
    # Softmax scale (None: 1 / sqrt(head_dim)) and logit soft-cap, for models that change them.
    scale: float | None = None
    cap: float | None = None

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
        return self.o_proj(causal_attention(q, k, v, cos, sin, self.scale, self.cap))


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


# --- Grok-1 --------------------------------------------------------------------------------------

# Grok1Config's defaults (configuration_grok1.py): the released model's values.
GROK1_DEFAULTS = {"attn_output_multiplier": 0.08838834764831845, "max_attn_value": 30.0,
                  "embedding_multiplier_scale": 78.38367176906169, "output_multiplier_scale": 0.5773502691896257,
                  "rms_norm_eps": 1e-5, "tie_word_embeddings": True, "num_experts": 8, "num_experts_per_tok": 2}


def grok1_field(config: CustomCodeConfig, name: str) -> Any:
    """The config's field, or Grok1Config's default when config.json leaves it out."""
    return config.get(name, GROK1_DEFAULTS[name])


class Grok1Attention(MiniCPMAttention):
    """MiniCPM's (Llama's) q/k/v/o projections, no biases; logits ``q.k * attn_output_multiplier``
    (no ``1 / sqrt(d)``), then ``max_attn_value * tanh(logits / max_attn_value)``."""

    def __init__(self, config: CustomCodeConfig):
        super().__init__(config)
        self.scale, self.cap = grok1_field(config, "attn_output_multiplier"), grok1_field(config, "max_attn_value")


class Grok1Router(nn.Module):
    """``gate``: logits [T, E]; softmax in float32, the ``top_k`` best probabilities taken as the
    weights as they are (modeling_grok1.py's MoeBlock and the JAX MoELayer both leave them
    unnormalised). Returns ``(logits, weights, expert ids)`` as transformers 5's routers do
    (tests/test_moe_plugins.py reads the ids)."""

    def __init__(self, hidden_size: int, num_experts: int, top_k: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size))
        self.top_k = top_k

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        logits = x @ self.weight.t()
        weights, ids = logits.float().softmax(dim=-1).topk(self.top_k, dim=-1)
        return logits, weights, ids


class Grok1MoE(nn.Module):
    """``moe_block``: the router ``gate`` and ``experts.E.{linear, linear_v, linear_1}`` (gate, up,
    down), each ``linear_1(gelu(linear(x)) * linear_v(x))`` with erf GELU (``nn.GELU()``)."""

    def __init__(self, config: CustomCodeConfig):
        super().__init__()
        num_experts = grok1_field(config, "num_experts")
        self.gate = Grok1Router(config.hidden_size, num_experts, grok1_field(config, "num_experts_per_tok"))
        self.experts = nn.ModuleList(GatedFeedForward(config, ("linear", "linear_v", "linear_1"), act="gelu")
                                     for _ in range(num_experts))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, weights, ids = self.gate(x)
        out = torch.zeros_like(x)
        for token in range(x.shape[0]):
            for weight, expert in zip(weights[token], ids[token].tolist()):
                out[token] += weight * self.experts[expert](x[token])
        return out


class Grok1Layer(nn.Module):
    """``x += post_attn_norm(attn(pre_attn_norm(x))); x += post_moe_norm(moe_block(pre_moe_norm(x)))``."""

    def __init__(self, config: CustomCodeConfig):
        super().__init__()
        eps = grok1_field(config, "rms_norm_eps")
        self.attn, self.moe_block = Grok1Attention(config), Grok1MoE(config)
        for name in ("pre_attn_norm", "post_attn_norm", "pre_moe_norm", "post_moe_norm"):
            setattr(self, name, RMSNorm(config.hidden_size, eps, weight_name="scale"))

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.post_attn_norm(self.attn(self.pre_attn_norm(x), cos, sin))
        return x + self.post_moe_norm(self.moe_block(self.pre_moe_norm(x)))


class Grok1Reference(nn.Module):
    """``model.embed_tokens``, ``model.layers``, ``model.norm``, ``lm_head`` (tied unless
    ``tie_word_embeddings`` is false): logits of ``lm_head(norm(layers(embed(ids) *
    embedding_multiplier_scale))) * output_multiplier_scale``. The RMSNorms' weights are named
    ``scale`` (modeling_grok1.py initialises them to zeros, which a checkpoint overwrites). The
    rotary embedding is Llama's "rotate half" with base 10000 whatever the config says
    (modeling_grok1.py reads neither ``rope_theta`` nor ``rope_scaling``)."""

    def __init__(self, config: CustomCodeConfig):
        super().__init__()
        self.config = config
        self.model = nn.Module()
        self.model.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.model.layers = nn.ModuleList(Grok1Layer(config) for _ in range(config.num_hidden_layers))
        self.model.norm = RMSNorm(config.hidden_size, grok1_field(config, "rms_norm_eps"), weight_name="scale")
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if grok1_field(config, "tie_word_embeddings"):
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.model.embed_tokens(input_ids[0]) * grok1_field(self.config, "embedding_multiplier_scale")
        plain_rope = CustomCodeConfig(max_position_embeddings=self.config.max_position_embeddings)
        cos, sin = rope_cos_sin(plain_rope, heads_of(self.config)[2], x.shape[0])
        for layer in self.model.layers:
            x = layer(x, cos, sin)
        return (self.lm_head(self.model.norm(x)) * grok1_field(self.config, "output_multiplier_scale"))[None]


def grok1(**fields: Any) -> tuple[CustomCodeConfig, Grok1Reference]:
    """A config as Grok-1's config.json (hpcai-tech/grok-1) has it, with ``fields``, and its
    reference, named as that checkpoint: ``model.layers.N.{attn.{q,k,v,o}_proj,
    moe_block.{gate, experts.E.{linear,linear_v,linear_1}}, {pre,post}_{attn,moe}_norm.scale}``."""
    config = CustomCodeConfig(**{
        "architectures": ["Grok1ModelForCausalLM"], "model_type": "grok-1",
        "auto_map": {"AutoConfig": "configuration_grok1.Grok1Config", "AutoModel": "modeling_grok1.Grok1Model",
                     "AutoModelForCausalLM": "modeling_grok1.Grok1ModelForCausalLM"},
        "torch_dtype": "bfloat16", "transformers_version": "4.35.0", "use_cache": True, **fields})
    return config, Grok1Reference(config)

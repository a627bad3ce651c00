"""The Llama family on sglang-core's tensor-parallel layers and attention interface."""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from sglang_core.layers.activation import SiluAndMul
from sglang_core.layers.attention import Attention
from sglang_core.layers.attention_spec import HeadShape
from sglang_core.layers.norm import RMSNorm
from sglang_core.layers.parallel import (
    MergedColumnParallelLinear,
    ParallelLMHead,
    QKVParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
)
from sglang_core.layers.rotary import RotaryEmbedding, rope_from_config
from sglang_core.model_executor.forward_batch import ForwardBatch
from sglang_core.model_executor.model_api import ModelContext, load_by_name


class LlamaMLP(nn.Module):
    def __init__(self, config, ctx: ModelContext, prefix: str):
        super().__init__()
        bias = getattr(config, "mlp_bias", False)
        self.gate_up_proj = MergedColumnParallelLinear(
            config.hidden_size, [config.intermediate_size] * 2, bias, ctx.tp, ctx.dtype,
            ctx.quant_method_for(f"{prefix}.gate_up_proj"))
        self.down_proj = RowParallelLinear(
            config.intermediate_size, config.hidden_size, bias, ctx.tp, ctx.dtype,
            ctx.quant_method_for(f"{prefix}.down_proj"))
        self.act = SiluAndMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_up_proj(x)))


class LlamaAttention(nn.Module):
    def __init__(self, config, ctx: ModelContext, layer_id: int, prefix: str, rotary: RotaryEmbedding):
        super().__init__()
        shape = HeadShape.from_config(config)
        heads, head_dim = shape.num_heads, shape.head_dim
        bias = getattr(config, "attention_bias", False)
        self.qkv_proj = QKVParallelLinear(config.hidden_size, head_dim, heads, shape.num_kv_heads, bias, ctx.tp, ctx.dtype,
                                          ctx.quant_method_for(f"{prefix}.qkv_proj"))
        self.o_proj = RowParallelLinear(heads * head_dim, config.hidden_size, bias, ctx.tp, ctx.dtype,
                                        ctx.quant_method_for(f"{prefix}.o_proj"))
        self.q_size = self.qkv_proj.num_heads * head_dim
        self.kv_size = self.qkv_proj.num_kv_heads * head_dim
        self.head_dim = head_dim
        self.rotary = rotary
        self.attn = Attention(layer_id, self.qkv_proj.num_heads, self.qkv_proj.num_kv_heads, head_dim,
                              head_dim**-0.5, getattr(config, "sliding_window", None))

    def forward(self, positions: torch.Tensor, x: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        n, d = x.shape[0], self.head_dim
        q, k = self.rotary(positions, q.view(n, -1, d), k.view(n, -1, d))
        out = self.attn(q.reshape(n, -1), k.reshape(n, -1), v, batch)
        return self.o_proj(out)


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config, ctx: ModelContext, layer_id: int, prefix: str, rotary: RotaryEmbedding):
        super().__init__()
        self.self_attn = LlamaAttention(config, ctx, layer_id, f"{prefix}.self_attn", rotary)
        self.mlp = LlamaMLP(config, ctx, f"{prefix}.mlp")
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, ctx.dtype)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, ctx.dtype)

    def forward(self, positions: torch.Tensor, x: torch.Tensor, residual: torch.Tensor | None,
                batch: ForwardBatch) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            residual, x = x, self.input_layernorm(x)
        else:
            x, residual = self.input_layernorm(x, residual)
        x = self.self_attn(positions, x, batch)
        x, residual = self.post_attention_layernorm(x, residual)
        return self.mlp(x), residual


class LlamaModel(nn.Module):
    decoder_layer_cls = LlamaDecoderLayer  # variants swap in their own layer class

    def __init__(self, config, ctx: ModelContext):
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size, ctx.tp, ctx.dtype)
        # One cos/sin table for all layers: per layer it would cost GBs at 128k positions.
        rotary = rope_from_config(config, HeadShape.from_config(config).head_dim, max_position=ctx.max_position)
        self.layers = nn.ModuleList(
            self.decoder_layer_cls(config, ctx, i, f"model.layers.{i}", rotary)
            for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, ctx.dtype)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        x, residual = self.embed(input_ids), None
        for layer in self.layers:
            x, residual = layer(positions, x, residual, batch)
        x, _ = self.norm(x, residual)
        return x


class LlamaForCausalLM(nn.Module):
    model_cls = LlamaModel  # variants swap in their own decoder stack
    # checkpoint name fragment -> (fused parameter fragment, shard id)
    stacked_params = {
        "q_proj": ("qkv_proj", "q"),
        "k_proj": ("qkv_proj", "k"),
        "v_proj": ("qkv_proj", "v"),
        "gate_proj": ("gate_up_proj", 0),
        "up_proj": ("gate_up_proj", 1),
    }

    def __init__(self, config, ctx: ModelContext):
        super().__init__()
        self.config = config
        self.model = self.model_cls(config, ctx)
        self.tied = bool(getattr(config, "tie_word_embeddings", False))
        if self.tied:
            self.lm_head = self.model.embed_tokens
        else:
            self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size, ctx.tp, ctx.dtype)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        return self.model(input_ids, positions, batch)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head.project(hidden).float()

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        ignore = ("rotary_emb.inv_freq",) + (("lm_head.weight",) if self.tied else ())
        params = dict(self.named_parameters(remove_duplicate=False))
        loaded = load_by_name(params, weights, self.stacked_params, ignore)
        missing = {n for n in params if n not in loaded and not (self.tied and n.startswith("lm_head."))}
        if missing:
            raise ValueError(f"checkpoint lacks weights for: {', '.join(sorted(missing)[:8])}")

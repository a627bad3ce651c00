"""Multi-head Latent Attention (DeepSeek-V2/V3), served from one cached latent per token.

Per token, ``kv_a_proj_with_mqa`` gives a latent ``c`` (``kv_lora_rank`` values, RMS-normed by
``kv_a_layernorm``) and one rotary key ``k_pe`` (``qk_rope_head_dim`` values) shared by all
heads. ``kv_b_proj`` would expand ``c`` into each head's non-rotary key ``W_UK c`` and value
``W_UV c``; instead the KV pool keeps ``[c, k_pe]`` (``KVLayout.LATENT``, ``kv_lora_rank +
qk_rope_head_dim`` values per token and layer) and the weights move to the query and output side:

    q_nope . (W_UK c) = (W_UK^T q_nope) . c           (query absorbed into latent space)
    sum_j p_j W_UV c_j = W_UV (sum_j p_j c_j)         (value read as the latent, expanded after)

so each head attends with query ``[W_UK^T q_nope, q_pe]`` over keys ``[c, k_pe]`` and values
``c``, then ``W_UV`` and ``o_proj`` give the output. This is exact, and serves both prefill and
decode here. (Prefill could instead expand the latents into per-head keys and values, cheaper
when a chunk is long; that is a later optimisation.)

The softmax scale is ``(qk_nope_head_dim + qk_rope_head_dim) ** -0.5``, the width of the
un-absorbed head, times YaRN's ``mscale_all_dim`` correction squared when the rope sets it.
"""

from __future__ import annotations

import torch
from torch import nn

from sglang_core.layers.attention import Attention, KVLayout
from sglang_core.layers.norm import RMSNorm
from sglang_core.layers.parallel import ColumnParallelLinear, RowParallelLinear
from sglang_core.layers.rotary import RotaryEmbedding, rope_parameters, yarn_softmax_scale
from sglang_core.model_executor.forward_batch import ForwardBatch
from sglang_core.model_executor.model_api import ModelContext

# transformers builds q_a_layernorm and kv_a_layernorm with their default eps, not rms_norm_eps.
LATENT_NORM_EPS = 1e-6


class MultiHeadLatentAttention(nn.Module):
    """One layer's MLA: ``q_proj`` (or ``q_a_proj`` -> ``q_a_layernorm`` -> ``q_b_proj`` when
    ``q_lora_rank`` is set), ``kv_a_proj_with_mqa``, ``kv_a_layernorm``, ``kv_b_proj``, ``o_proj``,
    named as the checkpoints name them. ``attention_bias`` puts biases on ``q_a_proj``,
    ``kv_a_proj_with_mqa`` and ``o_proj`` only. Heads are split across tensor-parallel ranks; the
    ``_a`` projections are replicated."""

    def __init__(self, config, ctx: ModelContext, prefix: str, layer_id: int, rotary: RotaryEmbedding):
        super().__init__()
        hidden, heads = config.hidden_size, config.num_attention_heads
        self.nope_dim, self.rope_dim = config.qk_nope_head_dim, config.qk_rope_head_dim
        self.v_head_dim, self.kv_lora_rank = config.v_head_dim, config.kv_lora_rank
        self.q_lora_rank = config.q_lora_rank
        bias = bool(getattr(config, "attention_bias", False))
        qk_head_dim = self.nope_dim + self.rope_dim

        if self.q_lora_rank is None:
            self.q_proj = ColumnParallelLinear(hidden, heads * qk_head_dim, False, ctx.tp, ctx.dtype,
                                               ctx.quant_method_for(f"{prefix}.q_proj"))
        else:
            self.q_a_proj = ColumnParallelLinear(hidden, self.q_lora_rank, bias, params_dtype=ctx.dtype,
                                                 quant_method=ctx.quant_method_for(f"{prefix}.q_a_proj"))
            self.q_a_layernorm = RMSNorm(self.q_lora_rank, LATENT_NORM_EPS, ctx.dtype)
            self.q_b_proj = ColumnParallelLinear(self.q_lora_rank, heads * qk_head_dim, False, ctx.tp, ctx.dtype,
                                                 ctx.quant_method_for(f"{prefix}.q_b_proj"))
        self.kv_a_proj_with_mqa = ColumnParallelLinear(
            hidden, self.kv_lora_rank + self.rope_dim, bias, params_dtype=ctx.dtype,
            quant_method=ctx.quant_method_for(f"{prefix}.kv_a_proj_with_mqa"))
        self.kv_a_layernorm = RMSNorm(self.kv_lora_rank, LATENT_NORM_EPS, ctx.dtype)
        if ctx.quant_method_for(f"{prefix}.kv_b_proj") is not None:
            # Absorption multiplies by kv_b_proj's weight matrix itself, so it must be a plain one.
            raise ValueError("quantization_config: kv_b_proj of multi-head latent attention must be unquantized")
        self.kv_b_proj = ColumnParallelLinear(self.kv_lora_rank, heads * (self.nope_dim + self.v_head_dim), False,
                                              ctx.tp, ctx.dtype)
        self.o_proj = RowParallelLinear(heads * self.v_head_dim, hidden, bias, ctx.tp, ctx.dtype,
                                        ctx.quant_method_for(f"{prefix}.o_proj"))
        self.num_heads = ctx.tp.split(heads, "num_attention_heads")
        self.rotary = rotary
        scale = yarn_softmax_scale(rope_parameters(config), qk_head_dim**-0.5)
        self.attn = Attention(layer_id, self.num_heads, 1, self.kv_lora_rank + self.rope_dim, scale,
                              v_head_dim=self.kv_lora_rank, kv_layout=KVLayout.LATENT)

    def _queries(self, x: torch.Tensor) -> torch.Tensor:
        if self.q_lora_rank is None:
            return self.q_proj(x)
        return self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))

    def forward(self, positions: torch.Tensor, x: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        n, heads, rank = x.shape[0], self.num_heads, self.kv_lora_rank
        q_nope, q_pe = self._queries(x).view(n, heads, -1).split([self.nope_dim, self.rope_dim], dim=-1)
        latent, k_pe = self.kv_a_proj_with_mqa(x).split([rank, self.rope_dim], dim=-1)
        latent = self.kv_a_layernorm(latent.contiguous())
        q_pe, k_pe = self.rotary(positions, q_pe, k_pe.reshape(n, 1, self.rope_dim))
        # kv_b_proj's rows, per head: nope_dim rows of W_UK, then v_head_dim rows of W_UV.
        w_uk, w_uv = self.kv_b_proj.weight.view(heads, -1, rank).split([self.nope_dim, self.v_head_dim], dim=1)
        q_latent = torch.bmm(q_nope.transpose(0, 1), w_uk).transpose(0, 1)  # [n, heads, rank]
        query = torch.cat([q_latent, q_pe], dim=-1).reshape(n, -1)
        key = torch.cat([latent, k_pe.reshape(n, self.rope_dim)], dim=-1)
        out_latent = self.attn(query, key, None, batch).view(n, heads, rank)
        out = torch.bmm(out_latent.transpose(0, 1), w_uv.transpose(1, 2)).transpose(0, 1)  # [n, heads, v]
        return self.o_proj(out.reshape(n, -1))

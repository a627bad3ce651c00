"""Multi-head Latent Attention (DeepSeek-V2/V3), served from one cached latent per token, or from
per-head keys and values with ``--disable-mla``.

Per token, ``kv_a_proj_with_mqa`` gives a latent ``c`` (``kv_lora_rank`` values, RMS-normed by
``kv_a_layernorm``) and one rotary key ``k_pe`` (``qk_rope_head_dim`` values) shared by all
heads. ``kv_b_proj`` expands ``c`` into each head's non-rotary key ``W_UK c`` and value
``W_UV c``. The KV pool keeps only ``[c, k_pe]`` (``KVLayout.LATENT``, ``kv_lora_rank +
qk_rope_head_dim`` values per token and layer), and attention runs one of two exact ways:

- absorbed (decode, and extends over long cached prefixes): the weights move to the query and
  output side,

      q_nope . (W_UK c) = (W_UK^T q_nope) . c           (query absorbed into latent space)
      sum_j p_j W_UV c_j = W_UV (sum_j p_j c_j)         (value read as the latent, expanded after)

  so each head attends with query ``[W_UK^T q_nope, q_pe]`` over keys ``[c, k_pe]`` and values
  ``c`` straight from the pool, then ``W_UV`` and ``o_proj`` give the output;
- expanded (prefill, and extends long against their cached prefix): the new latents are stored,
  the latents of every token of the batch's sequences are read back from the pool, ``kv_b_proj``
  expands them into per-head keys ``[W_UK c, k_pe]`` and values ``W_UV c``, and the backend runs
  ordinary causal attention over those (``Attention.extend_given_kv``), narrower per key.

``expanding_is_cheaper`` picks the way per extend batch by counting multiply-adds; the pool, the
prefix cache and chunked prefill see latents only either way. ``EXTEND_PATH`` can force one way.

With ``--disable-mla`` (``ModelContext.disable_mla``, SGLang's flag) the layer is served as
ordinary multi-head attention instead: each new token's latent is expanded once, when it is
written, into every head's key ``[W_UK c, k_pe]`` (``qk_nope_head_dim + qk_rope_head_dim``
values) and value ``W_UV c`` (``v_head_dim``), the pool keeps those (``KVLayout.SEPARATE``,
``heads * (qk_nope_head_dim + qk_rope_head_dim + v_head_dim)`` values per token and layer: 5120
against the latent's 576 for DeepSeek-V2-Lite), and decode and extend attend over them as any
model's layers do, with nothing absorbed. It costs memory and saves ``kv_b_proj`` work per read.

The projections of the layer's input, ``q_proj`` (or ``q_a_proj``) and ``kv_a_proj_with_mqa``,
run as one matmul (``fused_qkv_a_proj``, one GEMV launch at batch 1) where both are replicated
(``q_a_proj`` always is; ``q_proj`` only on one rank, since ranks split it by heads), biased
alike and unquantized (``merges_input_projections``).

A quantized ``kv_b_proj`` (DeepSeek-V3's FP8 release quantizes it) loads as the checkpoint has it
and is then replaced by the float matrix it stands for (``finish_loading``), as DeepSeek's own
inference code dequantizes it: absorption needs the matrix, and its inputs are never rounded.

The softmax scale is ``(qk_nope_head_dim + qk_rope_head_dim) ** -0.5``, the width of the
un-absorbed head, times YaRN's ``mscale_all_dim`` correction squared when the rope sets it.
"""

from __future__ import annotations

import torch
from torch import nn

from sglang_core.kernels import use_fused
from sglang_core.layers.attention import Attention, AttentionLayerSpec, KVLayout
from sglang_core.kernels.rows_out import RowsOut
from sglang_core.layers.norm import RMSNorm
from sglang_core.layers.parallel import ColumnParallelLinear, MergedColumnParallelLinear, RowParallelLinear
from sglang_core.layers.quant import UnquantizedMethod
from sglang_core.layers.rotary import RotaryEmbedding, rope_parameters, yarn_softmax_scale
from sglang_core.model_executor.forward_batch import ForwardBatch, ForwardMode
from sglang_core.model_executor.model_api import ModelContext

# transformers builds q_a_layernorm and kv_a_layernorm with their default eps, not rms_norm_eps.
LATENT_NORM_EPS = 1e-6
# How extend batches attend: "cost" (by ``expanding_is_cheaper``), or always "absorbed" or
# "expanded" (tests serve both ways). Decode is absorbed in every case.
EXTEND_PATH = "cost"
EXTEND_PATHS = ("cost", "absorbed", "expanded")
# Tokens up to which the absorbed query is one launch (absorbed_query.py, which reads each head's
# W_UK once per token: from L2 after the first) rather than the rotary and one bmm (reads it once).
ABSORBED_QUERY_MAX_TOKENS = 8


def expanding_is_cheaper(prefix_lens: list[int], extend_lens: list[int], kv_lora_rank: int, qk_nope_head_dim: int,
                         v_head_dim: int) -> bool:
    """Whether expanding the latents costs fewer multiply-adds than absorbing for an extend batch
    of requests with these cached prefixes and new tokens.

    Per head, with rank r, non-rotary width d_n, rotary width d_r, value width d_v, n new tokens
    over a prefix of P, and A = n * P + n * (n + 1) / 2 causal (query, key) pairs:

    - absorbed: n * r * d_n (queries through W_UK) + A * (r + d_r) (logits over the latents)
      + A * r (values: the latents) + n * r * d_v (W_UV after);
    - expanded: (P + n) * r * (d_n + d_v) (``kv_b_proj`` over every key token, the prefix too)
      + A * (d_n + d_r) (logits) + A * d_v (values).

    The rotary part costs the same both ways and heads multiply both, so expanding is cheaper when
    P * r * (d_n + d_v) < A * (2r - d_n - d_v), summed over the batch. A fresh prompt (P = 0)
    always expands; one token over a prefix never does (DeepSeek-V2's sizes: expand when A is
    over 171 P, e.g. any extend of 171 or more new tokens). The expanded keys and values live
    only during the layer (S tokens x heads x (d_n + d_r + d_v) values); that is the price."""
    pairs = sum(n * p + n * (n + 1) // 2 for p, n in zip(prefix_lens, extend_lens))
    expansion = sum(prefix_lens) * kv_lora_rank * (qk_nope_head_dim + v_head_dim)
    return expansion < pairs * (2 * kv_lora_rank - qk_nope_head_dim - v_head_dim)


def merges_input_projections(config, ctx: ModelContext, prefix: str) -> bool:
    """Whether the attention at ``prefix`` computes its query (or query LoRA) and latent
    projections of the input as one matmul (see the module docstring)."""
    query = "q_proj" if config.q_lora_rank is None else "q_a_proj"
    if query == "q_proj" and (ctx.tp.size > 1 or getattr(config, "attention_bias", False)):
        return False  # q_proj is split by heads over ranks, and has no bias where kv_a has one
    return all(ctx.quant_method_for(f"{prefix}.{name}") is None for name in (query, "kv_a_proj_with_mqa"))


class MultiHeadLatentAttention(nn.Module):
    """One layer's MLA: ``q_proj`` (or ``q_a_proj`` -> ``q_a_layernorm`` -> ``q_b_proj`` when
    ``q_lora_rank`` is set), ``kv_a_proj_with_mqa``, ``kv_a_layernorm``, ``kv_b_proj``, ``o_proj``,
    named as the checkpoints name them. ``attention_bias`` puts biases on ``q_a_proj``,
    ``kv_a_proj_with_mqa`` and ``o_proj`` only. Heads are split across tensor-parallel ranks; the
    ``_a`` projections are replicated. ``merged_input``: the input's projections as one,
    ``fused_qkv_a_proj`` (shard 0 the query's, 1 ``kv_a_proj_with_mqa``), where
    ``merges_input_projections`` allows. ``ctx.disable_mla``: every head's K/V cached instead of the latent."""

    def __init__(self, config, ctx: ModelContext, prefix: str, layer_id: int, rotary: RotaryEmbedding,
                 merged_input: bool = False):
        super().__init__()
        hidden, heads = config.hidden_size, config.num_attention_heads
        self.nope_dim, self.rope_dim = config.qk_nope_head_dim, config.qk_rope_head_dim
        self.v_head_dim, self.kv_lora_rank = config.v_head_dim, config.kv_lora_rank
        self.q_lora_rank = config.q_lora_rank
        bias = bool(getattr(config, "attention_bias", False))
        qk_head_dim = self.nope_dim + self.rope_dim

        latent_width = self.kv_lora_rank + self.rope_dim
        query_width = heads * qk_head_dim if self.q_lora_rank is None else self.q_lora_rank
        if merged_input and not merges_input_projections(config, ctx, prefix):
            raise ValueError(f"{prefix}: its input projections cannot be merged (see merges_input_projections)")
        self.merged_input = merged_input
        if merged_input:
            self.fused_qkv_a_proj = MergedColumnParallelLinear(hidden, [query_width, latent_width], bias,
                                                               params_dtype=ctx.dtype)
        elif self.q_lora_rank is None:
            self.q_proj = ColumnParallelLinear(hidden, query_width, False, ctx.tp, ctx.dtype,
                                               ctx.quant_method_for(f"{prefix}.q_proj"))
        else:
            self.q_a_proj = ColumnParallelLinear(hidden, query_width, bias, params_dtype=ctx.dtype,
                                                 quant_method=ctx.quant_method_for(f"{prefix}.q_a_proj"))
        if not merged_input:
            self.kv_a_proj_with_mqa = ColumnParallelLinear(
                hidden, latent_width, bias, params_dtype=ctx.dtype,
                quant_method=ctx.quant_method_for(f"{prefix}.kv_a_proj_with_mqa"))
        if self.q_lora_rank is not None:
            self.q_a_layernorm = RMSNorm(self.q_lora_rank, LATENT_NORM_EPS, ctx.dtype)
            self.q_b_proj = ColumnParallelLinear(self.q_lora_rank, heads * qk_head_dim, False, ctx.tp, ctx.dtype,
                                                 ctx.quant_method_for(f"{prefix}.q_b_proj"))
        self.kv_a_layernorm = RMSNorm(self.kv_lora_rank, LATENT_NORM_EPS, ctx.dtype)
        # Absorption multiplies by kv_b_proj's weight matrix itself: a quantized one (DeepSeek-V3's
        # FP8 release) loads as quantized, then becomes the float matrix it stands for (finish_loading).
        self.kv_b_proj = ColumnParallelLinear(self.kv_lora_rank, heads * (self.nope_dim + self.v_head_dim), False,
                                              ctx.tp, ctx.dtype, ctx.quant_method_for(f"{prefix}.kv_b_proj"))
        self.o_proj = RowParallelLinear(heads * self.v_head_dim, hidden, bias, ctx.tp, ctx.dtype,
                                        ctx.quant_method_for(f"{prefix}.o_proj"))
        self.num_heads = ctx.tp.split(heads, "num_attention_heads")
        self.rotary = rotary
        scale = yarn_softmax_scale(rope_parameters(config), qk_head_dim**-0.5)
        self.caches_per_head = ctx.disable_mla
        if self.caches_per_head:
            self.attn = Attention(layer_id, self.num_heads, self.num_heads, qk_head_dim, scale,
                                  v_head_dim=self.v_head_dim)
        else:
            self.attn = Attention(layer_id, self.num_heads, 1, self.kv_lora_rank + self.rope_dim, scale,
                                  v_head_dim=self.kv_lora_rank, kv_layout=KVLayout.LATENT)
            # The expanded heads, over keys and values derived from the cache (not cached themselves).
            self.expanded = AttentionLayerSpec(self.num_heads, self.num_heads, qk_head_dim, self.v_head_dim, scale)

    def finish_loading(self) -> None:
        """A quantized ``kv_b_proj`` replaced by a plain one holding the matrix it computes, read as
        its product with the identity (one-hot rows round exactly under any activation scheme), as
        DeepSeek's own inference code dequantizes it for absorption; its inputs are not rounded."""
        quantized = self.kv_b_proj
        if isinstance(quantized.quant_method, UnquantizedMethod):
            return
        device, dtype = next(quantized.parameters()).device, self.kv_a_layernorm.weight.dtype  # the activations' dtype
        with torch.no_grad():
            matrix = quantized(torch.eye(self.kv_lora_rank, dtype=dtype, device=device)).t()
            plain = ColumnParallelLinear(self.kv_lora_rank, matrix.shape[0] * quantized.tp.size, False, quantized.tp,
                                         dtype).to(device)
            plain.weight.copy_(matrix)
        self.kv_b_proj = plain

    def _projections(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(queries [n, heads * (nope + rope)], ``kv_a_proj_with_mqa``'s output [n, rank + rope])."""
        if self.merged_input:
            query, latent = self.fused_qkv_a_proj(x).split(self.fused_qkv_a_proj.output_sizes, dim=-1)
        else:
            query = self.q_proj(x) if self.q_lora_rank is None else self.q_a_proj(x)
            latent = self.kv_a_proj_with_mqa(x)
        if self.q_lora_rank is not None:
            query = self.q_b_proj(self.q_a_layernorm(query))
        return query, latent

    def forward(self, positions: torch.Tensor, x: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        n = x.shape[0]
        query, cached = self._projections(x)
        q_nope, q_pe = query.view(n, self.num_heads, -1).split([self.nope_dim, self.rope_dim], dim=-1)
        # What the pool keeps, [normed latent, rotated k_pe], written over the projection's output
        # (views at its row stride): the norm writes in place, the rotary turns k_pe in place on CUDA.
        latent, k_pe = cached.split([self.kv_lora_rank, self.rope_dim], dim=-1)
        k_pe = k_pe.view(n, 1, self.rope_dim)
        if self.caches_per_head:
            self.kv_a_layernorm(latent, out=latent)
            q_pe, k_pe = self.rotary(positions, q_pe, k_pe)
            keys, values = self._expand(latent, k_pe.reshape(n, self.rope_dim))
            query = torch.cat([q_nope, q_pe], dim=-1).reshape(n, -1)
            return self.o_proj(self.attn(query, keys.reshape(n, -1), values.reshape(n, -1), batch))
        expands = self._expands(batch)
        # Absorbed, the attention query [W_UK^T q_nope, rotated q_pe] is assembled in place: the
        # rotary writes the last rope_dim values of each head, the bmm the others; on CUDA one
        # launch does both and k_pe's rotary (absorbed_query.py).
        query = None if expands else q_nope.new_empty(n, self.num_heads, self.kv_lora_rank + self.rope_dim)
        w_uk, w_uv = self.kv_b_proj.weight.view(self.num_heads, -1, self.kv_lora_rank).split(
            [self.nope_dim, self.v_head_dim], dim=1)  # per head: nope_dim rows of W_UK, then v_head_dim of W_UV
        if query is not None and use_fused(query) and positions.dim() == 1 and n <= ABSORBED_QUERY_MAX_TOKENS:
            from .absorbed_query import absorbed_query

            absorbed_query(q_nope, w_uk, q_pe, k_pe, query, positions, self.rotary.cos_cache, self.rotary.sin_cache,
                           self.rotary.interleaved)
        else:
            q_pe, k_rotated = self.rotary(positions, q_pe, k_pe, None if expands else query[..., self.kv_lora_rank:])
            if k_rotated is not k_pe:  # rotated out of place (off CUDA): the cached row takes it
                k_pe.copy_(k_rotated)
            if query is not None:
                torch.bmm(q_nope.transpose(0, 1), w_uk, out=query[..., :self.kv_lora_rank].transpose(0, 1))
        # Absorbed, where the backend lets the layer store the new latents, the norm's launch also
        # writes the whole cached row, the rotated k_pe (turned above) after the latent, into its
        # pool slot, and the attention stores nothing.
        slots = None if expands else self.attn.new_kv_rows(batch, cached.dtype)
        self.kv_a_layernorm(latent, out=latent, rows_out=None if slots is None else RowsOut(*slots, k_pe.view(n, -1)))
        if expands:
            return self.o_proj(self._expanded(q_nope, q_pe, cached, batch).reshape(n, -1))
        return self.o_proj(self._absorbed(query, w_uv, cached if slots is None else None, batch).reshape(n, -1))

    def _expand(self, latents: torch.Tensor, k_pe: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-head keys ``[W_UK c, k_pe]`` [S, heads, nope + rope] and values ``W_UV c`` [S, heads, v]
        of S tokens' latents [S, rank] and rotary keys [S, rope]."""
        tokens, heads = latents.shape[0], self.num_heads
        k_nope, values = self.kv_b_proj(latents).view(tokens, heads, -1).split([self.nope_dim, self.v_head_dim], dim=-1)
        keys = torch.cat([k_nope, k_pe.unsqueeze(1).expand(tokens, heads, self.rope_dim)], dim=-1)
        return keys, values

    def _expands(self, batch: ForwardBatch) -> bool:
        if EXTEND_PATH not in EXTEND_PATHS:
            raise ValueError(f"EXTEND_PATH: one of {EXTEND_PATHS}, not {EXTEND_PATH!r}")
        if batch.mode is not ForwardMode.EXTEND or EXTEND_PATH == "absorbed":
            return False
        if EXTEND_PATH == "expanded":
            return True
        return self.attn.attends_given_kv and expanding_is_cheaper(
            batch.prefix_lens_cpu, batch.extend_lens_cpu, self.kv_lora_rank, self.nope_dim, self.v_head_dim)

    def _absorbed(self, query: torch.Tensor, w_uv: torch.Tensor, cached: torch.Tensor | None,
                  batch: ForwardBatch) -> torch.Tensor:
        """Attention of the queries in latent space (``query`` [n, heads, rank + rope]) over the
        pool's latents (``cached``: the new rows the backend stores; None: already stored), values
        out through ``w_uv`` [heads, v, rank]: [n, heads, v]."""
        n, heads, rank = query.shape[0], self.num_heads, self.kv_lora_rank
        out_latent = self.attn(query.view(n, -1), cached, None, batch).view(n, heads, rank)
        return torch.bmm(out_latent.transpose(0, 1), w_uv.transpose(1, 2)).transpose(0, 1)

    def _expanded(self, q_nope: torch.Tensor, q_pe: torch.Tensor, cached: torch.Tensor,
                  batch: ForwardBatch) -> torch.Tensor:
        """The new latents stored, every sequence's latents read back and expanded per head,
        plain attention over those: [n, heads, v]."""
        stored, _ = self.attn.store_and_read_kv(cached, None, batch)  # [S, 1, rank + rope]
        keys, values = self._expand(*stored.view(stored.shape[0], -1).split([self.kv_lora_rank, self.rope_dim], dim=-1))
        query = torch.cat([q_nope, q_pe], dim=-1).reshape(q_nope.shape[0], -1)
        return self.attn.extend_given_kv(query, keys, values, self.expanded, batch)

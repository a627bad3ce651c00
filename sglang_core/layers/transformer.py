"""The blocks most decoder-only transformers are made of, so a model plugin is a short module that
picks and arranges them (see ``plugins/models/``).

- ``SelfAttention``: fused q/k/v projection, optional q/k norms, rotary, paged attention, output
  projection.
- ``GatedMLP`` (``down(act(gate) * up)``) and ``MLP`` (``down(act(up))``).
- ``DecoderLayer``: the pre-norm residual block; ``ParallelDecoderLayer``: attention and MLP read
  the same normed input (GPT-J, Phi-2, Command-R).
- ``DecoderStack``: embedding, layers, final norm; ``DecoderLM``: the stack with its LM head and a
  name-driven weight loader, built from a config by ``make_*`` methods a family overrides.

Residual adds are fused into the next norm: a layer takes ``(x, residual)`` and returns the
sublayer output and the running residual separately, and the next norm computes
``norm(x + residual)`` (one kernel on CUDA). ``residual`` is None before the first layer.
"""

from __future__ import annotations

import re
from typing import Any, Iterable, Sequence

import torch
from torch import nn

from sglang_core.layers.activation import act_fn, gated_act_fn
from sglang_core.layers.attention import Attention
from sglang_core.layers.attention_spec import HeadShape
from sglang_core.layers.norm import HeadwiseLayerNorm, RMSNorm, SplitHeadsRMSNorm, norm_add_norm
from sglang_core.layers.parallel import (
    ColumnParallelLinear,
    MergedColumnParallelLinear,
    ParallelLMHead,
    QKVParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
)
from sglang_core.layers.quant import UnquantizedMethod
from sglang_core.layers.rotary import RotaryEmbedding, rope_from_config
from sglang_core.model_executor.forward_batch import ForwardBatch
from sglang_core.model_executor.model_api import (
    STACKED_EXPERTS,
    ExpertMapping,
    ModelContext,
    expert_mappings,
    load_by_name,
)

# Checkpoint name fragment -> (fused parameter fragment, shard id), for checkpoints that store
# q/k/v and gate/up as separate tensors (Llama's names).
QKV_GATE_UP = {
    "q_proj": ("qkv_proj", "q"),
    "k_proj": ("qkv_proj", "k"),
    "v_proj": ("qkv_proj", "v"),
    "gate_proj": ("gate_up_proj", 0),
    "up_proj": ("gate_up_proj", 1),
}


class SelfAttention(nn.Module):
    """``o_proj(attention(rotary(norm(q)), rotary(norm(k)), v))`` for one layer.

    ``q_norm`` / ``k_norm``: applied to each head (``[tokens, heads, head_dim]``, Qwen3, Gemma 3)
    or, with ``qk_norm_per_head=False``, to the whole projection (``[tokens, heads * head_dim]``,
    OLMo 2; a ``SplitHeadsRMSNorm`` under tensor parallelism). ``rotary`` None: no rotary (learned
    absolute positions). ``scaling`` defaults to ``head_dim ** -0.5``. ``clip_qkv``: the q/k/v
    projection is clamped to ``[-clip_qkv, clip_qkv]`` (DBRX).
    """

    def __init__(self, ctx: ModelContext, prefix: str, layer_id: int, hidden_size: int, shape: HeadShape,
                 rotary: RotaryEmbedding | None, *, qkv_bias: bool = False, o_bias: bool = False,
                 scaling: float | None = None, sliding_window: int | None = None, logit_cap: float | None = None,
                 q_norm: nn.Module | None = None, k_norm: nn.Module | None = None, qk_norm_per_head: bool = True,
                 clip_qkv: float | None = None):
        super().__init__()
        self.clip_qkv = clip_qkv
        d = shape.head_dim
        self.qkv_proj = QKVParallelLinear(hidden_size, d, shape.num_heads, shape.num_kv_heads, qkv_bias, ctx.tp,
                                          ctx.dtype, ctx.quant_method_for(f"{prefix}.qkv_proj"))
        heads, kv_heads = self.qkv_proj.num_heads, self.qkv_proj.num_kv_heads
        self.o_proj = RowParallelLinear(shape.num_heads * d, hidden_size, o_bias, ctx.tp, ctx.dtype,
                                        ctx.quant_method_for(f"{prefix}.o_proj"))
        if not qk_norm_per_head and ctx.tp.size > 1 and not all(
                isinstance(norm, SplitHeadsRMSNorm) for norm in (q_norm, k_norm)):
            # The norm's statistics run over every head: only a norm that reduces across ranks splits.
            raise ValueError("tensor parallelism: a q/k norm over the whole projection splits across ranks only "
                             "as a SplitHeadsRMSNorm")
        self.q_norm, self.k_norm, self.qk_norm_per_head = q_norm, k_norm, qk_norm_per_head
        self.sizes = [heads * d, kv_heads * d, kv_heads * d]
        self.head_dim = d
        self.rotary = rotary
        self.attn = Attention(layer_id, heads, kv_heads, d, d**-0.5 if scaling is None else scaling, sliding_window,
                              logit_cap=logit_cap)

    def forward(self, positions: torch.Tensor, x: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        qkv = self.qkv_proj(x)
        if self.clip_qkv is not None:
            qkv = qkv.clamp(-self.clip_qkv, self.clip_qkv)
        q, k, v = qkv.split(self.sizes, dim=-1)
        n, d = x.shape[0], self.head_dim
        if self.q_norm is not None and not self.qk_norm_per_head:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.view(n, -1, d), k.view(n, -1, d)
        if self.q_norm is not None and self.qk_norm_per_head:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.rotary is not None:
            q, k = self.rotary(positions, q, k)
        return self.o_proj(self.attn(q.reshape(n, -1), k.reshape(n, -1), v, batch))


def headwise_qk_norms(config, ctx: ModelContext, eps: float) -> dict[str, HeadwiseLayerNorm]:
    """``SelfAttention``'s ``q_norm`` and ``k_norm`` as a LayerNorm per head with a scale per head
    (Cohere's ``use_qk_norm``, StableLM's ``qk_layernorm``), for the heads a config states."""
    shape = HeadShape.from_config(config)
    return {"q_norm": HeadwiseLayerNorm(shape.num_heads, shape.head_dim, eps, ctx.dtype, ctx.tp),
            "k_norm": HeadwiseLayerNorm(shape.num_kv_heads, shape.head_dim, eps, ctx.dtype, ctx.tp)}


def rms_qk_norms(config, ctx: ModelContext) -> dict[str, RMSNorm]:
    """``SelfAttention``'s ``q_norm`` and ``k_norm`` as an RMSNorm over each head's ``head_dim``
    with ``rms_norm_eps`` (Qwen3, Qwen3-MoE)."""
    head_dim = HeadShape.from_config(config).head_dim
    return {"q_norm": RMSNorm(head_dim, config.rms_norm_eps, ctx.dtype),
            "k_norm": RMSNorm(head_dim, config.rms_norm_eps, ctx.dtype)}


def check_intermediate_split(ctx: ModelContext, prefix: str, intermediate_size: int) -> None:
    """An MLP's hidden width must split evenly over the ranks: else a ValueError naming the field
    and the layer (a shared expert's width is another field's multiple)."""
    if intermediate_size % ctx.tp.size:
        raise ValueError(f"intermediate_size: {intermediate_size} ({prefix}) is not divisible by "
                         f"tp_size={ctx.tp.size}")


class GatedMLP(nn.Module):
    """``down_proj(act(gate) * up)`` with gate and up as one fused projection (``gate_up_proj``)."""

    def __init__(self, ctx: ModelContext, prefix: str, hidden_size: int, intermediate_size: int,
                 hidden_act: str = "silu", bias: bool = False):
        super().__init__()
        check_intermediate_split(ctx, prefix, intermediate_size)
        self.gate_up_proj = MergedColumnParallelLinear(hidden_size, [intermediate_size] * 2, bias, ctx.tp, ctx.dtype,
                                                       ctx.quant_method_for(f"{prefix}.gate_up_proj"))
        self.down_proj = RowParallelLinear(intermediate_size, hidden_size, bias, ctx.tp, ctx.dtype,
                                           ctx.quant_method_for(f"{prefix}.down_proj"))
        self.act = gated_act_fn(hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_up_proj(x)))


class MLP(nn.Module):
    """``down_proj(act(up_proj(x)))``, the ungated MLP (GPT-2, Phi-2, StarCoder2)."""

    def __init__(self, ctx: ModelContext, prefix: str, hidden_size: int, intermediate_size: int,
                 hidden_act: str = "gelu", bias: bool = True):
        super().__init__()
        check_intermediate_split(ctx, prefix, intermediate_size)
        self.up_proj = ColumnParallelLinear(hidden_size, intermediate_size, bias, ctx.tp, ctx.dtype,
                                            ctx.quant_method_for(f"{prefix}.up_proj"))
        self.down_proj = RowParallelLinear(intermediate_size, hidden_size, bias, ctx.tp, ctx.dtype,
                                           ctx.quant_method_for(f"{prefix}.down_proj"))
        self.act = act_fn(hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.up_proj(x)))


class DecoderLayer(nn.Module):
    """``h += m * attn(norm1(h)); h += m * mlp(norm2(h))`` with ``m = residual_multiplier``
    (1 for most models; Granite's ``residual_multiplier``, MiniCPM's ``scale_depth / sqrt(layers)``)."""

    def __init__(self, self_attn: nn.Module, mlp: nn.Module, input_layernorm: nn.Module,
                 post_attention_layernorm: nn.Module, residual_multiplier: float = 1.0):
        super().__init__()
        self.self_attn, self.mlp = self_attn, mlp
        self.input_layernorm, self.post_attention_layernorm = input_layernorm, post_attention_layernorm
        self.residual_multiplier = residual_multiplier

    def forward(self, positions: torch.Tensor, x: torch.Tensor, residual: torch.Tensor | None,
                batch: ForwardBatch) -> tuple[torch.Tensor, torch.Tensor]:
        x, residual = norm_with_residual(self.input_layernorm, x, residual)
        x = self.self_attn(positions, x, batch)
        if self.residual_multiplier != 1.0:
            x = x * self.residual_multiplier
        x, residual = self.post_attention_layernorm(x, residual)
        x = self.mlp(x)
        return (x * self.residual_multiplier if self.residual_multiplier != 1.0 else x), residual


class ParallelDecoderLayer(nn.Module):
    """``h += attn(norm(h)) + mlp(norm(h))``: one norm, both sublayers read it (GPT-J, Phi-2,
    Command-R, StableLM with ``use_parallel_residual``)."""

    def __init__(self, self_attn: nn.Module, mlp: nn.Module, input_layernorm: nn.Module):
        super().__init__()
        self.self_attn, self.mlp, self.input_layernorm = self_attn, mlp, input_layernorm

    def forward(self, positions: torch.Tensor, x: torch.Tensor, residual: torch.Tensor | None,
                batch: ForwardBatch) -> tuple[torch.Tensor, torch.Tensor]:
        x, residual = norm_with_residual(self.input_layernorm, x, residual)
        return self.self_attn(positions, x, batch) + self.mlp(x), residual


class SandwichDecoderLayer(nn.Module):
    """``h += post_attention_norm(attn(input_norm(h))); h += post_feedforward_norm(mlp(pre_feedforward_norm(h)))``:
    each sublayer's output is normed again before the residual add (Gemma 2/3, GLM-4-0414), which
    the next norm fuses as ``DecoderLayer``'s do."""

    def __init__(self, self_attn: nn.Module, mlp: nn.Module, input_layernorm: nn.Module,
                 post_attention_layernorm: nn.Module, pre_feedforward_layernorm: nn.Module,
                 post_feedforward_layernorm: nn.Module):
        super().__init__()
        self.self_attn, self.mlp = self_attn, mlp
        self.input_layernorm, self.post_attention_layernorm = input_layernorm, post_attention_layernorm
        self.pre_feedforward_layernorm, self.post_feedforward_layernorm = (pre_feedforward_layernorm,
                                                                           post_feedforward_layernorm)
        # Set by DecoderStack when a sandwich layer follows: this layer returns its MLP output
        # before post_feedforward_layernorm, and the next layer applies that norm together with
        # its input norm (``incoming_norm``, held in a tuple so it is not registered twice).
        self.defers_output_norm = False
        self.incoming_norm: tuple[nn.Module, ...] = ()

    def forward(self, positions: torch.Tensor, x: torch.Tensor, residual: torch.Tensor | None,
                batch: ForwardBatch) -> tuple[torch.Tensor, torch.Tensor]:
        if self.incoming_norm:
            x, residual = norm_add_norm(self.incoming_norm[0], self.input_layernorm, x, residual)
        else:
            x, residual = norm_with_residual(self.input_layernorm, x, residual)
        x, residual = norm_add_norm(self.post_attention_layernorm, self.pre_feedforward_layernorm,
                                    self.self_attn(positions, x, batch), residual)
        x = self.mlp(x)
        return (x if self.defers_output_norm else self.post_feedforward_layernorm(x)), residual


def norm_with_residual(norm: nn.Module, x: torch.Tensor,
                       residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(norm(x + residual), x + residual)``; before the first layer (no residual yet) x is the residual."""
    if residual is None:
        return norm(x), x
    return norm(x, residual)


class DecoderStack(nn.Module):
    """Token embedding (times ``embedding_multiplier``: Gemma's ``sqrt(hidden)``, Granite's,
    MiniCPM's ``scale_emb``), the layers, and the final norm over the last residual sum.

    A layer returning ``residual`` None has added its output itself (post-norm models): the
    final norm then reads ``x`` alone."""

    def __init__(self, embed_tokens: VocabParallelEmbedding, layers: Iterable[nn.Module], norm: nn.Module,
                 embedding_multiplier: float = 1.0):
        super().__init__()
        self.embed_tokens = embed_tokens
        self.layers = nn.ModuleList(layers)
        self.norm = norm
        self.embedding_multiplier = embedding_multiplier
        for layer, following in zip(self.layers[:-1], self.layers[1:]):
            if isinstance(layer, SandwichDecoderLayer) and isinstance(following, SandwichDecoderLayer):
                layer.defers_output_norm = True
                following.incoming_norm = (layer.post_feedforward_layernorm,)

    def embed(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        x = self.embed_tokens(input_ids)
        # Scale the looked-up rows, not the table: a tied LM head reads the same table unscaled.
        return x * self.embedding_multiplier if self.embedding_multiplier != 1.0 else x

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        x, residual = self.embed(input_ids, positions), None
        if batch.input_embeds is not None:  # images' embeddings over their placeholders, used as they are
            x = x.index_copy(0, batch.input_embed_rows, batch.input_embeds.to(x.dtype))
        for layer in self.layers:
            x, residual = layer(positions, x, residual, batch)
        return self.norm(x) if residual is None else self.norm(x, residual)[0]


class DecoderLM(nn.Module):
    """A decoder-only causal LM: the whole ``CausalLM`` contract, built from a Hugging Face config.

    Its defaults build the common arrangement (Llama's): rotary from the config, pre-norm
    ``DecoderLayer``s of ``SelfAttention`` and ``GatedMLP``, RMSNorm, an LM head tied or not as
    the config says. A family overrides only the ``make_*`` piece that differs, calling
    ``super()`` with keyword overrides where it can (``make_attention(..., qkv_bias=True)``), and
    sets scalars after ``super().__init__``: ``self.model.embedding_multiplier``,
    ``self.logit_scale`` (multiplies the logits: Command-R's ``logit_scale``, 1 / Granite's
    ``logits_scaling``), ``self.final_logit_softcap`` (``cap * tanh(logits / cap)``, Gemma 2).

    Checkpoint names, as class attributes: ``stacked_params`` (checkpoint fragment -> fused
    parameter fragment and shard id; default Llama's q/k/v and gate/up), ``checkpoint_renames``
    (``(regex, replacement)`` pairs applied to each checkpoint name first, for checkpoints whose
    names differ from the modules'), ``ignored_weights`` (fragments of names to skip),
    ``expert_parts`` (an MoE family's per-expert projection names -> role, as
    ``model_api.expert_mappings`` takes them; the experts then also load from transformers'
    stacked ``experts.gate_up_proj`` / ``experts.down_proj``), ``expert_layouts`` (``ExpertMapping``s
    for a checkpoint's own layout of experts stored all at once, DBRX's flattened ``w1`` / ``v1`` / ``w2``;
    these too turn on the stacked names).

    ``attention_bias_field`` / ``mlp_bias_field``: the config fields that put biases on the
    attention projections (all four) and on the MLP, for a family whose transformers class reads
    them; None where it has no such switch, so a stray field in config.json is ignored as
    transformers ignores it (Mistral's ``attention_bias``, Qwen2's ``mlp_bias``). ``partial_rotary``:
    the family turns only part of each head as ``partial_rotary_factor`` says (Phi, StableLM); off,
    whole heads whatever the config says, as transformers' Llama, Qwen, Gemma, ... do.

    ``config_defaults``: the values the architecture's own config class gives fields that
    config.json omits. A custom-code checkpoint's config loads as a plain ``PretrainedConfig`` (its
    configuration_*.py never runs), whose defaults are not the family's (InternLM2's ``bias`` is
    True, MiniCPM's ``tie_word_embeddings`` True); they are set on the config before anything reads it.
    """

    stacked_params: dict[str, tuple[str, Any]] = QKV_GATE_UP
    checkpoint_renames: Sequence[tuple[str, str]] = ()
    ignored_weights: tuple[str, ...] = ("rotary_emb.inv_freq",)
    expert_parts: dict[str, str] = {}
    expert_layouts: Sequence[ExpertMapping] = ()
    config_defaults: dict[str, Any] = {}
    attention_bias_field: str | None = "attention_bias"
    mlp_bias_field: str | None = "mlp_bias"
    partial_rotary = False

    def __init__(self, config, ctx: ModelContext):
        super().__init__()
        for key, value in self.config_defaults.items():
            if not hasattr(config, key):
                setattr(config, key, value)
        self.config = config
        rotary = self.make_rotary(config, ctx)
        self.model = DecoderStack(
            VocabParallelEmbedding(config.vocab_size, config.hidden_size, ctx.tp, ctx.dtype,
                                   ctx.embedding_method_for("model.embed_tokens")),
            (self.make_layer(config, ctx, i, rotary) for i in range(config.num_hidden_layers)),
            self.make_norm(config, ctx))
        self.tied = bool(getattr(config, "tie_word_embeddings", False))
        self.lm_head = self.make_lm_head(config, ctx)
        self.logit_scale, self.final_logit_softcap = 1.0, None
        self._renames = [(re.compile(pattern), repl) for pattern, repl in self.checkpoint_renames]
        # A rotary whose rotation needs more per token than its position (LongRoPE: the length
        # its factors go by) says so through token_positions; the layers get what it returns.
        self._rotary_positions = rotary.token_positions if isinstance(rotary, RotaryEmbedding) else None

    def make_rotary(self, config, ctx: ModelContext) -> RotaryEmbedding | None:
        """One cos/sin table shared by all layers (per layer it would cost GBs at 128k positions)."""
        return rope_from_config(config, HeadShape.from_config(config).head_dim, max_position=ctx.max_position,
                                partial_rotary=self.partial_rotary)

    def make_lm_head(self, config, ctx: ModelContext, bias: bool = False) -> VocabParallelEmbedding:
        """The output projection: the embedding table itself when tied. A ``bias`` (Phi-2) is the
        head's own parameter, also when the head shares the table."""
        embed = self.model.embed_tokens
        if self.tied and not bias:
            return embed
        if self.tied and not isinstance(embed.quant_method, UnquantizedMethod):
            raise ValueError("tie_word_embeddings with an LM head bias: the head cannot share a quantized table")
        head = ParallelLMHead(config.vocab_size, config.hidden_size, ctx.tp, ctx.dtype, bias=bias,
                              quant_method=None if self.tied else ctx.embedding_method_for("lm_head"))
        if self.tied:
            head.weight = embed.weight
        return head

    def make_norm(self, config, ctx: ModelContext) -> nn.Module:
        """Each norm of the model: the layers' and the final one."""
        return RMSNorm(config.hidden_size, config.rms_norm_eps, ctx.dtype)

    def make_attention(self, config, ctx: ModelContext, layer_id: int, rotary: RotaryEmbedding | None,
                       **overrides: Any) -> nn.Module:
        bias = config_flag(config, self.attention_bias_field)
        options = {"qkv_bias": bias, "o_bias": bias, "sliding_window": getattr(config, "sliding_window", None),
                   **overrides}
        return SelfAttention(ctx, f"{layer_prefix(layer_id)}.self_attn", layer_id, config.hidden_size,
                             HeadShape.from_config(config), rotary, **options)

    def make_mlp(self, config, ctx: ModelContext, layer_id: int) -> nn.Module:
        return GatedMLP(ctx, f"{layer_prefix(layer_id)}.mlp", config.hidden_size, config.intermediate_size,
                        getattr(config, "hidden_act", "silu"), config_flag(config, self.mlp_bias_field))

    def make_layer(self, config, ctx: ModelContext, layer_id: int, rotary: RotaryEmbedding | None) -> nn.Module:
        return DecoderLayer(self.make_attention(config, ctx, layer_id, rotary), self.make_mlp(config, ctx, layer_id),
                            self.make_norm(config, ctx), self.make_norm(config, ctx))

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        if self._rotary_positions is not None:
            positions = self._rotary_positions(positions, batch)
        return self.model(input_ids, positions, batch)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head.project(hidden).float()
        if self.logit_scale != 1.0:
            logits = logits * self.logit_scale
        if self.final_logit_softcap:
            logits = torch.tanh(logits / self.final_logit_softcap) * self.final_logit_softcap
        return logits

    def rename(self, name: str) -> str:
        """The module name a checkpoint tensor's name stands for (``checkpoint_renames``)."""
        for pattern, repl in self._renames:
            name = pattern.sub(repl, name)
        return name

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        # A tied head's table is the embedding's: loaded under the embedding's names only.
        table = {id(p) for p in self.model.embed_tokens.parameters()}
        shared = tuple(f"lm_head.{n}" for n, p in self.lm_head.named_parameters() if id(p) in table)
        ignore = self.ignored_weights + shared
        params = dict(self.named_parameters(remove_duplicate=False))
        experts = ([*self.expert_layouts, *expert_mappings(self.expert_parts), *STACKED_EXPERTS]
                   if self.expert_parts or self.expert_layouts else [])
        loaded = load_by_name(params, ((self.rename(name), tensor) for name, tensor in weights),
                              self.stacked_params, ignore, experts)
        missing = {n for n in params if n not in loaded and n not in shared}
        if missing:
            raise ValueError(f"checkpoint lacks weights for: {', '.join(sorted(missing)[:8])}")


def config_flag(config, field: str | None) -> bool:
    """``config.<field>`` as a bool: False when the config lacks it or ``field`` is None (no such switch)."""
    return bool(field and getattr(config, field, False))


def layer_prefix(layer_id: int) -> str:
    """The module path of layer ``layer_id`` in a ``DecoderLM`` (what quant methods are chosen by)."""
    return f"model.layers.{layer_id}"

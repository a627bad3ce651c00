"""The cases of the model-contract suite (tests/test_model_contract.py): one entry per
architecture a model plugin serves, each a tiny random config and its independent reference.

Adding a family is one entry in ``CASES``: ``hf_case(ConfigClass, ModelClass, **config)`` when
transformers has the architecture (``tiny(...)`` gives the usual small sizes), or a
``ContractCase`` whose ``reference`` builds a model written in ``tests/`` from the public model
definition (for checkpoints that ship custom code). The reference must return logits
``[1, T, vocab]`` from ``model(input_ids)``, with the state dict named as the real checkpoints
are, so the saved folder looks like one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

import transformers

from custom_code_references import grok1, internlm2, minicpm

# Small enough for CI, wide enough that every family's options matter: 2 layers, GQA (4 query
# heads over 2 KV heads), a vocabulary of the byte-level test tokenizer's 259 tokens.
TINY = dict(vocab_size=259, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512, bos_token_id=1, eos_token_id=2, pad_token_id=0)

# GPT-2-style configs name the same sizes differently (no GQA: multi_query or one k/v head each).
BIGCODE_TINY = dict(vocab_size=259, n_embd=64, n_layer=2, n_head=4, n_positions=512, bos_token_id=1,
                    eos_token_id=2, pad_token_id=0)


def tiny(**overrides: Any) -> dict[str, Any]:
    """``TINY`` with ``overrides``; an override of None drops the key (configs without it)."""
    return {k: v for k, v in {**TINY, **overrides}.items() if v is not None}


@dataclass(frozen=True)
class ContractCase:
    """``make()`` returns ``(config, model)``: a transformers config (saved as config.json) and a
    float32 model whose ``state_dict`` names are the checkpoint's and whose call on ``[1, T]``
    ids gives an object with ``.logits`` or the logits themselves. ``window``: the sliding window
    the config sets, if any (prompts are made longer than it). ``engine``: extra Engine settings."""

    make: Callable[[], tuple[Any, Any]]
    window: int | None = None
    engine: dict[str, Any] = field(default_factory=dict)


def hf_case(config_cls, model_cls, window: int | None = None, engine: dict[str, Any] | None = None,
            **config: Any) -> ContractCase:
    def make():
        cfg = config_cls(**config)
        # SDPA has no logit soft-cap, yet transformers 5.17 picked it for Gemma 2 (dropping the
        # cap): a soft-capped model's reference runs the plain attention path.
        if getattr(cfg, "attn_logit_softcapping", None):
            cfg._attn_implementation = "eager"
        return cfg, model_cls(cfg)

    return ContractCase(make, window, engine or {})


def custom_case(build: Callable[..., tuple[Any, Any]], engine: dict[str, Any] | None = None,
                **config: Any) -> ContractCase:
    """A custom-code architecture: ``build(**config)`` gives the config and the reference
    (tests/custom_code_references.py)."""
    return ContractCase(lambda: build(**config), None, engine or {})


def dbrx(**config: Any) -> tuple[Any, Any]:
    """DBRX's config and its transformers reference. DBRX states its rope base as
    ``attn_config.rope_theta``, which transformers 5 does not read (it takes the top-level
    ``rope_parameters``, default 10000): the reference gets the same base through
    ``rope_parameters``, the saved config keeps it in ``attn_config`` only, as released checkpoints do.
    A null ``clip_qkv`` (no clamp) makes transformers' clamp fail: the reference clamps to +-inf."""
    cfg = transformers.DbrxConfig(**config)
    rope = {"rope_type": "default", "rope_theta": cfg.attn_config.rope_theta}
    attn = dict(config["attn_config"])
    if attn.get("clip_qkv") is None:
        attn["clip_qkv"] = math.inf
    reference = transformers.DbrxConfig(**{**config, "attn_config": attn}, rope_parameters=rope)
    return cfg, transformers.DbrxForCausalLM(reference)


# DBRX names its sizes as GPT-2-style configs do; its attention and MoE options are nested dicts.
DBRX_TINY = dict(vocab_size=259, d_model=64, n_heads=4, n_layers=2, max_seq_len=512, bos_token_id=1,
                 eos_token_id=2, pad_token_id=0)


def _t(name: str):
    """A transformers class by name (imported lazily so one missing class fails one case only)."""
    return getattr(transformers, name)


CASES: dict[str, ContractCase] = {
    # A partial_rotary_factor that transformers' Llama ignores (it turns whole heads).
    "llama": hf_case(_t("LlamaConfig"), _t("LlamaForCausalLM"), **tiny(rope_theta=50000.0, partial_rotary_factor=0.5)),
    # Also a sliding_window that transformers' Llama ignores (llamafied Qwen checkpoints carry one).
    "llama-tied-bias": hf_case(_t("LlamaConfig"), _t("LlamaForCausalLM"),
                               **tiny(tie_word_embeddings=True, attention_bias=True, mlp_bias=True, sliding_window=8)),
    # ReluLLaMA / ProSparse-Llama: a ReLU-gated MLP (no fused gated kernel); YaRN with every
    # option set (beta_fast/beta_slow, an attention_factor, truncate off as gpt-oss has it) and an
    # original length that puts the ramp mid-head, where each option shows in the tokens.
    "llama-relu-yarn": hf_case(_t("LlamaConfig"), _t("LlamaForCausalLM"),
                               **tiny(hidden_act="relu",
                                      rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 8.0,
                                                       "original_max_position_embeddings": 4096, "beta_fast": 16,
                                                       "beta_slow": 2, "attention_factor": 1.5, "truncate": False})),
    # Mistral NeMo: head_dim (32) is not hidden_size / heads (16).
    "mistral-nemo": hf_case(_t("MistralConfig"), _t("MistralForCausalLM"), **tiny(head_dim=32, sliding_window=None)),
    # A window on every layer; attention_bias and mlp_bias that transformers' Mistral ignores.
    "mistral-window": hf_case(_t("MistralConfig"), _t("MistralForCausalLM"), window=8,
                              **tiny(sliding_window=8, attention_bias=True, mlp_bias=True)),
    # Yi: a Llama checkpoint with a large rope base and many KV-sharing heads.
    "yi": hf_case(_t("LlamaConfig"), _t("LlamaForCausalLM"),
                  **tiny(num_attention_heads=8, num_key_value_heads=1, rope_theta=5_000_000.0)),
    # Gemma: (1 + w) norms (an eps large enough to matter), sqrt(hidden) embeddings, tied head;
    # head_dim (32) is not hidden / heads (16), as in Gemma 7B; legacy hidden_act "gelu" means tanh;
    # a sliding_window that Gemma 1 ignores.
    "gemma": hf_case(_t("GemmaConfig"), _t("GemmaForCausalLM"),
                     **tiny(head_dim=32, hidden_act="gelu", rms_norm_eps=0.05, rope_theta=50000.0, sliding_window=8)),
    # Gemma 2B's one KV head; an untied head, biases and another activation, which the config allows.
    "gemma-mqa-untied-bias": hf_case(_t("GemmaConfig"), _t("GemmaForCausalLM"),
                                     **tiny(num_key_value_heads=1, tie_word_embeddings=False, attention_bias=True,
                                            hidden_act="silu")),
    # Gemma 2: default layer_types (sliding, full), softmax scale from query_pre_attn_scalar, and
    # soft-caps small enough to bind (logits of these weights reach a few units).
    "gemma2": hf_case(_t("Gemma2Config"), _t("Gemma2ForCausalLM"), window=8,
                      **tiny(head_dim=32, sliding_window=8, query_pre_attn_scalar=24, attn_logit_softcapping=0.5,
                             final_logit_softcapping=1.0)),
    # Gemma 2 with layer_types given (full, then sliding), caps off (None, kept out of tiny(), which
    # drops None), an untied head and biases.
    "gemma2-layer-types": hf_case(_t("Gemma2Config"), _t("Gemma2ForCausalLM"), window=8,
                                  attn_logit_softcapping=None, final_logit_softcapping=None,
                                  **tiny(head_dim=16, sliding_window=8, query_pre_attn_scalar=16,
                                         layer_types=["full_attention", "sliding_attention"],
                                         tie_word_embeddings=False, attention_bias=True)),
    # Gemma 3 text, in its Hub configs' spelling: global rope_theta with linear rope_scaling, local
    # rope_local_base_freq, sliding_window_pattern; q/k head norms; a binding final cap. The
    # attention cap is set and binds, but transformers never applies it for Gemma 3.
    "gemma3": hf_case(_t("Gemma3TextConfig"), _t("Gemma3ForCausalLM"), window=8,
                      **tiny(head_dim=32, sliding_window=8, sliding_window_pattern=2, rope_theta=1_000_000.0,
                             rope_local_base_freq=10_000.0, rope_scaling={"rope_type": "linear", "factor": 8.0},
                             query_pre_attn_scalar=24, attn_logit_softcapping=0.5, final_logit_softcapping=1.0)),
    # Gemma 3 in transformers 5's spelling: rope parameters per layer type (YaRN on the global layer,
    # the local layer's own base), the sliding layer first, one KV head.
    "gemma3-rope-per-layer-type": hf_case(
        _t("Gemma3TextConfig"), _t("Gemma3ForCausalLM"), window=8,
        **tiny(head_dim=16, num_key_value_heads=1, sliding_window=8, query_pre_attn_scalar=16,
               final_logit_softcapping=2.0, layer_types=["sliding_attention", "full_attention"],
               rope_parameters={"full_attention": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e6,
                                                   "original_max_position_embeddings": 32},
                                "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}})),
    # StableLM 2 1.6B: q/k/v biases, rotary on a quarter of each head, sequential residual.
    "stablelm-qkv-bias": hf_case(_t("StableLmConfig"), _t("StableLmForCausalLM"),
                                 **tiny(use_qkv_bias=True, partial_rotary_factor=0.25, layer_norm_eps=1e-4)),
    # StableLM 2 12B: a LayerNorm per q/k head, attention and MLP in parallel; here also a tied head.
    "stablelm-qk-norm-parallel": hf_case(_t("StableLmConfig"), _t("StableLmForCausalLM"),
                                         **tiny(qk_layernorm=True, use_parallel_residual=True,
                                                partial_rotary_factor=0.5, tie_word_embeddings=True)),
    # Command-R: tied head, logits times logit_scale (seen by the logprob check), interleaved rotary
    # over whole heads (whatever partial_rotary_factor says: transformers ignores it).
    "cohere": hf_case(_t("CohereConfig"), _t("CohereForCausalLM"),
                      **tiny(logit_scale=0.25, rope_theta=80000.0, partial_rotary_factor=0.5)),
    # Command-R+: per-head q/k LayerNorm, biases on q/k/v/o, its logit_scale; here also an untied head.
    "cohere-qk-norm-bias": hf_case(_t("CohereConfig"), _t("CohereForCausalLM"),
                                   **tiny(use_qk_norm=True, attention_bias=True, tie_word_embeddings=False,
                                          logit_scale=0.8333333333333334, layer_norm_eps=0.02)),
    # Command R7B: windowed layers with rotary between full layers without any.
    "cohere2": hf_case(_t("Cohere2Config"), _t("Cohere2ForCausalLM"), window=8,
                       **tiny(num_hidden_layers=3, sliding_window=8, logit_scale=0.5, attention_bias=True,
                              layer_types=["sliding_attention", "full_attention", "sliding_attention"])),
    # GLM-4-9B: q/k/v biases, interleaved rotary on half of each head, heads wider than hidden / heads.
    "glm": hf_case(_t("GlmConfig"), _t("GlmForCausalLM"), **tiny(head_dim=32)),
    "glm-tied-no-bias": hf_case(_t("GlmConfig"), _t("GlmForCausalLM"),
                                **tiny(head_dim=16, attention_bias=False, tie_word_embeddings=True,
                                       partial_rotary_factor=0.25)),
    # GLM-4-0414: the same with sandwich norms after attention and after the MLP.
    "glm4": hf_case(_t("Glm4Config"), _t("Glm4ForCausalLM"), **tiny(head_dim=32)),
    # InternLM2 as internlm2-chat-7b: no bias, NTK rope; the grouped wqkv holds 2 query heads per KV head;
    # an mlp_bias, which modeling_internlm2.py does not read.
    "internlm2": custom_case(internlm2, **tiny(bias=False, rms_norm_eps=1e-5, rope_theta=1_000_000,
                                               rope_scaling={"type": "dynamic", "factor": 2.0},
                                               tie_word_embeddings=False, mlp_bias=True)),
    # bias and rms_norm_eps left to InternLM2Config's defaults (True, 1e-6); one KV head; tied head.
    "internlm2-mqa-tied": custom_case(internlm2, **tiny(num_key_value_heads=1, tie_word_embeddings=True,
                                                        rope_scaling={"type": "linear", "factor": 2.0})),
    # MiniCPM 2: its config.json leaves tie_word_embeddings to MiniCPMConfig's default (tied); an
    # mlp_bias, which modeling_minicpm.py does not read.
    "minicpm": custom_case(minicpm, **tiny(scale_emb=12, dim_model_base=16, scale_depth=0.4, rms_norm_eps=1e-5,
                                           rope_scaling=None, mlp_bias=True)),
    "minicpm-untied-bias": custom_case(minicpm, **tiny(scale_emb=6, dim_model_base=32, scale_depth=2.0,
                                                       tie_word_embeddings=False, attention_bias=True,
                                                       rope_scaling={"type": "linear", "factor": 2.0})),
    # MiniCPM 4: LongRoPE takes its long factors for a 512-position table over a 256 original even
    # when serving only 200 tokens, and scales cos/sin by sqrt(1 + ln 2 / ln 256).
    "minicpm4-longrope": custom_case(
        minicpm, engine={"context_length": 200},
        **tiny(scale_emb=12, dim_model_base=16, scale_depth=0.4, tie_word_embeddings=False,
               rope_scaling={"rope_type": "longrope", "original_max_position_embeddings": 256,
                             "short_factor": [1.0, 1.0, 1.1, 1.2, 1.4, 1.6, 1.9, 2.2],
                             "long_factor": [1.0, 1.5, 2.5, 4.0, 6.0, 9.0, 13.0, 18.0]})),
    # Phi-2: parallel layers, partial rotary, biased projections and LM head; GQA here. An eps
    # near the activations' variance, so that reading it matters; a sliding_window that
    # transformers' Phi ignores.
    "phi": hf_case(_t("PhiConfig"), _t("PhiForCausalLM"),
                   **tiny(partial_rotary_factor=0.5, layer_norm_eps=1e-2, sliding_window=4)),
    # Phi with per-head q/k LayerNorms, a tied head that keeps its own bias, multi-head, another activation.
    "phi-qk-norm-tied": hf_case(_t("PhiConfig"), _t("PhiForCausalLM"),
                                **tiny(qk_layernorm=True, tie_word_embeddings=True, num_key_value_heads=None,
                                       partial_rotary_factor=0.75, hidden_act="relu")),
    # Phi-3-mini-4k: fused qkv / gate_up checkpoint tensors, a sliding window; attention_bias and
    # mlp_bias that transformers' Phi-3 ignores.
    "phi3-window": hf_case(_t("Phi3Config"), _t("Phi3ForCausalLM"), window=8,
                           **tiny(sliding_window=8, attention_bias=True, mlp_bias=True)),
    # Phi-3 128k / Phi-4-mini: LongRoPE. transformers takes short_factor for a sequence of up to
    # original_max_position_embeddings tokens, long_factor past it (for every position, the
    # cache recomputed on crossing), and so does the engine (tests/test_longrope.py). Here the
    # context and every sequence stay within the original length: short factors, partial rotary,
    # a tied head.
    "phi3-longrope-short": hf_case(
        _t("Phi3Config"), _t("Phi3ForCausalLM"), engine={"context_length": 128},
        **tiny(original_max_position_embeddings=128, partial_rotary_factor=0.75, tie_word_embeddings=True,
               rope_scaling={"type": "longrope", "short_factor": [1.0, 1.3, 1.9, 2.6, 3.5, 5.0],
                             "long_factor": [1.5, 3.0, 6.0, 12.0, 20.0, 40.0]})),
    # ... and every sequence past the original length (2 tokens): long factors for all of them.
    "phi3-longrope-long": hf_case(
        _t("Phi3Config"), _t("Phi3ForCausalLM"),
        **tiny(original_max_position_embeddings=2,
               rope_scaling={"type": "longrope", "short_factor": [1.0, 1.1, 1.3, 1.6, 2.0, 2.5, 3.0, 4.0],
                             "long_factor": [2.0, 3.0, 5.0, 8.0, 13.0, 21.0, 34.0, 55.0]})),
    # Phi-3.5-mini's arrangement: LongRoPE (short factors: context and sequences within the original
    # length) on half of each head, with a sliding window.
    "phi3-longrope-window-partial": hf_case(
        _t("Phi3Config"), _t("Phi3ForCausalLM"), window=8, engine={"context_length": 128},
        **tiny(sliding_window=8, original_max_position_embeddings=128, partial_rotary_factor=0.5,
               rope_scaling={"type": "longrope", "short_factor": [1.0, 1.3, 1.9, 2.6],
                             "long_factor": [1.5, 3.0, 6.0, 12.0]})),
    # StarCoder 1: multi-query attention, learned positions, a tied head, tanh GELU.
    "gpt-bigcode-mqa": hf_case(_t("GPTBigCodeConfig"), _t("GPTBigCodeForCausalLM"), **BIGCODE_TINY),
    # Multi-head GPTBigCode: per-head fused c_attn rows, no 1/sqrt(d) scale, an untied head, n_inner,
    # another activation (exact and tanh GELU give the same greedy tokens) and a larger eps.
    "gpt-bigcode-mha": hf_case(_t("GPTBigCodeConfig"), _t("GPTBigCodeForCausalLM"),
                               **{**BIGCODE_TINY, "multi_query": False, "scale_attn_weights": False,
                                  "tie_word_embeddings": False, "n_inner": 96, "activation_function": "relu",
                                  "layer_norm_epsilon": 1e-2}),
    # Qwen 2 / 2.5 as released: q/k/v biases, a sliding_window that use_sliding_window=False turns off;
    # an mlp_bias that transformers' Qwen2 ignores.
    "qwen2": hf_case(_t("Qwen2Config"), _t("Qwen2ForCausalLM"),
                     **tiny(use_sliding_window=False, sliding_window=8, max_window_layers=0, rms_norm_eps=0.05,
                            mlp_bias=True)),
    # With use_sliding_window, layers from max_window_layers on slide (here layer 1, not layer 0).
    "qwen2-window-tied": hf_case(_t("Qwen2Config"), _t("Qwen2ForCausalLM"), window=8,
                                 **tiny(use_sliding_window=True, sliding_window=8, max_window_layers=1,
                                        tie_word_embeddings=True)),
    # Qwen2.5's long-context spelling: rope_scaling {"type": "yarn"} beside rope_theta; one KV head.
    "qwen2-mqa-yarn": hf_case(_t("Qwen2Config"), _t("Qwen2ForCausalLM"),
                              **tiny(num_key_value_heads=1, rope_theta=1e6,
                                     rope_scaling={"type": "yarn", "factor": 4.0,
                                                   "original_max_position_embeddings": 32})),
    # Qwen 3: per-head q/k norms, head_dim (32) not hidden_size / heads, YaRN as its long-context configs.
    "qwen3": hf_case(_t("Qwen3Config"), _t("Qwen3ForCausalLM"),
                     **tiny(head_dim=32, rms_norm_eps=0.05,
                            rope_parameters={"rope_type": "yarn", "rope_theta": 1_000_000.0, "factor": 4.0,
                                             "original_max_position_embeddings": 128})),
    # Explicit layer_types (sliding first, unlike max_window_layers' order), attention_bias, tied head.
    "qwen3-bias-window": hf_case(_t("Qwen3Config"), _t("Qwen3ForCausalLM"), window=8,
                                 **tiny(attention_bias=True, tie_word_embeddings=True, use_sliding_window=True,
                                        sliding_window=8, layer_types=["sliding_attention", "full_attention"])),
    # StarCoder2 as released: biases everywhere, tied head, window on every layer, tanh GELU.
    "starcoder2": hf_case(_t("Starcoder2Config"), _t("Starcoder2ForCausalLM"), window=8,
                          **tiny(sliding_window=8, norm_epsilon=0.05, rope_theta=100_000.0)),
    # No biases, untied head, and a hidden_act unlike the released tanh GELU (erf GELU would differ too
    # little to change a greedy token).
    "starcoder2-nobias-untied": hf_case(_t("Starcoder2Config"), _t("Starcoder2ForCausalLM"),
                                        **tiny(use_bias=False, tie_word_embeddings=False, hidden_act="silu",
                                               sliding_window=None)),
    # OLMo 2 as released: one KV head per query head, untied head, no biases (an mlp_bias that
    # transformers' OLMo 2 ignores).
    "olmo2": hf_case(_t("Olmo2Config"), _t("Olmo2ForCausalLM"),
                     **tiny(num_key_value_heads=None, rms_norm_eps=0.05, rope_theta=500_000.0, mlp_bias=True)),
    "olmo2-bias-gqa-tied": hf_case(_t("Olmo2Config"), _t("Olmo2ForCausalLM"),
                                   **tiny(attention_bias=True, tie_word_embeddings=True)),
    # DeepSeek-V2 with dense layers only (first_k_dense_replace = layers): MLA with a q LoRA, head
    # widths all different (non-rotary 16, rotary 8, value 12) over a 32-wide latent, interleaved
    # rotary; an rms_norm_eps that the latent norms (fixed 1e-6 in transformers) must not read, and
    # a partial_rotary_factor transformers' DeepSeek ignores (it turns all qk_rope_head_dim dims).
    "deepseek-v2": hf_case(_t("DeepseekV2Config"), _t("DeepseekV2ForCausalLM"),
                           **tiny(num_key_value_heads=None, first_k_dense_replace=2, q_lora_rank=48, kv_lora_rank=32,
                                  qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=12, rms_norm_eps=0.05,
                                  partial_rotary_factor=0.5)),
    # V2-Lite's one q_proj (no q LoRA), biases on q_a/kv_a/o and the MLP, a tied head, and YaRN
    # with DeepSeek's mscale / mscale_all_dim (rotary and softmax scale both corrected).
    "deepseek-v2-lite-yarn": hf_case(
        _t("DeepseekV2Config"), _t("DeepseekV2ForCausalLM"),
        q_lora_rank=None,  # not in tiny(): it drops None overrides, and the config's default is 1536
        **tiny(num_key_value_heads=None, first_k_dense_replace=2, kv_lora_rank=32,
               qk_nope_head_dim=12, qk_rope_head_dim=8, v_head_dim=20, attention_bias=True, mlp_bias=True,
               tie_word_embeddings=True,
               rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 8.0,
                                "original_max_position_embeddings": 64, "beta_fast": 32, "beta_slow": 1,
                                "mscale": 1.0, "mscale_all_dim": 0.8})),
    # DeepSeek-V3's attention (dense layers only), YaRN as its released config (mscale equal to
    # mscale_all_dim: the rotary factor cancels, the softmax scale keeps mscale squared).
    "deepseek-v3-yarn": hf_case(
        _t("DeepseekV3Config"), _t("DeepseekV3ForCausalLM"),
        **tiny(num_key_value_heads=None, first_k_dense_replace=2, q_lora_rank=48, kv_lora_rank=32,
               qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=12, num_nextn_predict_layers=1,
               rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 40.0,
                                "original_max_position_embeddings": 32, "beta_fast": 32, "beta_slow": 1,
                                "mscale": 1.0, "mscale_all_dim": 1.0})),
    # rope_interleave false: V3's rotary in "rotate half" layout; attention biases, and an
    # mlp_bias that V3's MLPs ignore.
    "deepseek-v3-rotate-half": hf_case(
        _t("DeepseekV3Config"), _t("DeepseekV3ForCausalLM"),
        **tiny(num_key_value_heads=None, first_k_dense_replace=2, q_lora_rank=40, kv_lora_rank=24,
               qk_nope_head_dim=8, qk_rope_head_dim=16, v_head_dim=12, rope_interleave=False, attention_bias=True,
               mlp_bias=True)),
    # DeepSeek-V2-Lite's MoE: a dense first layer, then 8 routed experts (softmax, greedy top-2,
    # not renormalised, scaled) beside 2 shared experts, no mlp_bias as released: the shared MLP is
    # held as 2 experts stacked after the routed ones (with mlp_bias it stays an MLP: test_moe_plugins).
    "deepseek-v2-moe": hf_case(
        _t("DeepseekV2Config"), _t("DeepseekV2ForCausalLM"),
        q_lora_rank=None,  # not in tiny(): it drops None overrides, and the config's default is 1536
        **tiny(num_key_value_heads=None, num_hidden_layers=3, first_k_dense_replace=1,
               kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=12, n_routed_experts=8,
               num_experts_per_tok=2, moe_intermediate_size=32, n_shared_experts=2, routed_scaling_factor=2.0,
               topk_method="greedy", mlp_bias=False)),
    # DeepSeek-V2's group-limited greedy routing: the best 2 of 4 groups by their best expert, top-3;
    # n_shared_experts 0 (transformers keeps a zero-wide shared MLP, its checkpoint tensors empty).
    "deepseek-v2-moe-grouped": hf_case(
        _t("DeepseekV2Config"), _t("DeepseekV2ForCausalLM"),
        **tiny(num_key_value_heads=None, first_k_dense_replace=0, q_lora_rank=48, kv_lora_rank=32,
               qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=12, n_routed_experts=8, num_experts_per_tok=3,
               moe_intermediate_size=32, n_shared_experts=0, routed_scaling_factor=1.5,
               topk_method="group_limited_greedy", n_group=4, topk_group=2)),
    # DeepSeek-V3's routing: sigmoid scores, e_score_correction_bias for the choice, the best 2 of 4
    # groups by their two best experts, renormalised and scaled; one shared expert.
    "deepseek-v3-moe": hf_case(
        _t("DeepseekV3Config"), _t("DeepseekV3ForCausalLM"),
        **tiny(num_key_value_heads=None, num_hidden_layers=3, first_k_dense_replace=1, q_lora_rank=48,
               kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=12, n_routed_experts=8,
               num_experts_per_tok=2, moe_intermediate_size=32, n_shared_experts=1, routed_scaling_factor=2.5,
               n_group=4, topk_group=2, norm_topk_prob=True)),
    # V3's routing without groups (n_group 1) or renormalisation, top-1 of 6 unscaled; no q LoRA, every
    # layer sparse, rotate-half rotary; 3 shared experts (stacked: the shared MLP cut in three).
    "deepseek-v3-moe-ungrouped": hf_case(
        _t("DeepseekV3Config"), _t("DeepseekV3ForCausalLM"),
        q_lora_rank=None,  # not in tiny(): it drops None overrides, and the config's default is 1536
        **tiny(num_key_value_heads=None, first_k_dense_replace=0, kv_lora_rank=32,
               qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=6, num_experts_per_tok=1,
               moe_intermediate_size=16, n_shared_experts=3, routed_scaling_factor=1.0, n_group=1, topk_group=1,
               norm_topk_prob=False, rope_interleave=False)),
    # --disable-mla: the per-head K/V cache (every head's key and value expanded from the latent
    # when written, attention without absorption) on V2-Lite's attention (no q LoRA, biases, YaRN
    # with mscale_all_dim) and MoE (a dense first layer, greedy top-2 of 8 beside shared experts).
    "deepseek-v2-lite-moe-per-head": hf_case(
        _t("DeepseekV2Config"), _t("DeepseekV2ForCausalLM"), engine={"disable_mla": True},
        q_lora_rank=None,  # not in tiny(): it drops None overrides, and the config's default is 1536
        **tiny(num_key_value_heads=None, num_hidden_layers=3, first_k_dense_replace=1,
               kv_lora_rank=32, qk_nope_head_dim=12, qk_rope_head_dim=8, v_head_dim=20, attention_bias=True,
               mlp_bias=True, n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
               n_shared_experts=2, routed_scaling_factor=2.0, topk_method="greedy",
               rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 8.0,
                                "original_max_position_embeddings": 64, "beta_fast": 32, "beta_slow": 1,
                                "mscale": 1.0, "mscale_all_dim": 0.8})),
    # Mixtral 8x7B's routing: 8 experts, the best 2 renormalised. With the suite's prompts every
    # expert gets tokens in a prefill and most get none in a decode step. An attention_bias that
    # transformers' Mixtral ignores.
    "mixtral": hf_case(_t("MixtralConfig"), _t("MixtralForCausalLM"),
                       **tiny(num_local_experts=8, num_experts_per_tok=2, intermediate_size=48, rope_theta=1e6,
                               attention_bias=True)),
    # The best one of 5 experts (renormalised: weight 1), no GQA.
    "mixtral-top1": hf_case(_t("MixtralConfig"), _t("MixtralForCausalLM"),
                            **tiny(num_local_experts=5, num_experts_per_tok=1, intermediate_size=48,
                                   num_key_value_heads=4)),
    # A window on every layer, 3 of 6 experts, another gated activation, head_dim not hidden / heads, tied.
    "mixtral-window-gelu-tied": hf_case(_t("MixtralConfig"), _t("MixtralForCausalLM"), window=8,
                                        **tiny(num_local_experts=6, num_experts_per_tok=3, intermediate_size=48,
                                               sliding_window=8, hidden_act="gelu_pytorch_tanh", head_dim=32,
                                               tie_word_embeddings=True)),
    # Grok-1's arrangement with every Grok field given: 8 experts, top-2 not renormalised; an
    # attention cap (and multiplier) small enough to bind; untied head; a rope_theta the modeling
    # code ignores (base 10000 always).
    "grok1": custom_case(grok1, **tiny(num_experts=8, num_experts_per_tok=2, intermediate_size=48,
                                       attn_output_multiplier=0.5, max_attn_value=1.5,
                                       embedding_multiplier_scale=2.0, output_multiplier_scale=4.0,
                                       rms_norm_eps=0.05, tie_word_embeddings=False, rope_theta=1_000_000.0)),
    # Grok-1's config.json without its Grok fields: Grok1Config's defaults (multipliers of the
    # released model, cap 30, tied head, 8 experts top-2); one KV head.
    "grok1-defaults": custom_case(grok1, **tiny(num_key_value_heads=1, intermediate_size=48)),
    # Qwen1.5-MoE as released: q/k/v biases, shared expert with its sigmoid gate, top-k probabilities
    # not renormalised; layer 1 listed in mlp_only_layers keeps a dense MLP.
    "qwen2-moe": hf_case(_t("Qwen2MoeConfig"), _t("Qwen2MoeForCausalLM"),
                         **tiny(num_hidden_layers=3, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
                                shared_expert_intermediate_size=96, norm_topk_prob=False, mlp_only_layers=[1])),
    # decoder_sparse_step 2 (layer 1 sparse, layers 0 and 2 dense), renormalised top-4, no q/k/v
    # biases, layers 0 and 2 sliding (use_sliding_window below max_window_layers), a tied head; a
    # zero-wide shared expert (its checkpoint tensors empty, its gate's weight not).
    "qwen2-moe-step-window": hf_case(_t("Qwen2MoeConfig"), _t("Qwen2MoeForCausalLM"), window=8,
                                     **tiny(num_hidden_layers=3, num_experts=8, num_experts_per_tok=4,
                                            moe_intermediate_size=32, shared_expert_intermediate_size=0,
                                            decoder_sparse_step=2, norm_topk_prob=True, qkv_bias=False,
                                            use_sliding_window=True, sliding_window=8, max_window_layers=3,
                                            tie_word_embeddings=True)),
    # Qwen3-30B-A3B's arrangement: q/k head norms, renormalised top-k, no shared expert; layer 0
    # dense (mlp_only_layers), head_dim not hidden / heads.
    "qwen3-moe": hf_case(_t("Qwen3MoeConfig"), _t("Qwen3MoeForCausalLM"),
                         **tiny(num_hidden_layers=3, head_dim=32, num_experts=8, num_experts_per_tok=2,
                                moe_intermediate_size=32, norm_topk_prob=True, mlp_only_layers=[0],
                                rms_norm_eps=0.05)),
    # Biases on all four projections, a window on every layer, decoder_sparse_step 2, top-3 not renormalised.
    "qwen3-moe-bias-window-step": hf_case(_t("Qwen3MoeConfig"), _t("Qwen3MoeForCausalLM"), window=8,
                                          **tiny(num_experts=8, num_experts_per_tok=3, moe_intermediate_size=32,
                                                 norm_topk_prob=False, decoder_sparse_step=2, attention_bias=True,
                                                 use_sliding_window=True, sliding_window=8)),
    # DBRX as released: GQA, q/k/v clamped (a clip_qkv small enough to bind here), a large rope
    # base in attn_config, top-4 of 8 experts (16 in DBRX) renormalised by their 1-norm (the sum).
    "dbrx": custom_case(dbrx, **DBRX_TINY, attn_config={"kv_n_heads": 2, "clip_qkv": 0.5, "rope_theta": 500_000},
                        ffn_config={"ffn_hidden_size": 32, "moe_num_experts": 8, "moe_top_k": 4,
                                    "moe_jitter_eps": 0.01, "moe_normalize_expert_weights": 1.0}),
    # Top-3 of 6 divided by their 2-norm, one KV head, no clip_qkv (null: no clamp), another gated
    # activation.
    "dbrx-2-norm-mqa-gelu": custom_case(dbrx, **DBRX_TINY,
                                        attn_config={"kv_n_heads": 1, "clip_qkv": None, "rope_theta": 10_000},
                                        ffn_config={"ffn_hidden_size": 32, "moe_num_experts": 6, "moe_top_k": 3,
                                                    "moe_normalize_expert_weights": 2.0,
                                                    "ffn_act_fn": {"name": "gelu"}}),
    # The chosen softmax probability as it is (moe_normalize_expert_weights null) for DbrxConfig's
    # default top-1, no GQA.
    "dbrx-unnormalized": custom_case(dbrx, **DBRX_TINY,
                                     attn_config={"kv_n_heads": 4, "clip_qkv": 1.0, "rope_theta": 50_000},
                                     ffn_config={"ffn_hidden_size": 32, "moe_num_experts": 6, "moe_top_k": 1,
                                                 "moe_normalize_expert_weights": None}),
    # Granite 3.0 1B-A400M's arrangement: its four multipliers, a tied head, top-2 of 8 experts; a
    # sliding_window that transformers' Granite MoE ignores.
    "granitemoe": hf_case(_t("GraniteMoeConfig"), _t("GraniteMoeForCausalLM"),
                          **tiny(intermediate_size=32, num_local_experts=8, num_experts_per_tok=2,
                                 embedding_multiplier=12.0, residual_multiplier=0.22, attention_multiplier=0.0625,
                                 logits_scaling=6.0, tie_word_embeddings=True, sliding_window=8)),
    # Attention biases, an untied head, top-3 of 6, multipliers unlike the released ones.
    "granitemoe-bias-untied": hf_case(_t("GraniteMoeConfig"), _t("GraniteMoeForCausalLM"),
                                      **tiny(intermediate_size=32, num_local_experts=6, num_experts_per_tok=3,
                                             embedding_multiplier=3.0, residual_multiplier=0.5,
                                             attention_multiplier=0.2, logits_scaling=0.5, attention_bias=True,
                                             tie_word_embeddings=False)),
    # Granite MoE with a shared MLP beside the experts (Granite 3.1 / 4.0's shared_intermediate_size).
    "granitemoe-shared": hf_case(_t("GraniteMoeSharedConfig"), _t("GraniteMoeSharedForCausalLM"),
                                 **tiny(intermediate_size=32, num_local_experts=8, num_experts_per_tok=2,
                                        shared_intermediate_size=48, embedding_multiplier=12.0,
                                        residual_multiplier=0.22, attention_multiplier=0.0625, logits_scaling=6.0,
                                        tie_word_embeddings=True)),
}

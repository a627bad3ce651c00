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

from dataclasses import dataclass, field
from typing import Any, Callable

import transformers

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
        return cfg, model_cls(cfg)

    return ContractCase(make, window, engine or {})


def _t(name: str):
    """A transformers class by name (imported lazily so one missing class fails one case only)."""
    return getattr(transformers, name)


CASES: dict[str, ContractCase] = {
    "llama": hf_case(_t("LlamaConfig"), _t("LlamaForCausalLM"), **tiny(rope_theta=50000.0)),
    "llama-tied-bias": hf_case(_t("LlamaConfig"), _t("LlamaForCausalLM"),
                               **tiny(tie_word_embeddings=True, attention_bias=True, mlp_bias=True)),
    # Mistral NeMo: head_dim (32) is not hidden_size / heads (16).
    "mistral-nemo": hf_case(_t("MistralConfig"), _t("MistralForCausalLM"), **tiny(head_dim=32, sliding_window=None)),
    "mistral-window": hf_case(_t("MistralConfig"), _t("MistralForCausalLM"), window=8, **tiny(sliding_window=8)),
    # Yi: a Llama checkpoint with a large rope base and many KV-sharing heads.
    "yi": hf_case(_t("LlamaConfig"), _t("LlamaForCausalLM"),
                  **tiny(num_attention_heads=8, num_key_value_heads=1, rope_theta=5_000_000.0)),
    # Phi-2: parallel layers, partial rotary, biased projections and LM head; GQA here. An eps
    # near the activations' variance, so that reading it matters; a sliding_window that
    # transformers' Phi ignores.
    "phi": hf_case(_t("PhiConfig"), _t("PhiForCausalLM"),
                   **tiny(partial_rotary_factor=0.5, layer_norm_eps=1e-2, sliding_window=4)),
    # Phi with per-head q/k LayerNorms, a tied head that keeps its own bias, multi-head, another activation.
    "phi-qk-norm-tied": hf_case(_t("PhiConfig"), _t("PhiForCausalLM"),
                                **tiny(qk_layernorm=True, tie_word_embeddings=True, num_key_value_heads=None,
                                       partial_rotary_factor=0.75, hidden_act="relu")),
    # Phi-3-mini-4k: fused qkv / gate_up checkpoint tensors, a sliding window.
    "phi3-window": hf_case(_t("Phi3Config"), _t("Phi3ForCausalLM"), window=8, **tiny(sliding_window=8)),
    # Phi-3 128k / Phi-4-mini: LongRoPE. transformers takes short_factor for a sequence of up to
    # original_max_position_embeddings tokens, long_factor past it (for every position, the
    # cache recomputed on crossing); the engine picks by its context length. Here the context and
    # every sequence stay within the original length: short factors, partial rotary, a tied head.
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
    # StarCoder 1: multi-query attention, learned positions, a tied head, tanh GELU.
    "gpt-bigcode-mqa": hf_case(_t("GPTBigCodeConfig"), _t("GPTBigCodeForCausalLM"), **BIGCODE_TINY),
    # Multi-head GPTBigCode: per-head fused c_attn rows, no 1/sqrt(d) scale, an untied head, n_inner,
    # another activation (exact and tanh GELU give the same greedy tokens) and a larger eps.
    "gpt-bigcode-mha": hf_case(_t("GPTBigCodeConfig"), _t("GPTBigCodeForCausalLM"),
                               **{**BIGCODE_TINY, "multi_query": False, "scale_attn_weights": False,
                                  "tie_word_embeddings": False, "n_inner": 96, "activation_function": "relu",
                                  "layer_norm_epsilon": 1e-2}),
}

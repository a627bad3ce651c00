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
    # Qwen 2 / 2.5 as released: q/k/v biases, a sliding_window that use_sliding_window=False turns off.
    "qwen2": hf_case(_t("Qwen2Config"), _t("Qwen2ForCausalLM"),
                     **tiny(use_sliding_window=False, sliding_window=8, max_window_layers=0, rms_norm_eps=0.05)),
    # With use_sliding_window, layers from max_window_layers on slide (here layer 1, not layer 0).
    "qwen2-window-tied": hf_case(_t("Qwen2Config"), _t("Qwen2ForCausalLM"), window=8,
                                 **tiny(use_sliding_window=True, sliding_window=8, max_window_layers=1,
                                        tie_word_embeddings=True)),
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
    # OLMo 2 as released: one KV head per query head, untied head, no biases.
    "olmo2": hf_case(_t("Olmo2Config"), _t("Olmo2ForCausalLM"),
                     **tiny(num_key_value_heads=None, rms_norm_eps=0.05, rope_theta=500_000.0)),
    "olmo2-bias-gqa-tied": hf_case(_t("Olmo2Config"), _t("Olmo2ForCausalLM"),
                                   **tiny(attention_bias=True, tie_word_embeddings=True)),
}

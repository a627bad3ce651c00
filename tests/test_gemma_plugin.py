"""What the Gemma plugin does that the model-contract suite (float32) cannot see: the embedding
scale rounded to the model dtype as transformers rounds it, and the configs it refuses."""

from __future__ import annotations

import pytest
import torch
import transformers

from sglang_core.model_executor.model_api import ModelContext
from sglang_plugins.models.gemma.model import Gemma2ForCausalLM, Gemma3ForCausalLM, GemmaForCausalLM

# hidden_size 3072 (Gemma 7B's): sqrt(3072) = 55.43 is 55.5 in bfloat16.
SMALL = dict(vocab_size=32, hidden_size=3072, intermediate_size=8, num_hidden_layers=1, num_attention_heads=1,
             num_key_value_heads=1, head_dim=8)


def test_bfloat16_embeddings_scale_as_transformers() -> None:
    config = transformers.GemmaConfig(**SMALL)
    torch.manual_seed(0)
    reference = transformers.GemmaForCausalLM(config).to(torch.bfloat16).eval()
    model = GemmaForCausalLM(config, ModelContext(dtype=torch.bfloat16))
    model.load_weights(reference.state_dict().items())
    ids = torch.arange(config.vocab_size)
    with torch.no_grad():
        torch.testing.assert_close(model.model.embed(ids, ids), reference.model.embed_tokens(ids), atol=0, rtol=0)


@pytest.mark.parametrize("config_cls, model_cls", [(transformers.GemmaConfig, GemmaForCausalLM),
                                                   (transformers.Gemma2Config, Gemma2ForCausalLM),
                                                   (transformers.Gemma3TextConfig, Gemma3ForCausalLM)])
def test_bidirectional_attention_is_refused_by_field_name(config_cls, model_cls) -> None:
    config = config_cls(**SMALL, use_bidirectional_attention=True)
    with pytest.raises(ValueError, match="use_bidirectional_attention"):
        model_cls(config, ModelContext())


@pytest.mark.parametrize("model_cls", [Gemma2ForCausalLM, Gemma3ForCausalLM])
def test_layer_types_gemma_lacks_are_refused_by_field_name(model_cls) -> None:
    # transformers' config accepts "chunked_attention" (other models have it); Gemma's layers do not.
    config_cls = transformers.Gemma2Config if model_cls is Gemma2ForCausalLM else transformers.Gemma3TextConfig
    config = config_cls(**{**SMALL, "num_hidden_layers": 2}, layer_types=["sliding_attention", "chunked_attention"])
    with pytest.raises(ValueError, match="layer_types"):
        model_cls(config, ModelContext())


@pytest.mark.parametrize("model_cls", [Gemma2ForCausalLM, Gemma3ForCausalLM])
def test_sliding_layer_without_a_window_is_refused(model_cls) -> None:
    # The configs fill layer_types with sliding layers whatever sliding_window is; transformers then
    # fails building their mask.
    config_cls = transformers.Gemma2Config if model_cls is Gemma2ForCausalLM else transformers.Gemma3TextConfig
    config = config_cls(**{**SMALL, "num_hidden_layers": 2}, sliding_window=None)
    with pytest.raises(ValueError, match="^sliding_window: layer 0 is a sliding_attention layer"):
        model_cls(config, ModelContext())

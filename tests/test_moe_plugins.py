"""The MoE model plugins (Mixtral, Qwen2-MoE, Qwen3-MoE, DeepSeek, Grok-1) beyond the contract
suite: the suite's prompts reach every expert of every sparse layer (and a short prompt leaves some
without tokens), and a checkpoint as released (per-expert tensors, Mixtral's ``block_sparse_moe``,
written by transformers' ``save_pretrained``) loads the same weights as transformers' own stacked
names."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from model_contract import CASES
from sglang_core.model_executor.model_api import ModelContext
from sglang_plugins.models.deepseek.model import DeepseekV2ForCausalLM, DeepseekV3ForCausalLM
from sglang_plugins.models.grok1.model import Grok1ModelForCausalLM
from sglang_plugins.models.mixtral.model import MixtralForCausalLM
from sglang_plugins.models.qwen_moe.model import Qwen2MoeForCausalLM, Qwen3MoeForCausalLM
from test_model_contract import _build

MOE_CASES = {"mixtral": MixtralForCausalLM, "mixtral-window-gelu-tied": MixtralForCausalLM,
             "qwen2-moe": Qwen2MoeForCausalLM, "qwen2-moe-step-window": Qwen2MoeForCausalLM,
             "qwen3-moe": Qwen3MoeForCausalLM, "qwen3-moe-bias-window-step": Qwen3MoeForCausalLM,
             "deepseek-v2-moe": DeepseekV2ForCausalLM, "deepseek-v2-moe-grouped": DeepseekV2ForCausalLM,
             "deepseek-v3-moe": DeepseekV3ForCausalLM, "grok1": Grok1ModelForCausalLM,
             "grok1-defaults": Grok1ModelForCausalLM}


@pytest.mark.parametrize("name", sorted(MOE_CASES))
def test_contract_prompts_reach_every_expert(name: str, tmp_path) -> None:
    """In the reference (transformers', or a custom-code one), with the suite's weights and
    prompts: every expert of every sparse layer gets tokens, and the shortest prompt leaves one of
    each layer's experts idle (an expert with no tokens must cost nothing and add nothing)."""
    model, prompts = _build(name, tmp_path)
    chosen: dict[int, list[set[int]]] = {}
    blocks = {i: _moe_block(layer) for i, layer in enumerate(model.model.layers)}
    for i, block in blocks.items():
        if hasattr(block, "experts"):
            block.gate.register_forward_hook(
                lambda _m, _a, out, i=i: chosen.setdefault(i, []).append(set(out[2].flatten().tolist())))
    with torch.no_grad():
        for prompt in prompts:
            model(torch.tensor([prompt]))
    assert chosen
    for layer, per_prompt in chosen.items():
        experts = set(range(blocks[layer].gate.weight.shape[0]))
        assert set().union(*per_prompt) == experts, f"layer {layer}"
        shortest = min(range(len(prompts)), key=lambda p: len(prompts[p]))
        assert per_prompt[shortest] != experts, f"layer {layer}"


def _moe_block(layer: torch.nn.Module) -> torch.nn.Module:
    """A reference layer's MLP: transformers' ``mlp``, Grok-1's ``moe_block``. Its router (``gate``)
    returns ``(logits, weights, expert ids)``."""
    return layer.moe_block if hasattr(layer, "moe_block") else layer.mlp


@pytest.mark.parametrize("name", ["mixtral", "qwen2-moe", "qwen3-moe-bias-window-step"])
def test_released_checkpoint_names_load_like_transformers_names(name: str, tmp_path) -> None:
    config, reference = CASES[name].make()
    torch.manual_seed(0)
    with torch.no_grad():
        for p in reference.parameters():
            p.normal_()
    reference.save_pretrained(tmp_path)
    released = load_file(str(tmp_path / "model.safetensors"))
    assert any(".experts.0." in key for key in released)  # per-expert, as on the Hub
    cls = MOE_CASES[name]
    from_released, from_state_dict = cls(config, ModelContext()), cls(config, ModelContext())
    from_released.load_weights(released.items())
    from_state_dict.load_weights(reference.state_dict().items())
    ours = dict(from_state_dict.named_parameters())
    for param_name, param in from_released.named_parameters():
        assert torch.equal(param, ours[param_name]), param_name
    assert torch.equal(from_state_dict.model.layers[-1].mlp.experts.w2_weight[3],
                       reference.model.layers[-1].mlp.experts.down_proj[3])


@pytest.mark.parametrize("layer_types, field", [(["sliding_attention", "full_attention"], "sliding_window"),
                                                (["chunked_attention", "full_attention"], "layer_types")])
def test_qwen2_moe_refuses_layers_it_cannot_serve(layer_types: list[str], field: str) -> None:
    """A sliding layer without a window (None: the engine's Attention would refuse 0, not None), a
    layer kind Qwen2-MoE has no attention for: ValueErrors naming the field."""
    config = CASES["qwen2-moe"].make()[0]
    config.num_hidden_layers, config.layer_types, config.sliding_window = 2, layer_types, None
    with pytest.raises(ValueError, match=field):
        Qwen2MoeForCausalLM(config, ModelContext())

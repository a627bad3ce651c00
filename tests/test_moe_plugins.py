"""The MoE model plugins (Mixtral, Qwen2-MoE, Qwen3-MoE, DeepSeek, DBRX, GraniteMoE, Grok-1) beyond the
contract suite: the suite's prompts reach every expert of every sparse layer (and a short prompt
leaves some without tokens), and a checkpoint as released (per-expert tensors, Mixtral's
``block_sparse_moe``, GraniteMoE's ``input_linear`` / ``output_linear``, written by transformers'
``save_pretrained``) loads the same weights as transformers' own stacked names; under expert
parallelism each plugin's ranks hold only their experts."""

from __future__ import annotations

from typing import Any, Callable

import pytest
import torch
from safetensors.torch import load_file

from model_contract import CASES
from sglang_core.layers.experts import ExpertWeights
from sglang_core.layers.parallel import TPGroup
from sglang_core.model_executor.model_api import ModelContext
from sglang_plugins.models.dbrx.model import DbrxForCausalLM
from sglang_plugins.models.deepseek.model import DeepseekV2ForCausalLM, DeepseekV3ForCausalLM
from sglang_plugins.models.grok1.model import Grok1ModelForCausalLM
from sglang_plugins.models.granitemoe.model import GraniteMoeForCausalLM, GraniteMoeSharedForCausalLM
from sglang_plugins.models.mixtral.model import MixtralForCausalLM
from sglang_plugins.models.qwen_moe.model import Qwen2MoeForCausalLM, Qwen3MoeForCausalLM
from test_model_contract import _build

MOE_CASES = {"mixtral": MixtralForCausalLM, "mixtral-window-gelu-tied": MixtralForCausalLM,
             "mixtral-top1": MixtralForCausalLM,
             "qwen2-moe": Qwen2MoeForCausalLM, "qwen2-moe-step-window": Qwen2MoeForCausalLM,
             "qwen3-moe": Qwen3MoeForCausalLM, "qwen3-moe-bias-window-step": Qwen3MoeForCausalLM,
             "deepseek-v2-moe": DeepseekV2ForCausalLM, "deepseek-v2-moe-grouped": DeepseekV2ForCausalLM,
             "deepseek-v3-moe": DeepseekV3ForCausalLM, "deepseek-v3-moe-ungrouped": DeepseekV3ForCausalLM,
             "grok1": Grok1ModelForCausalLM,
             "grok1-defaults": Grok1ModelForCausalLM, "dbrx": DbrxForCausalLM,
             "dbrx-2-norm-mqa-gelu": DbrxForCausalLM, "dbrx-unnormalized": DbrxForCausalLM,
             "granitemoe": GraniteMoeForCausalLM, "granitemoe-bias-untied": GraniteMoeForCausalLM,
             "granitemoe-shared": GraniteMoeSharedForCausalLM}


IdsOf = Callable[[Any, Any], torch.Tensor]


def expert_choosers(model: torch.nn.Module) -> dict[int, tuple[torch.nn.Module, IdsOf, int]]:
    """Per sparse layer of a transformers MoE model: a module whose call shows the experts each
    token chose, how to read their ids from its ``(args, output)``, and the number of experts.
    Routers return ``(logits, weights, ids)``; DBRX's returns logits only, so its experts module,
    called with ``(hidden, ids, weights)``, shows them. The block is ``mlp``, Granite's
    ``block_sparse_moe`` or Grok-1's ``moe_block``."""
    if hasattr(model, "transformer"):
        return {i: (block.ffn.experts, lambda args, _out: args[1], block.ffn.experts.num_experts)
                for i, block in enumerate(model.transformer.blocks)}
    choosers = {}
    for i, layer in enumerate(model.model.layers):
        block = getattr(layer, "block_sparse_moe", None) or getattr(layer, "moe_block", None) or layer.mlp
        if hasattr(block, "experts"):
            router = getattr(block, "router", None) or block.gate
            choosers[i] = (router, lambda _args, out: out[2], router.weight.shape[0])
    return choosers


@pytest.mark.parametrize("name", sorted(MOE_CASES))
def test_contract_prompts_reach_every_expert(name: str, tmp_path) -> None:
    """In the reference (transformers', or a custom-code one), with the suite's weights and
    prompts: every expert of every sparse layer gets tokens, and the shortest prompt leaves one of
    each layer's experts idle (an expert with no tokens must cost nothing and add nothing)."""
    model, prompts = _build(name, tmp_path)
    chosen: dict[int, list[set[int]]] = {}
    choosers = expert_choosers(model)
    for i, (module, ids_of, _) in choosers.items():
        module.register_forward_hook(
            lambda _m, args, out, i=i, ids_of=ids_of: chosen.setdefault(i, []).append(
                set(ids_of(args, out).flatten().tolist())))
    with torch.no_grad():
        for prompt in prompts:
            model(torch.tensor([prompt]))
    assert chosen
    for layer, per_prompt in chosen.items():
        experts = set(range(choosers[layer][2]))
        assert set().union(*per_prompt) == experts, f"layer {layer}"
        shortest = min(range(len(prompts)), key=lambda p: len(prompts[p]))
        assert per_prompt[shortest] != experts, f"layer {layer}"


@pytest.mark.parametrize("name, released_name, down_proj", [
    ("mixtral", ".experts.0.", "model.layers.1.mlp.experts.down_proj"),
    ("qwen2-moe", ".experts.0.", "model.layers.2.mlp.experts.down_proj"),
    ("qwen3-moe-bias-window-step", ".experts.0.", "model.layers.1.mlp.experts.down_proj"),
    ("granitemoe-shared", ".block_sparse_moe.input_linear.", "model.layers.1.block_sparse_moe.experts.down_proj")])
def test_released_checkpoint_names_load_like_transformers_names(name: str, released_name: str, down_proj: str,
                                                                 tmp_path) -> None:
    config, reference = CASES[name].make()
    torch.manual_seed(0)
    with torch.no_grad():
        for p in reference.parameters():
            p.normal_()
    reference.save_pretrained(tmp_path)
    released = load_file(str(tmp_path / "model.safetensors"))
    assert any(released_name in key for key in released)  # as on the Hub
    cls = MOE_CASES[name]
    from_released, from_state_dict = cls(config, ModelContext()), cls(config, ModelContext())
    from_released.load_weights(released.items())
    from_state_dict.load_weights(reference.state_dict().items())
    ours = dict(from_state_dict.named_parameters())
    for param_name, param in from_released.named_parameters():
        assert torch.equal(param, ours[param_name]), param_name
    assert torch.equal(from_state_dict.model.layers[-1].mlp.experts.w2_weight[3], reference.get_parameter(down_proj)[3])


@pytest.mark.parametrize("name", ["mixtral", "qwen2-moe", "qwen3-moe", "deepseek-v2-moe", "deepseek-v3-moe", "grok1",
                                  "dbrx", "granitemoe-shared"])
def test_expert_parallel_ranks_hold_their_experts_of_every_plugin(name: str) -> None:
    """Every MoE plugin gets expert parallelism from the core layer: built for rank r of two with
    ``expert_parallel`` and loaded from transformers' state dict, each sparse layer holds experts
    r*E/2 .. (r+1)*E/2 - 1 whole, as the one-rank model holds them (which the contract suite checks
    against transformers), and nothing more."""
    config, reference = CASES[name].make()
    torch.manual_seed(0)
    with torch.no_grad():
        for p in reference.parameters():
            p.normal_()
    cls = MOE_CASES[name]
    whole = cls(config, ModelContext())
    whole.load_weights(reference.state_dict().items())
    whole_experts = dict(whole.named_modules())
    for rank in range(2):
        ours = cls(config, ModelContext(tp=TPGroup(rank=rank, size=2, expert_parallel=True)))
        ours.load_weights(reference.state_dict().items())
        layers = [(n, m) for n, m in ours.named_modules() if isinstance(m, ExpertWeights)]
        assert layers
        for module_name, experts in layers:
            half = experts.num_experts  # the whole model may hold stacked shared experts after them
            own = slice(rank * half, (rank + 1) * half)
            assert torch.equal(experts.w13_weight, whole_experts[module_name].w13_weight[own]), module_name
            assert torch.equal(experts.w2_weight, whole_experts[module_name].w2_weight[own]), module_name


@pytest.mark.parametrize("mlp_bias", [False, True])
def test_deepseek_shared_mlp_is_stacked_unless_it_has_biases(mlp_bias: bool) -> None:
    """DeepSeek-V2's shared MLP joins the routed experts' stack where it has no biases (held once:
    as many parameters as transformers'); with ``mlp_bias`` it stays an MLP of its own. Either way
    the loaded MoE block computes transformers' block."""
    config, reference = CASES["deepseek-v2-moe"].make()
    config.mlp_bias = mlp_bias
    reference = type(reference)(config)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in reference.parameters():
            p.normal_(0, 0.3)
    ours = DeepseekV2ForCausalLM(config, ModelContext())
    ours.load_weights(reference.state_dict().items())
    block, theirs = ours.model.layers[1].mlp, reference.model.layers[1].mlp
    assert block.stacked_shared_experts == (0 if mlp_bias else 2)
    assert (block.shared_expert is not None) == mlp_bias
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in reference.parameters())
    x = torch.randn(5, config.hidden_size)
    with torch.no_grad():
        torch.testing.assert_close(block(x), theirs(x[None])[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("overrides, field", [
    ({"layer_types": ["sliding_attention", "full_attention"]}, "sliding_window"),
    ({"layer_types": ["chunked_attention", "full_attention"]}, "layer_types"),
    ({"decoder_sparse_step": 0}, "decoder_sparse_step")])
def test_qwen2_moe_refuses_layers_it_cannot_serve(overrides: dict[str, Any], field: str) -> None:
    """A sliding layer without a window (None: the engine's Attention would refuse 0, not None), a
    layer kind Qwen2-MoE has no attention for, no interval between sparse layers: ValueErrors
    naming the field."""
    config = CASES["qwen2-moe"].make()[0]
    config.num_hidden_layers, config.sliding_window = 2, None
    for key, value in overrides.items():
        setattr(config, key, value)
    with pytest.raises(ValueError, match=field):
        Qwen2MoeForCausalLM(config, ModelContext())


@pytest.mark.parametrize("attn_config, field", [({"rope_theta": None}, "attn_config.rope_theta"),
                                                ({"tie_word_embeddings": True}, "tie_word_embeddings")])
def test_dbrx_refuses_configs_it_cannot_serve(attn_config: dict[str, Any], field: str) -> None:
    """No rope base in attn_config (transformers' DBRX needs one too); a tied head (transformers'
    DbrxConfig refuses it)."""
    config = CASES["dbrx"].make()[0]
    for key, value in attn_config.items():
        setattr(config.attn_config if key == "rope_theta" else config, key, value)
    with pytest.raises(ValueError, match=field):
        DbrxForCausalLM(config, ModelContext())

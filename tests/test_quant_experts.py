"""Quantized MoE experts (fp8 per-tensor / per-channel / block-wise, GPTQ, AWQ, compressed-tensors
W4A16 and W8A8) through the normal load path, against transformers float32 holding the dequantized
weights.

The contract suite's tiny MoE models (its weights and prompts, which reach every expert) are
written as quantized checkpoints in the released layouts: one tensor set per expert and
projection (Mixtral's ``block_sparse_moe.experts.<e>.w1.weight`` + ``weight_scale``, Qwen-MoE's
and DeepSeek's ``mlp.experts.<e>.gate_proj.qweight`` / ``weight_scale_inv``, ...), the linear
layers quantized alike. Packing follows the formats' published rules (the packers of
test_quant_fp8.py and test_quant_awq_gptq.py). Where activations are quantized, the reference
rounds each quantized linear's input (forward pre-hooks) and each expert's two inputs (its
experts module's forward replaced by a per-token loop) to e4m3 and back.
"""

from __future__ import annotations

import dataclasses
import json
import re
import zlib
from pathlib import Path
from typing import Callable

import pytest
import torch
from safetensors.torch import save_file

from sglang_core.engine import Engine
from sglang_core.layers.activation import SiluAndMul
from sglang_core.layers.experts import ExpertWeights
from sglang_core.layers.parallel import TPGroup
from sglang_plugins.quant.compressed_tensors.method import CompressedTensorsMethod
from sglang_plugins.quant.fp8.method import Fp8LinearMethod
from sglang_plugins.quant.gptq.method import GPTQMethod
from model_contract import CASES
from test_model_contract import _build, _reference_greedy
from test_quant_awq_gptq import Quantized, group_index
from test_quant_compressed_tensors import (ct_config, int8_round_trip, int_args, pack_quantized,
                                           quantize_symmetric_int8, token_qparams)
from test_quant_compressed_tensors import input_groups as ct_input_groups
from test_quant_fp8 import BLOCK_CONFIG, E4M3_MAX, block_dequantized, compressed_tensors_block_config, \
    compressed_tensors_config, fp8_block_weight, fp8_weight, to_e4m3

NEW_TOKENS = 8
GPTQ_ACT_ORDER = {"quant_method": "gptq", "bits": 4, "group_size": 16, "sym": False, "desc_act": True,
                  "checkpoint_format": "gptq"}
# Checkpoint names of each family's expert projections (gate, up, down), and its MoE block's name.
EXPERT_NAMES = {"mixtral": (("w1", "w3", "w2"), "block_sparse_moe"),
                "qwen2-moe": (("gate_proj", "up_proj", "down_proj"), "mlp"),
                "deepseek-v3-moe": (("gate_proj", "up_proj", "down_proj"), "mlp")}

# quantize(name, weight [out, in]) -> (the checkpoint's tensors by suffix, the weight they stand for)
Quantizer = Callable[[str, torch.Tensor], tuple[dict[str, torch.Tensor], torch.Tensor]]


def quantize_checkpoint(name: str, folder: Path, quantization_config: dict, quantize: Quantizer,
                        keep_float: tuple[str, ...] = ()) -> tuple[torch.nn.Module, list[list[int]]]:
    """The contract case ``name``'s model and prompts, its checkpoint in ``folder`` replaced by a
    quantized one: every linear layer of the decoder (but routers and modules whose name contains
    one of ``keep_float``) and every expert's gate, up and down. The model keeps the dequantized
    weights."""
    model, prompts = _build(name, folder)
    parts, block = EXPERT_NAMES[name]
    state = {key: t.clone() for key, t in model.state_dict().items()}
    with torch.no_grad():
        for module_name, module in model.named_modules():
            if not module_name.startswith("model.layers.") or any(k in module_name for k in keep_float):
                continue
            if isinstance(module, torch.nn.Linear):
                tensors, module.weight[:] = quantize(module_name, module.weight)
                del state[f"{module_name}.weight"]
                state.update({f"{module_name}.{suffix}": t for suffix, t in tensors.items()})
            elif hasattr(module, "gate_up_proj"):  # transformers' stacked experts
                del state[f"{module_name}.gate_up_proj"], state[f"{module_name}.down_proj"]
                stem = module_name.replace(".mlp.", f".{block}.")
                size = module.down_proj.shape[2]
                for expert in range(module.gate_up_proj.shape[0]):
                    views = (module.gate_up_proj[expert, :size], module.gate_up_proj[expert, size:],
                             module.down_proj[expert])
                    for part, view in zip(parts, views):
                        tensors, view[:] = quantize(f"{stem}.{expert}.{part}", view)
                        state.update({f"{stem}.{expert}.{part}.{suffix}": t for suffix, t in tensors.items()})
    state = {key.replace(".mlp.gate.", f".{block}.gate.") if block != "mlp" else key: t for key, t in state.items()}
    for old in folder.glob("model*.safetensors*"):
        old.unlink()
    save_file({key: t.contiguous() for key, t in state.items()}, str(folder / "model.safetensors"),
              metadata={"format": "pt"})
    config_path = folder / "config.json"
    config = json.loads(config_path.read_text())
    config["quantization_config"] = quantization_config
    config_path.write_text(json.dumps(config))
    return model, prompts


def e4m3_round_trip(x: torch.Tensor, scale: torch.Tensor | None = None, group: int | None = None) -> torch.Tensor:
    """``x`` to e4m3 and back: by ``scale``, or one scale per token and ``group``-wide slice of
    features (all features when None; the last slice may be narrower), its largest magnitude / 448."""
    if scale is not None:
        return to_e4m3(x, scale).float() * scale
    pieces = []
    for piece in x.split(group or x.shape[-1], dim=-1):
        piece_scale = piece.abs().amax(dim=-1, keepdim=True).clamp(min=1e-12) / E4M3_MAX
        pieces.append(to_e4m3(piece, piece_scale).float() * piece_scale)
    return torch.cat(pieces, dim=-1)


def round_expert_inputs(experts: torch.nn.Module, w13_input: Callable, w2_input: Callable) -> None:
    """Replace a transformers experts module's forward by the same sum, token by token, with each
    expert's gate_up input rounded by ``w13_input(expert, x)`` and its down input by ``w2_input``."""
    def forward(hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(hidden)
        size = experts.down_proj.shape[2]
        for token in range(hidden.shape[0]):
            for expert, weight in zip(top_k_index[token].tolist(), top_k_weights[token]):
                gate_up = w13_input(expert, hidden[token:token + 1]) @ experts.gate_up_proj[expert].T
                h = experts.act_fn(gate_up[:, :size]) * gate_up[:, size:]
                out[token] += weight * (w2_input(expert, h) @ experts.down_proj[expert].T)[0]
        return out

    experts.forward = forward


def assert_served_like(model, prompts: list[list[int]], folder: Path, logprob_atol: float = 1e-4,
                       **settings) -> None:
    """Greedy tokens equal the reference's and their logprobs within ``logprob_atol`` (engine
    ``settings``: tp_size, ...)."""
    with Engine(str(folder), **settings) as engine:
        results = engine.generate(input_ids=prompts, return_logprob=True, sampling_params={
            "temperature": 0, "ignore_eos": True, "max_new_tokens": NEW_TOKENS})
    for prompt, result in zip(prompts, results):
        tokens, logprobs = _reference_greedy(model, prompt, NEW_TOKENS)
        assert result["output_ids"] == tokens, f"prompt of {len(prompt)} tokens"
        got = [lp for lp, _token, _text in result["meta_info"]["output_token_logprobs"]]
        assert got == pytest.approx(logprobs, abs=logprob_atol), f"prompt of {len(prompt)} tokens"


def fp8_quantizer(strategy: str) -> Quantizer:
    """FP8 weights with a scale per output channel ([out, 1]) or for the tensor ([1])."""
    def quantize(_name, w):
        q, scale = fp8_weight(w, strategy)
        return {"weight": q, "weight_scale": scale}, q.float() * scale

    return quantize


def block_quantizer(block: tuple[int, int], scale_name: str = "weight_scale_inv") -> Quantizer:
    """Block-wise FP8 weights, their scales named as DeepSeek-V3 (or compressed-tensors) names them."""
    def quantize(_name, w):
        q, scale_inv = fp8_block_weight(w, block)
        return {"weight": q, scale_name: scale_inv}, block_dequantized(q, scale_inv, block)

    return quantize


def order_key(name: str) -> str:
    """Projections that share an activation order: those the engine fuses (q/k/v, a dense or
    shared expert's gate/up), as they share their input; an expert's gate and up each have their own."""
    return name if ".experts." in name else re.sub(r"\.(q_proj|k_proj|v_proj|gate_proj|up_proj)$", ".in", name)


def packed_quantizer(fmt: dict, seed: int) -> Quantizer:
    """Random AWQ/GPTQ integers (the weight they stand for replaces ``w``), with desc_act a
    shuffled g_idx per ``order_key``."""
    gen = torch.Generator().manual_seed(seed)
    g_idx: dict[str, torch.Tensor] = {}

    def quantize(name, w):
        out, inputs = w.shape
        quant = Quantized(fmt, inputs, out, gen, g_idx.setdefault(order_key(name), group_index(fmt, inputs, gen)))
        return quant.tensors, quant.weight

    return quantize


def pack_quantizer(weights: dict) -> Quantizer:
    """compressed-tensors pack-quantized tensors as llm-compressor writes them (``weight_packed``,
    ``weight_scale``, ``weight_shape``, asymmetric ``weight_zero_point``, ``actorder: group``'s
    ``weight_g_idx``, shuffled per ``order_key``) from ``w``'s min/max."""
    def quantize(name, w):
        key = order_key(name)
        g_idx = ct_input_groups(w.shape[1], weights.get("group_size"), weights.get("actorder") == "group",
                                seed=zlib.crc32(key.encode()))
        return pack_quantized(w, weights, g_idx)

    return quantize


def test_fp8_per_channel_experts(tmp_path):
    """compressed-tensors FP8, weights per output channel (``weight_scale`` [out, 1]), activations
    left in float: Mixtral's experts and attention."""
    config = compressed_tensors_config("channel", None, ["lm_head", "re:.*block_sparse_moe.gate$"])
    model, prompts = quantize_checkpoint("mixtral", tmp_path, config, fp8_quantizer("channel"))
    assert_served_like(model, prompts, tmp_path)


def test_online_fp8_quantizes_float_experts(tmp_path):
    """``--quantization fp8`` on a float Mixtral: every expert's gate, up and down quantized per
    output channel at load like the linear layers, every input rounded per token."""
    model, prompts = _build("mixtral", tmp_path)
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and name.startswith("model.layers."):
                module.weight[:] = fp8_quantizer("channel")(name, module.weight)[1]
                module.register_forward_pre_hook(lambda _m, args: (e4m3_round_trip(args[0]),))
            elif hasattr(module, "gate_up_proj"):
                for stacked in (module.gate_up_proj, module.down_proj):
                    for expert in stacked:
                        expert[:] = fp8_quantizer("channel")(name, expert)[1]
                round_expert_inputs(module, lambda _e, x: e4m3_round_trip(x), lambda _e, x: e4m3_round_trip(x))
    with Engine(str(tmp_path), quantization="fp8") as engine:
        results = engine.generate(input_ids=prompts, sampling_params={"temperature": 0, "ignore_eos": True,
                                                                      "max_new_tokens": NEW_TOKENS})
    for prompt, result in zip(prompts, results):
        assert result["output_ids"] == _reference_greedy(model, prompt, NEW_TOKENS)[0], f"prompt of {len(prompt)}"


def test_fp8_per_tensor_static_experts(tmp_path):
    """AutoFP8 as Mixtral-FP8 ships it: one scalar ``weight_scale`` and ``input_scale`` per expert
    and projection. An expert's gate_up input is rounded once, by the larger of its gate's and
    up's input scales; its down input by down's; fused q/k/v likewise by the largest of three."""
    gen = torch.Generator().manual_seed(7)
    input_scales: dict[str, torch.Tensor] = {}

    def quantize(name, w):
        q, scale = fp8_weight(w, "tensor")
        # Inputs reach about 4 (normed hidden states) or 1 (SiLU(gate) * up): scales around amax / 448,
        # drawn apart so that the parts of one input disagree.
        amax = 1.0 if name.endswith(("w2", "o_proj")) else 4.0
        input_scales[name] = amax / E4M3_MAX * (0.5 + torch.rand((), generator=gen))
        return {"weight": q, "weight_scale": scale.reshape(()), "input_scale": input_scales[name]}, q.float() * scale

    model, prompts = quantize_checkpoint("mixtral", tmp_path, {"quant_method": "fp8", "activation_scheme": "static",
                                                               "ignored_layers": ["lm_head"]}, quantize)
    for i, layer in enumerate(model.model.layers):
        attn, experts = f"model.layers.{i}.self_attn", f"model.layers.{i}.block_sparse_moe.experts"
        qkv = max(input_scales[f"{attn}.{p}_proj"] for p in "qkv")
        for proj, scale in (("q_proj", qkv), ("k_proj", qkv), ("v_proj", qkv), ("o_proj", input_scales[f"{attn}.o_proj"])):
            layer.self_attn.get_submodule(proj).register_forward_pre_hook(
                lambda _m, args, scale=scale: (e4m3_round_trip(args[0], scale),))
        round_expert_inputs(
            layer.mlp.experts,
            lambda e, x, p=experts: e4m3_round_trip(x, torch.maximum(input_scales[f"{p}.{e}.w1"], input_scales[f"{p}.{e}.w3"])),
            lambda e, x, p=experts: e4m3_round_trip(x, input_scales[f"{p}.{e}.w2"]))
    assert_served_like(model, prompts, tmp_path)


# Every linear input rounded to e4m3 per 16-wide group: the engine's absorbed MLA sums in another
# order than transformers' expanded heads, and a value within ~1e-7 of a rounding boundary lands on
# the other e4m3 neighbour: 6.6e-3 measured on one Xeon for the v_head_dim-16 case (1e-4 on
# another). Without the rounding the greedy tokens themselves differ, so the tokens, exact, are
# what proves the rounding; the logprobs bound the damage of such flips.
BLOCK_ROUNDED_ATOL = 2e-2


@pytest.mark.parametrize("layout", ["deepseek", "compressed-tensors"])
def test_fp8_block_wise_deepseek_v3(tmp_path, layout, case="deepseek-v3-moe", **settings):
    """DeepSeek-V3's layout: ``weight_scale_inv`` per 16 x 16 block of every linear layer and
    expert, activations rounded per token and 16-wide group; or llm-compressor's FP8_BLOCK, the same
    blocks as ``weight_scale``. kv_a_proj_with_mqa has 40 rows (2.5 blocks: its scale has 3 rows, the
    last covering 8), as the released 576-row one has 4.5 blocks of 128. kv_b_proj quantized as
    released in DeepSeek's layout: the MLA plugin absorbs the float matrix it stands for, its
    inputs not rounded (as DeepSeek's inference code dequantizes it); float in the other."""
    block = (16, 16)
    if layout == "compressed-tensors":
        ignore = ["lm_head", "re:.*kv_b_proj$"]
        config, scale_name = {**compressed_tensors_block_config(block), "ignore": ignore}, "weight_scale"
    else:
        config, scale_name = {**BLOCK_CONFIG, "weight_block_size": list(block), "ignored_layers": ["lm_head"]}, \
            "weight_scale_inv"
    model, prompts = quantize_checkpoint(case, tmp_path, config, block_quantizer(block, scale_name),
                                         keep_float=("kv_b_proj",) if layout == "compressed-tensors" else ())
    assert model.model.layers[0].self_attn.kv_a_proj_with_mqa.weight.shape[0] % block[0]
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name.startswith("model.layers.") and "kv_b_proj" not in name:
            module.register_forward_pre_hook(lambda _m, args: (e4m3_round_trip(args[0], group=block[1]),))
        if hasattr(module, "gate_up_proj"):
            rounded = lambda _e, x: e4m3_round_trip(x, group=block[1])  # noqa: E731
            round_expert_inputs(module, rounded, rounded)
    assert_served_like(model, prompts, tmp_path, logprob_atol=BLOCK_ROUNDED_ATOL, **settings)


def test_fp8_block_wise_deepseek_v3_on_two_gloo_ranks(tmp_path, monkeypatch):
    """The same DeepSeek layout over two gloo ranks, v_head_dim 16 so that no rank's slice cuts a
    block (as none does in the released 128-head model): each rank dequantizes only its heads' rows
    of kv_b_proj before absorbing them, and every other projection and expert its slice's blocks."""
    base = CASES["deepseek-v3-moe"]

    def make():
        config, model = base.make()
        config.v_head_dim = 16
        return config, type(model)(config)

    monkeypatch.setitem(CASES, "deepseek-v3-moe-v16", dataclasses.replace(base, make=make))
    monkeypatch.setitem(EXPERT_NAMES, "deepseek-v3-moe-v16", EXPERT_NAMES["deepseek-v3-moe"])
    test_fp8_block_wise_deepseek_v3(tmp_path, "deepseek", case="deepseek-v3-moe-v16", tp_size=2, device="cpu")


def test_gptq_experts_qwen2_moe(tmp_path):
    """Qwen1.5-MoE-GPTQ's layout (every expert's gate/up/down packed, the shared expert and
    attention too; router and shared_expert_gate float), here with act-order: an expert's gate
    and up each with their own shuffled g_idx."""
    model, prompts = quantize_checkpoint("qwen2-moe", tmp_path, GPTQ_ACT_ORDER, packed_quantizer(GPTQ_ACT_ORDER, 3),
                                         keep_float=("shared_expert_gate",))
    assert_served_like(model, prompts, tmp_path)


def test_awq_experts_mixtral(tmp_path):
    """Mixtral-AWQ's layout: every expert's w1/w3/w2 and the attention packed by AutoAWQ's GEMM rule."""
    fmt = {"quant_method": "awq", "bits": 4, "group_size": 16, "zero_point": True, "version": "gemm"}
    model, prompts = quantize_checkpoint("mixtral", tmp_path, fmt, packed_quantizer(fmt, 4))
    assert_served_like(model, prompts, tmp_path)


W4A16_ASYM_ACT_ORDER = int_args(4, "group", symmetric=False, group_size=32, actorder="group")
# (contract case, weights arguments, ignore list)
PACKED_EXPERTS = {
    # As llm-compressor's W4A16 recipe writes Mixtral: symmetric groups (16 here, 128 there), routers float.
    "mixtral-w4a16-g16-sym": ("mixtral", int_args(4, "group", group_size=16),
                              ["lm_head", "re:.*block_sparse_moe.gate$"]),
    # Asymmetric, groups in activation order; the shared expert (fused gate/up) packed too, its gate float.
    "qwen2-moe-w4a16-g32-asym-actorder": ("qwen2-moe", W4A16_ASYM_ACT_ORDER,
                                          ["lm_head", "re:.*mlp.gate$", "re:.*shared_expert_gate$"]),
}


def pack_quantized_checkpoint(case: str, folder: Path) -> tuple[torch.nn.Module, list[list[int]]]:
    """compressed-tensors W4A16 (``PACKED_EXPERTS[case]``): every expert's gate/up/down and every
    other linear layer packed (``experts.<e>.w1.weight_packed``, ...), one config group targeting
    ``Linear``; the reference model and prompts."""
    name, weights, ignore = PACKED_EXPERTS[case]
    config = ct_config({"group_0": {"targets": ["Linear"], "weights": weights, "input_activations": None}},
                       "pack-quantized", ignore)
    return quantize_checkpoint(name, folder, config, pack_quantizer(weights), keep_float=("shared_expert_gate",))


@pytest.mark.parametrize("case", PACKED_EXPERTS)
def test_pack_quantized_experts(tmp_path, case):
    assert_served_like(*pack_quantized_checkpoint(case, tmp_path), tmp_path)


def test_pack_quantized_experts_on_two_gloo_ranks(tmp_path):
    """Tensor parallelism over gloo: each rank loads its slice of every packed tensor (experts' gate
    and up rows, down's input columns with every act-order group's scales and zero points, the
    shared expert's and attention's likewise) and the all-reduced sums give the reference's tokens."""
    model, prompts = pack_quantized_checkpoint("qwen2-moe-w4a16-g32-asym-actorder", tmp_path)
    assert_served_like(model, prompts, tmp_path, tp_size=2, device="cpu")


def int8_quantizer(_name: str, w: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """compressed-tensors int-quantized: an int8 ``weight`` and its ``weight_scale`` per output channel."""
    q, scale = quantize_symmetric_int8(w, "channel")
    return {"weight": q, "weight_scale": scale}, q.float() * scale


def test_int_quantized_w8a8_experts(tmp_path):
    """compressed-tensors W8A8 (llm-compressor's int8 scheme), here with asymmetric inputs: every
    expert's and attention projection's int8 ``weight`` with a ``weight_scale`` per output channel,
    each input quantized to int8 per token. The reference rounds each linear's input and each
    expert's two inputs to int8 and back (per token: scale and zero point over its range)."""
    weights, activations = int_args(8, "channel"), int_args(8, "token", symmetric=False, dynamic=True)
    config = ct_config({"group_0": {"targets": ["Linear"], "weights": weights, "input_activations": activations}},
                       "int-quantized", ["lm_head", "re:.*block_sparse_moe.gate$"])

    def rounded(x: torch.Tensor) -> torch.Tensor:
        return int8_round_trip(x, *token_qparams(x, symmetric=False))

    model, prompts = quantize_checkpoint("mixtral", tmp_path, config, int8_quantizer)
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name.startswith("model.layers."):
            module.register_forward_pre_hook(lambda _m, args: (rounded(args[0]),))
        elif hasattr(module, "gate_up_proj"):
            round_expert_inputs(module, lambda _e, x: rounded(x), lambda _e, x: rounded(x))
    assert_served_like(model, prompts, tmp_path)


@pytest.mark.parametrize("weights, activations, field", [
    (int_args(8, "tensor"), None, "weights strategy"),  # one scale per expert and part is not read
    (int_args(8, "channel"), int_args(8, "tensor"), "input_activations"),  # static input scales neither
])
def test_int_quantized_experts_it_cannot_serve_name_the_field(weights, activations, field):
    config = ct_config({"group_0": {"targets": ["Linear"], "weights": weights, "input_activations": activations}},
                       "int-quantized", [])
    with pytest.raises(ValueError, match=f"quantization_config {field}"):
        CompressedTensorsMethod.for_experts(config, "model.layers.0.mlp.experts")


@pytest.mark.parametrize("intermediate, block, tp, what", [
    (40, (16, 16), 1, "40 gate rows"),  # gate's partial last block would hold up's first rows
    (96, (16, 32), 2, "48 down input features per rank"),  # rank 1's slice starts inside a block
])
def test_block_wise_experts_cutting_a_block_is_an_error(intermediate, block, tp, what):
    method = Fp8LinearMethod.for_experts({**BLOCK_CONFIG, "weight_block_size": list(block)}, "model.layers.0.mlp.experts")
    with pytest.raises(ValueError, match=f"quantization_config weight_block_size.*{what}"):
        ExpertWeights(4, 64, intermediate, TPGroup(group=None, rank=0, size=tp), quant_method=method)


@pytest.mark.parametrize("config, quantize, rounding", [
    (compressed_tensors_config("tensor", None, []), fp8_quantizer("tensor"), None),
    ({**BLOCK_CONFIG, "weight_block_size": [16, 16]}, block_quantizer((16, 16)), 16),
    (GPTQ_ACT_ORDER, packed_quantizer(GPTQ_ACT_ORDER, 5), None),
    (ct_config({"group_0": {"targets": ["Linear"], "weights": W4A16_ASYM_ACT_ORDER}}, "pack-quantized", []),
     pack_quantizer(W4A16_ASYM_ACT_ORDER), None),
    (ct_config({"group_0": {"targets": ["Linear"], "weights": int_args(8, "channel")}}, "int-quantized", []),
     int8_quantizer, None),
], ids=["fp8-tensor", "fp8-block", "gptq-act-order", "pack-quantized-asym-act-order", "int8-weight-only"])
@pytest.mark.parametrize("expert_parallel", [False, True], ids=["tp", "ep"])
def test_tp2_ranks_compute_their_slices_of_the_experts(config, quantize, rounding, expert_parallel):
    """Under 2-way tensor parallelism each rank loads its slice of every expert (gate and up rows,
    down's input columns, their scales, blocks, groups and g_idx) from the per-expert checkpoint
    tensors, or with expert parallelism half the experts whole (their tensors only); the ranks'
    partial sums (what the all-reduce adds) equal the whole layer's, computed
    token by token from the dequantized weights (inputs rounded per token and group where the
    scheme quantizes them: the ranks' 32-wide slices hold whole groups)."""
    experts, hidden, intermediate, tokens, tp = 4, 64, 64, 6, 2
    gen = torch.Generator().manual_seed(0)
    shapes = {"gate": (intermediate, hidden), "up": (intermediate, hidden), "down": (hidden, intermediate)}
    packed = {(e, part): quantize(f"experts.{e}.{part}", torch.randn(*shape, generator=gen) * 0.1)
              for e in range(experts) for part, shape in shapes.items()}
    x = torch.randn(tokens, hidden, generator=gen)
    topk_ids = torch.stack([torch.randperm(experts, generator=gen)[:2] for _ in range(tokens)])
    topk_weights = torch.rand(tokens, 2, generator=gen)
    method_cls = {"gptq": GPTQMethod, "fp8": Fp8LinearMethod,
                  "compressed-tensors": CompressedTensorsMethod}[config["quant_method"]]
    partial_sums = torch.zeros(tokens, hidden)
    for rank in range(tp):
        method = method_cls.for_experts(config, "model.layers.0.mlp.experts")
        layer = ExpertWeights(experts, hidden, intermediate,
                              TPGroup(group=None, rank=rank, size=tp, expert_parallel=expert_parallel),
                              quant_method=method)
        for (expert, part), (tensors, _weight) in packed.items():
            for suffix, tensor in tensors.items():
                param = getattr(layer, f"{'w2' if part == 'down' else 'w13'}_{suffix}")
                param.weight_loader(param, tensor, (expert, part))
        method.process_weights_after_loading(layer)
        partial_sums += method.apply(layer, x, topk_weights, layer.local_ids(topk_ids), SiluAndMul())

    def rounded(v: torch.Tensor) -> torch.Tensor:
        return v if rounding is None else e4m3_round_trip(v, group=rounding)

    expected = torch.zeros(tokens, hidden)
    for token in range(tokens):
        for expert, weight in zip(topk_ids[token].tolist(), topk_weights[token]):
            gate, up, down = (packed[(expert, part)][1] for part in shapes)
            h = torch.nn.functional.silu(rounded(x[token]) @ gate.T) * (rounded(x[token]) @ up.T)
            expected[token] += weight * (rounded(h) @ down.T)
    torch.testing.assert_close(partial_sums, expected, rtol=1e-4, atol=1e-4)

"""compressed-tensors integer checkpoints (llm-compressor's ``int-quantized`` W8A8 and
``pack-quantized`` W4A16 / W8A16) and configs whose groups give layers different schemes, served
through the normal load path (Engine) and compared with transformers float32 holding the
dequantized weights.

The packer follows compressed-tensors' published layout (``pack_to_int32``): each signed value
offset by 2^(bits-1) into the unsigned range, ``p = 32 / bits`` of them to an int32 along the
packed dim, value j in bits ``bits * (j % p)`` of word ``j // p``. It is checked against the
worked example in ``pack_to_int32``'s docstring and against an element-by-element unpacking
written from that rule.

W8A8's reference is written out plainly: forward pre-hooks quantize each quantized linear's input
to int8 and back as the checkpoint's activation arguments say (per token, or by the calibrated
static scale and zero point), and transformers' float32 matmul of that with the dequantized weight
is what the engine's integer matmul computes, up to float32 rounding.
"""

from __future__ import annotations

import zlib

import pytest
import torch
from safetensors.torch import save_file

from reference import byte_level_tokenizer
from sglang_core.layers.parallel import (ColumnParallelLinear, ParallelLMHead, QKVParallelLinear, RowParallelLinear,
                                        TPGroup)
from sglang_plugins.quant.compressed_tensors.config import layer_scheme
from sglang_plugins.quant.compressed_tensors.int8 import Int8Method
from sglang_plugins.quant.compressed_tensors.method import CompressedTensorsMethod
from sglang_plugins.quant.compressed_tensors.packed import PackedIntMethod
from test_quant_awq_gptq import gptq_pack, reference_gptq_value
from test_quant_fp8 import (E4M3_MAX, ON_GPU, assert_matches, compressed_tensors_config, fp8_weight, linear_names,
                            shared_input, tiny_llama)

# Measured here: the engine's logprobs differed from the reference's by at most 1e-6 in every case
# (float32 rounding of the rescaled integer sums; no activation fell on another int8 step). A
# reference that does not quantize the activations differs by 2e-2 to 0.5 (and a token), so this
# bound tells the two apart.
W8A8_ATOL = 1e-4
WEIGHT_ONLY_ATOL = 1e-4


# ---- the packed layout ----

def ct_pack(values: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """compressed-tensors' ``pack_to_int32``: signed ``values`` offset by 2^(bits-1), then packed
    ``32 / bits`` to an int32 along ``dim``, lowest bits first (the bit layout GPTQ uses too)."""
    return gptq_pack(values.long() + (1 << (bits - 1)), bits, dim)


def test_packer_follows_the_published_layout():
    # pack_to_int32's docstring: 8-bit [1, 2] -> unsigned [129, 130], padded with zeros -> 33409.
    assert ct_pack(torch.tensor([[1, 2, -128, -128]]), 8, dim=1).item() == 33409
    gen = torch.Generator().manual_seed(0)
    values = torch.randint(-8, 8, (16, 16), generator=gen)
    for dim in (0, 1):
        words = ct_pack(values, 4, dim)
        assert words.dtype == torch.int32 and words.shape[dim] == 2
        for index in [(0, 0), (3, 7), (9, 9), (15, 12)]:
            assert reference_gptq_value(words, 4, index, dim) - 8 == values[index]


# ---- checkpoints ----

def quantize_symmetric_int8(w: torch.Tensor, strategy: str) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 ``w`` and its scale, one per output channel ([out, 1]) or for the tensor ([1])."""
    amax = w.abs().amax(dim=1, keepdim=True) if strategy == "channel" else w.abs().amax().reshape(1)
    scale = amax / 127
    return torch.round(w / scale).clamp(-128, 127).to(torch.int8), scale


def input_groups(inputs: int, group_size: int | None, act_order: bool, seed: int) -> torch.Tensor:
    """Each input feature's group: consecutive runs, or in activation order a shuffled assignment."""
    if group_size is None:
        return torch.zeros(inputs, dtype=torch.long)
    in_order = torch.arange(inputs) // group_size
    if not act_order:
        return in_order
    g_idx = torch.empty(inputs, dtype=torch.long)
    g_idx[torch.randperm(inputs, generator=torch.Generator().manual_seed(seed))] = in_order
    return g_idx


def pack_quantized(w: torch.Tensor, weights: dict, g_idx: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """The checkpoint tensors of ``w`` under pack-quantized ``weights`` arguments (min/max per
    output row and group, as llm-compressor's observer computes them), and the dequantized weight."""
    bits, symmetric = weights["num_bits"], weights["symmetric"]
    qmin, qmax = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    groups = int(g_idx.max()) + 1
    lo = torch.stack([w[:, g_idx == g].amin(dim=1) for g in range(groups)], dim=1).clamp(max=0)
    hi = torch.stack([w[:, g_idx == g].amax(dim=1) for g in range(groups)], dim=1).clamp(min=0)
    if symmetric:
        scale, zero = torch.maximum(-lo, hi) / ((qmax - qmin) / 2), torch.zeros_like(lo)
    else:
        scale = (hi - lo) / (qmax - qmin)
        zero = torch.round(qmin - lo / scale).clamp(qmin, qmax)
    q = torch.round(w / scale[:, g_idx] + zero[:, g_idx]).clamp(qmin, qmax)
    tensors = {"weight_packed": ct_pack(q, bits, dim=1), "weight_scale": scale,
               "weight_shape": torch.tensor(list(w.shape), dtype=torch.int32)}
    if not symmetric:
        tensors["weight_zero_point"] = ct_pack(zero, bits, dim=0)
    if weights.get("actorder") == "group":
        tensors["weight_g_idx"] = g_idx.to(torch.int32)
    return tensors, (q - zero[:, g_idx]) * scale[:, g_idx]


def save_checkpoint(model, folder, config: dict, tensors: dict[str, torch.Tensor]) -> None:
    """``model`` saved with the weight of every module that ``tensors`` holds entries of replaced by
    them (biases stay), and ``config`` as its quantization_config."""
    quantized = {name.rsplit(".", 1)[0] for name in tensors}
    state = {n: t.clone() for n, t in model.state_dict().items()
             if not (n.endswith(".weight") and n.rsplit(".", 1)[0] in quantized)}
    model.config.quantization_config = config
    model.config.save_pretrained(folder)
    del model.config.quantization_config
    save_file({n: t.contiguous() for n, t in {**state, **tensors}.items()}, str(folder / "model.safetensors"),
              metadata={"format": "pt"})
    byte_level_tokenizer().save_pretrained(folder)


def ct_config(groups: dict[str, dict], fmt: str, ignore: list[str]) -> dict:
    """A compressed-tensors quantization_config as llm-compressor writes it."""
    return {"quant_method": "compressed-tensors", "format": fmt, "quantization_status": "compressed",
            "config_groups": groups, "ignore": ignore, "kv_cache_scheme": None}


def int_args(bits: int, strategy: str, symmetric: bool = True, dynamic: bool = False, **more) -> dict:
    return {"num_bits": bits, "type": "int", "strategy": strategy, "symmetric": symmetric, "dynamic": dynamic,
            "group_size": None, "actorder": None, "observer": "minmax", **more}


def quantize_pack(model, tensors: dict, name: str, weights: dict) -> None:
    """Pack-quantize module ``name`` of ``model``: its checkpoint tensors into ``tensors``, its
    dequantized weight into the model. Modules reading one input share one activation order."""
    linear = model.get_submodule(name)
    seed = zlib.crc32(shared_input(name).encode())
    g_idx = input_groups(linear.weight.shape[1], weights.get("group_size"), weights.get("actorder") == "group", seed)
    packed, dequantized = pack_quantized(linear.weight.detach(), weights, g_idx)
    tensors.update({f"{name}.{key}": t for key, t in packed.items()})
    with torch.no_grad():
        linear.weight.copy_(dequantized)


PACKED_CASES = {
    "w4a16-g16-sym": int_args(4, "group", group_size=16),
    "w4a16-g32-asym-actorder": int_args(4, "group", symmetric=False, group_size=32, actorder="group"),
    "w8a16-channel-sym": int_args(8, "channel"),
    "w4a16-channel-asym": int_args(4, "channel", symmetric=False),
}


@pytest.mark.parametrize("case", PACKED_CASES)
def test_pack_quantized_matches_hf(tmp_path, case):
    weights = PACKED_CASES[case]
    model = tiny_llama()
    tensors: dict[str, torch.Tensor] = {}
    for name in linear_names(model):
        quantize_pack(model, tensors, name, weights)
    config = ct_config({"group_0": {"targets": ["Linear"], "weights": weights, "input_activations": None}},
                       "pack-quantized", ["lm_head"])
    save_checkpoint(model, tmp_path, config, tensors)
    assert_matches(model, tmp_path, atol=WEIGHT_ONLY_ATOL)


@pytest.mark.parametrize("fmt", ["pack-quantized", "float-quantized"])
def test_untied_lm_head_follows_its_group(tmp_path, fmt):
    """``lm_head`` left out of ``ignore`` is quantized like any linear layer its group targets:
    W4A16 by the ``Linear`` class (every layer packed, the head's ``lm_head.weight_packed`` ...),
    FP8 per tensor by its name alone (the e4m3 ``lm_head.weight`` and its one ``weight_scale``,
    every other layer float). The input embedding stays float."""
    model = tiny_llama()
    head = model.lm_head.weight.detach()
    tensors: dict[str, torch.Tensor] = {}
    if fmt == "pack-quantized":
        weights = PACKED_CASES["w4a16-g16-sym"]
        config = ct_config({"group_0": {"targets": ["Linear"], "weights": weights, "input_activations": None}},
                           fmt, [])
        for name in linear_names(model):
            quantize_pack(model, tensors, name, weights)
        packed, dequantized = pack_quantized(head, weights, input_groups(head.shape[1], 16, False, seed=0))
    else:
        config = compressed_tensors_config("tensor", None, [])
        config["config_groups"]["group_0"]["targets"] = ["lm_head"]
        q, scale = fp8_weight(head, "tensor")
        packed, dequantized = {"weight": q, "weight_scale": scale}, q.float() * scale
    tensors.update({f"lm_head.{key}": t for key, t in packed.items()})
    with torch.no_grad():
        model.lm_head.weight.copy_(dequantized)
    save_checkpoint(model, tmp_path, config, tensors)
    assert_matches(model, tmp_path, atol=WEIGHT_ONLY_ATOL)


# ---- W8A8 ----

def int8_round_trip(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor) -> torch.Tensor:
    """``x`` quantized to int8 (``round(x / s + z)``, saturated) and dequantized."""
    return (torch.round(x / scale + zero_point).clamp(-128, 127) - zero_point) * scale


def token_qparams(x: torch.Tensor, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic per-token scale and zero point: symmetric ``max|x| / 127``; asymmetric the token's
    range, widened to hold 0, spread over the 256 int8 steps."""
    if symmetric:
        return x.abs().amax(dim=-1, keepdim=True) / 127, torch.zeros(())
    lo, hi = x.amin(dim=-1, keepdim=True).clamp(max=0), x.amax(dim=-1, keepdim=True).clamp(min=0)
    scale = (hi - lo) / 255
    return scale, torch.round(-128 - lo / scale)


def calibrate_ranges(model) -> dict[str, tuple[float, float]]:
    """Each linear's input range (widened to hold 0) over a calibration pass."""
    seen: dict[str, tuple[float, float]] = {}

    def observe(name, x):
        lo, hi = seen.get(name, (0.0, 0.0))
        seen[name] = (min(lo, x.min().item()), max(hi, x.max().item()))

    hooks = [model.get_submodule(name).register_forward_pre_hook(lambda _m, args, name=name: observe(name, args[0]))
             for name in linear_names(model)]
    with torch.no_grad():
        model(torch.tensor([list(range(3, 60))]))
    for hook in hooks:
        hook.remove()
    return seen


def static_qparams(lo: float, hi: float, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """A static per-tensor scale [1] and zero point [1] (int8 as llm-compressor stores it)."""
    if symmetric:
        return torch.tensor([max(-lo, hi) / 127]), torch.zeros(1, dtype=torch.int8)
    scale = torch.tensor([(hi - lo) / 255])
    return scale, torch.round(-128 - lo / scale).clamp(-128, 127).to(torch.int8)


# (weight strategy, input activations, format: "naive-quantized" is int-quantized's general name)
W8A8_CASES = {
    "dynamic-sym-channel": ("channel", int_args(8, "token", dynamic=True), "int-quantized"),
    "dynamic-asym-channel": ("channel", int_args(8, "token", symmetric=False, dynamic=True), "int-quantized"),
    "static-asym-tensor": ("tensor", int_args(8, "tensor", symmetric=False), "int-quantized"),
    "static-sym-channel": ("channel", int_args(8, "tensor"), "naive-quantized"),
    "weight-only-tensor": ("tensor", None, "int-quantized"),
}


@pytest.mark.parametrize("case", W8A8_CASES)
def test_int_quantized_matches_reference(tmp_path, case):
    strategy, activations, fmt = W8A8_CASES[case]
    model = tiny_llama()
    ranges = calibrate_ranges(model) if activations is not None and not activations["dynamic"] else {}
    tensors: dict[str, torch.Tensor] = {}
    for name in linear_names(model):
        linear = model.get_submodule(name)
        q, scale = quantize_symmetric_int8(linear.weight.detach(), strategy)
        tensors.update({f"{name}.weight": q, f"{name}.weight_scale": scale})
        with torch.no_grad():
            linear.weight.copy_(q.float() * scale)
        if activations is None:
            continue
        if activations["dynamic"]:
            qparams = lambda x: token_qparams(x, activations["symmetric"])  # noqa: E731
        else:
            # q/k/v (and gate/up) see one input, so their calibrated parameters agree, as in a real checkpoint.
            s, z = static_qparams(*ranges[name], activations["symmetric"])
            tensors[f"{name}.input_scale"] = s
            if not activations["symmetric"]:
                tensors[f"{name}.input_zero_point"] = z
            qparams = lambda x, s=s, z=z: (s, z.float())  # noqa: E731
        linear.register_forward_pre_hook(
            lambda _m, args, qparams=qparams: (int8_round_trip(args[0], *qparams(args[0])),))
    config = ct_config({"group_0": {"targets": ["Linear"], "weights": int_args(8, strategy),
                                    "input_activations": activations}}, fmt, ["lm_head"])
    save_checkpoint(model, tmp_path, config, tensors)
    assert_matches(model, tmp_path, atol=W8A8_ATOL)


@pytest.mark.parametrize("device", ["cpu", ON_GPU])
@pytest.mark.parametrize("symmetric", [True, False])
def test_fused_parts_with_different_static_input_ranges(symmetric, device):
    """q, k and v quantize their one shared input with one scale (and zero point): the largest
    symmetric scale; asymmetric, the smallest range holding each part's [s(-128 - z), s(127 - z)].
    On a GPU the integer matmul is CUDA's ``torch._int_mm`` (7 tokens: padded to its 17 rows)."""
    activations = int_args(8, "tensor", symmetric=symmetric)
    with torch.device(device):
        layer = QKVParallelLinear(64, 16, 4, 2, quant_method=Int8Method(int_args(8, "tensor"), activations, "qkv_proj"))
    torch.manual_seed(0)
    x = torch.randn(7, 64)
    ranges = {"q": (-3.0, 2.0), "k": (-1.0, 4.0), "v": (-2.0, 2.5)}
    dequantized = []
    for part, rows in (("q", 64), ("k", 32), ("v", 32)):
        q, scale = quantize_symmetric_int8(torch.randn(rows, 64), "tensor")
        dequantized.append(q.float() * scale)
        s, z = static_qparams(*ranges[part], symmetric)
        for param, tensor in ((layer.weight, q), (layer.weight_scale, scale), (layer.input_scale, s)):
            param.weight_loader(param, tensor.to(device, param.dtype), part)
        if not symmetric:
            layer.input_zero_point.weight_loader(layer.input_zero_point, z.to(device, torch.float32), part)
    layer.quant_method.process_weights_after_loading(layer)
    if symmetric:
        scale, zero = torch.tensor(4.0 / 127), torch.tensor(0.0)  # k's max|x| = 4
    else:
        # The parts' stored (s, z) cover about [-3, 4] together: 7 / 255 a step.
        parts = [static_qparams(*r, False) for r in ranges.values()]
        lo = min((s * (-128 - z.float())).item() for s, z in parts)
        hi = max((s * (127 - z.float())).item() for s, z in parts)
        assert lo == pytest.approx(-3.0, abs=0.02) and hi == pytest.approx(4.0, abs=0.02)
        scale = torch.tensor((hi - lo) / 255)
        zero = torch.round(-128 - lo / scale)
    expected = int8_round_trip(x, scale, zero) @ torch.cat(dequantized).T
    torch.testing.assert_close(layer(x.to(device)).cpu(), expected, rtol=1e-5, atol=1e-5)


# ---- groups, targets and ignore ----

FP8_DYNAMIC = {"num_bits": 8, "type": "float", "strategy": "token", "symmetric": True, "dynamic": True}
FP8_CHANNEL = {"num_bits": 8, "type": "float", "strategy": "channel", "symmetric": True, "dynamic": False}
W4_G16 = PACKED_CASES["w4a16-g16-sym"]


def test_groups_of_different_schemes(tmp_path):
    """Attention in FP8 (a pattern target, more specific than the MLP group's class target
    "Linear"), MLP layers in packed int4, layer 1's down_proj ignored (float in the checkpoint):
    a mixed-precision config, each group naming its format."""
    model = tiny_llama()
    tensors: dict[str, torch.Tensor] = {}
    for name in linear_names(model):
        linear = model.get_submodule(name)
        if "self_attn" in name:
            q, scale = fp8_weight(linear.weight.detach(), "channel")
            tensors.update({f"{name}.weight": q, f"{name}.weight_scale": scale})
            with torch.no_grad():
                linear.weight.copy_(q.float() * scale)
            linear.register_forward_pre_hook(lambda _m, args: (e4m3_round_trip(args[0]),))
        elif name != "model.layers.1.mlp.down_proj":
            quantize_pack(model, tensors, name, W4_G16)
    config = ct_config({
        "group_0": {"targets": ["Linear"], "weights": W4_G16, "input_activations": None, "format": "pack-quantized"},
        "group_1": {"targets": [r"re:.*self_attn\..*"], "weights": FP8_CHANNEL, "input_activations": FP8_DYNAMIC,
                    "format": "float-quantized"},
    }, "mixed-precision", ["lm_head", r"re:.*layers\.1\.mlp\.down_proj$"])
    save_checkpoint(model, tmp_path, config, tensors)
    assert_matches(model, tmp_path, atol=W8A8_ATOL)


def e4m3_round_trip(x: torch.Tensor) -> torch.Tensor:
    """``x`` rounded to e4m3 and back with one scale per token (FP8's dynamic activations)."""
    scale = x.abs().amax(dim=-1, keepdim=True) / E4M3_MAX
    return (x / scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn).float() * scale


def test_most_specific_target_decides():
    """Exact names before patterns before the class, patterns in sorted order; a target two
    groups list belongs to the later; a fused layer follows its parts' common group. (Each group
    is told apart by its group_size.)"""
    def group(group_size, *targets):
        return {"targets": list(targets), "weights": {**W4_G16, "group_size": group_size}, "input_activations": None}
    config = ct_config({"linear": group(8, "Linear"), "patterns": group(16, "re:.*mlp.*", "re:.*down_proj"),
                        "name": group(32, "model.layers.0.mlp.down_proj"), "later": group(64, "re:.*down_proj")},
                       "pack-quantized", [])
    for prefix, group_size in [("model.layers.0.mlp.down_proj", 32), ("model.layers.1.mlp.down_proj", 64),
                               ("model.layers.1.mlp.gate_up_proj", 16), ("model.layers.1.self_attn.qkv_proj", 8)]:
        assert layer_scheme(config, prefix).weights["group_size"] == group_size, prefix
    assert layer_scheme({**config, "ignore": ["re:.*layers.1.self_attn.[qkv]_proj"]},
                        "model.layers.1.self_attn.qkv_proj") is None


def one_group(weights: dict, fmt: str, ignore: tuple[str, ...] = (), targets: tuple[str, ...] = ("Linear",),
              **group) -> dict:
    return ct_config({"g": {"targets": list(targets), "weights": weights, **group}}, fmt, list(ignore))


@pytest.mark.parametrize("config, field", [
    (one_group(W4_G16, "pack-quantized", targets=("re:.*q_proj",)),
     "config_groups targets: the modules fused into model.layers.0.self_attn.qkv_proj follow different groups"),
    (one_group(W4_G16, "pack-quantized", ignore=("model.layers.0.self_attn.v_proj",)),
     "ignore: matches only some of the modules fused into model.layers.0.self_attn.qkv_proj"),
    (one_group(W4_G16, "marlin-24"), "format 'marlin-24'"),
    (one_group(W4_G16, "int-quantized"), "weights type 'int' num_bits 4"),
    (one_group(W4_G16, "pack-quantized", input_activations=int_args(8, "token", dynamic=True)),
     "input_activations: pack-quantized"),
    (one_group({**W4_G16, "group_size": 0}, "pack-quantized"), "weights group_size 0"),
    (one_group({**W4_G16, "actorder": "sorted"}, "pack-quantized"), "weights actorder"),
    (one_group(int_args(8, "channel", symmetric=False), "int-quantized"), "weights symmetric"),
    (one_group(int_args(8, "group", group_size=16), "int-quantized"), "weights strategy 'group'"),
    (one_group(int_args(8, "channel"), "int-quantized", input_activations=int_args(8, "token")),
     "input_activations strategy 'token' with dynamic=False"),
    (one_group(int_args(8, "channel"), "int-quantized", output_activations=int_args(8, "token")),
     "config_groups g output_activations"),
    ({**one_group(W4_G16, "pack-quantized"), "sparsity_config": {"format": "sparse-24-bitmask"}},
     "sparsity_config format"),
])
def test_bad_config_names_the_field(config, field):
    prefix = "model.layers.0.self_attn.qkv_proj"
    with pytest.raises(ValueError, match=f"quantization_config {field}"):
        ColumnParallelLinear(64, 64, quant_method=CompressedTensorsMethod.for_layer(config, prefix))


# ---- tensor parallelism: each rank dequantizes its own slice ----

@pytest.mark.parametrize("case", ["w4a16-g16-sym", "w4a16-g32-asym-actorder", "w4a16-channel-asym"])
def test_tp2_ranks_dequantize_their_slices(case):
    """Row- and column-parallel layers, and an LM head split by vocabulary rows (its packed zero
    points: 4 words of 8 rows per rank)."""
    weights, inputs, outputs, tp = PACKED_CASES[case], 128, 64, 2
    torch.manual_seed(3)
    w = torch.randn(outputs, inputs)
    g_idx = input_groups(inputs, weights.get("group_size"), weights.get("actorder") == "group", seed=3)
    tensors, dequantized = pack_quantized(w, weights, g_idx)
    x = torch.randn(3, inputs)
    row_sum = 0
    for rank in range(tp):
        group = TPGroup(group=None, rank=rank, size=tp)
        row = RowParallelLinear(inputs, outputs, tp=group, quant_method=PackedIntMethod(weights, None, "down_proj"))
        column = ColumnParallelLinear(inputs, outputs, tp=group, quant_method=PackedIntMethod(weights, None, "up_proj"))
        head = ParallelLMHead(outputs, inputs, tp=group, quant_method=PackedIntMethod(weights, None, "lm_head"))
        for layer in (row, column, head):
            for name, tensor in tensors.items():
                param = getattr(layer, name)
                param.weight_loader(param, tensor)
        in_cols = slice(rank * inputs // tp, (rank + 1) * inputs // tp)
        out_rows = slice(rank * outputs // tp, (rank + 1) * outputs // tp)
        assert torch.equal(row.quant_method.dequantized_weight(row), dequantized[:, in_cols])
        assert torch.equal(column.quant_method.dequantized_weight(column), dequantized[out_rows])
        assert torch.equal(head.quant_method.dequantized_weight(head), dequantized[out_rows])
        row_sum = row_sum + row.quant_method.apply(row, x[:, in_cols], None)  # what the all-reduce adds up
    torch.testing.assert_close(row_sum, x @ dequantized.T, rtol=1e-5, atol=1e-5)


def test_fused_parts_with_different_activation_orders_are_an_error():
    weights = PACKED_CASES["w4a16-g32-asym-actorder"]
    layer = ColumnParallelLinear(64, 64, quant_method=PackedIntMethod(weights, None, "model.layers.0.mlp.gate_up_proj"))
    g_idx = layer.weight_g_idx
    g_idx.weight_loader(g_idx, input_groups(64, 32, True, seed=1).to(torch.int32), 0)
    g_idx.weight_loader(g_idx, input_groups(64, 32, True, seed=1).to(torch.int32), 1)
    with pytest.raises(ValueError, match="gate_up_proj have different weight_g_idx"):
        g_idx.weight_loader(g_idx, input_groups(64, 32, True, seed=2).to(torch.int32), 1)

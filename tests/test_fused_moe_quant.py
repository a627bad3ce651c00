"""The fused MoE kernel on quantized experts (``kernels.moe_weight.QuantizedExperts``: e4m3 with
per-tensor, per-channel or block scales; GPTQ / AWQ / compressed-tensors packed integers) against
the float64 experts of the dequantized weights.

Weights are quantized here by the test packers that follow the formats' published rules
(``test_quant_fp8``: e4m3 and DeepSeek-V3's ``weight_scale_inv`` blocks; ``test_quant_awq_gptq``:
AutoGPTQ's and AutoAWQ's packing; ``test_quant_compressed_tensors``: llm-compressor's
pack-quantized), and handed to the kernel as the plugins describe them: the checkpoint's
``[in, out]`` tensors as transposed views (compressed-tensors' ``[out, in]`` ones as they are). On CPU the kernel runs in Triton's
interpreter: tiny shapes, 16-wide tiles.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import pytest
import torch

pytest.importorskip("triton")  # in the test extra; absent only outside CI
from sglang_core.kernels import fused_moe as moe  # noqa: E402
from sglang_core.kernels.moe_weight import QuantizedExperts  # noqa: E402
from sglang_core.layers import moe as moe_layer  # noqa: E402
from sglang_core.layers.activation import SiluAndMul  # noqa: E402
from sglang_core.layers.experts import ExpertWeights  # noqa: E402
from sglang_core.layers.quant import ExpertsQuantMethod  # noqa: E402
from sglang_plugins.quant.awq.method import AWQMethod  # noqa: E402
from sglang_plugins.quant.compressed_tensors.method import CompressedTensorsMethod  # noqa: E402
from sglang_plugins.quant.fp8.experts import Fp8ExpertsMethod  # noqa: E402
from sglang_plugins.quant.fp8.scheme import Fp8Scheme  # noqa: E402
from sglang_plugins.quant.gptq.method import GPTQMethod  # noqa: E402
from test_fused_moe_kernel import DEVICE, SMALL_TILES, TOLERANCE, reference  # noqa: E402
from test_quant_awq_gptq import Quantized, group_index  # noqa: E402
from test_quant_compressed_tensors import (ct_config, input_groups, int_args, pack_quantized,  # noqa: E402
                                           quantize_symmetric_int8)
from test_quant_fp8 import block_dequantized, fp8_block_weight, fp8_weight  # noqa: E402

# (format, packing options): see ``quantize``.
GPTQ4 = {"quant_method": "gptq", "bits": 4, "sym": False, "checkpoint_format": "gptq"}
GPTQ8 = {"quant_method": "gptq", "bits": 8, "sym": False, "checkpoint_format": "gptq_v2"}
AWQ = {"quant_method": "awq", "bits": 4}
# Fewer interpreted programs; a 128-wide scale group spans two K tiles of these, a 32-wide one
# only part of a tile (scales looked up per input, not once per tile).
WIDE_TILES = dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=64, GROUP_M=2, num_warps=4, num_stages=2)


@dataclass(frozen=True)
class Case:
    scheme: str  # fp8-tensor, fp8-channel, fp8-block, gptq4, gptq8, awq, int4-sym (a constant zero point)
    experts: int
    top_k: int
    tokens: int
    hidden: int = 40
    inter: int = 24
    group: int = -1  # int formats: inputs per scale group (-1: one group)
    block: tuple[int, int] = (16, 16)  # fp8-block: (rows, cols) per scale
    dtype: torch.dtype = torch.float32
    tiles: dict = dataclasses.field(default_factory=lambda: SMALL_TILES, hash=False)


def fp8_experts(case: Case, weights: torch.Tensor, parts: int) -> tuple[QuantizedExperts, torch.Tensor]:
    """Each expert's ``[N, K]`` weight in e4m3 with its scales, and the weights they stand for."""
    quantized, scales, dequantized = [], [], []
    for w in weights:
        if case.scheme == "fp8-block":
            q, scale = fp8_block_weight(w, case.block)
            dequantized.append(block_dequantized(q, scale, case.block))
        else:
            # A per-tensor scale per part: w13's gate and up each have theirs.
            pieces = [fp8_weight(piece, case.scheme.removeprefix("fp8-")) for piece in w.chunk(parts)]
            q = torch.cat([p for p, _ in pieces])
            scale = torch.cat([s.reshape(-1, 1) for _, s in pieces])
            rows = scale.repeat_interleave(w.shape[0] // scale.shape[0], dim=0)
            dequantized.append(q.float() * rows)
        quantized.append(q)
        scales.append(scale)
    rows = {"fp8-block": case.block[0], "fp8-tensor": weights.shape[1] // parts, "fp8-channel": 1}[case.scheme]
    stacked_scales = torch.stack(scales).reshape(len(weights), -1, scales[0].shape[-1])
    experts = QuantizedExperts(torch.stack(quantized), stacked_scales, "fp8", scale_rows=rows,
                               scale_cols=case.block[1] if case.scheme == "fp8-block" else None)
    return experts, torch.stack(dequantized)


def int_experts(case: Case, outputs: int, inputs: int, gen: torch.Generator) -> tuple[QuantizedExperts, torch.Tensor]:
    """Random packed experts (``[in, out]`` checkpoint tensors, as the formats store them) and
    the weights they stand for."""
    fmt = {**{"gptq4": GPTQ4, "gptq8": GPTQ8, "awq": AWQ, "int4-sym": {**GPTQ4, "sym": True}}[case.scheme],
           "group_size": case.group}
    group = inputs if case.group == -1 else case.group
    packed = [Quantized(fmt, inputs, outputs, gen, torch.arange(inputs) // group) for _ in range(case.experts)]
    qweight, qzeros, scales = (torch.stack([p.tensors[name] for p in packed])
                               for name in ("qweight", "qzeros", "scales"))
    awq, sym = case.scheme == "awq", case.scheme == "int4-sym"
    zeros = {"zeros": None, "zero_offset": 8} if sym else {
        "zeros": qzeros.transpose(1, 2), "zero_offset": 1 if fmt.get("checkpoint_format") == "gptq" else 0}
    experts = QuantizedExperts(qweight.transpose(1, 2), scales.transpose(1, 2), "int",
                               scale_cols=None if case.group == -1 else case.group, bits=fmt["bits"],
                               packed_dim=1 if awq else 2, interleaved=awq, **zeros)
    return experts, torch.stack([p.weight for p in packed])


def quantized_experts(case: Case, seed: int) -> tuple[tuple[QuantizedExperts, torch.Tensor], ...]:
    """w13 and w2 of ``case``, each as (its quantized description, the float weights it stands for)."""
    gen = torch.Generator().manual_seed(seed)
    shapes = {"w13": (2 * case.inter, case.hidden), "w2": (case.hidden, case.inter)}
    if case.scheme.startswith("fp8"):
        return tuple(fp8_experts(case, torch.randn(case.experts, *shape, generator=gen) / shape[1] ** 0.5,
                                 2 if stem == "w13" else 1) for stem, shape in shapes.items())
    return tuple(int_experts(case, *shape, gen) for shape in shapes.values())


def routing(case: Case, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Hidden rows, each token's top-k distinct experts and positive weights that do not sum to one."""
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(case.tokens, case.hidden, generator=gen)
    topk_ids = torch.stack([torch.randperm(case.experts, generator=gen)[:case.top_k] for _ in range(case.tokens)])
    topk_weights = torch.rand(case.tokens, case.top_k, generator=gen) + 0.1
    return hidden.to(case.dtype), topk_weights, topk_ids.to(torch.int32)


def on_device(weight: QuantizedExperts) -> QuantizedExperts:
    moved = {name: getattr(weight, name).to(DEVICE) for name in ("data", "scales", "zeros")
             if getattr(weight, name) is not None}
    return dataclasses.replace(weight, **moved)


CASES = [
    Case("fp8-tensor", experts=3, top_k=2, tokens=5),
    Case("fp8-channel", experts=8, top_k=2, tokens=17),
    Case("fp8-channel", experts=1, top_k=1, tokens=1, hidden=33, inter=21, dtype=torch.bfloat16),
    Case("fp8-block", experts=3, top_k=2, tokens=17, hidden=40, inter=32, block=(16, 16), tiles=WIDE_TILES),
    Case("fp8-block", experts=3, top_k=1, tokens=5, hidden=136, inter=128, block=(128, 128), tiles=WIDE_TILES),
    Case("gptq4", experts=3, top_k=2, tokens=5, hidden=64, inter=32, group=32),
    Case("gptq4", experts=1, top_k=1, tokens=17, hidden=40, inter=24),
    Case("int4-sym", experts=3, top_k=2, tokens=5, hidden=64, inter=32, group=16),
    Case("gptq8", experts=8, top_k=2, tokens=1, hidden=64, inter=32, group=32, dtype=torch.bfloat16),
    Case("awq", experts=8, top_k=2, tokens=5, hidden=64, inter=32, group=32, tiles=WIDE_TILES),
    Case("awq", experts=3, top_k=1, tokens=5, hidden=256, inter=128, group=128, tiles=WIDE_TILES),
    Case("awq", experts=3, top_k=2, tokens=17, hidden=64, inter=32, group=-1, tiles=WIDE_TILES),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c.scheme}-E{c.experts}k{c.top_k}T{c.tokens}-H{c.hidden}"
                                                     f"I{c.inter}-g{c.group}-{str(c.dtype)[6:]}")
def test_quantized_fused_moe_matches_float64_dequantized_experts(case: Case) -> None:
    (w13, w13_float), (w2, w2_float) = quantized_experts(case, seed=case.experts * 100 + case.tokens)
    hidden, topk_weights, topk_ids = routing(case, seed=case.tokens)
    got = moe.fused_moe(hidden.to(DEVICE), on_device(w13), on_device(w2), topk_weights.to(DEVICE),
                        topk_ids.to(DEVICE), config=case.tiles)
    assert got.dtype == case.dtype and got.shape == hidden.shape
    # The kernel rounds each dequantized weight to hidden's dtype, as the dequantizing path does.
    expected = reference(hidden, w13_float.to(case.dtype), w2_float.to(case.dtype), topk_weights, topk_ids, "silu")
    torch.testing.assert_close(got.cpu().double(), expected, **TOLERANCE[case.dtype])


# ---- the quant plugins' expert methods: checkpoint tensors loaded into a layer, computed fused ----

PLUGIN_SHAPE = dict(experts=3, hidden=64, inter=32, top_k=2, tokens=5)
GPTQ_EXPERTS = {**GPTQ4, "group_size": 32, "desc_act": False}
# compressed-tensors pack-quantized weights arguments (llm-compressor's W4A16 / W8A16)
PACKED_WEIGHTS = {"ct-w4a16-sym": int_args(4, "group", group_size=32),
                  "ct-w4a16-asym": int_args(4, "group", symmetric=False, group_size=16),
                  "ct-w8a16-channel": int_args(8, "channel"),
                  "ct-w4a16-actorder": int_args(4, "group", group_size=32, actorder="group")}
# compressed-tensors int-quantized W8A8 (int8 weights per channel; the kernel leaves activations 16-bit)
W8A8 = {"weights": int_args(8, "channel"), "input_activations": int_args(8, "token", dynamic=True)}


def plugin_method(scheme: str) -> ExpertsQuantMethod:
    if scheme.startswith("fp8"):
        weights = scheme.removeprefix("fp8-")
        return Fp8ExpertsMethod(Fp8Scheme(weights, "dynamic", block=(16, 16) if weights == "block" else None),
                                "model.layers.0.mlp.experts")
    if scheme == "awq":
        return AWQMethod.for_experts({**AWQ, "group_size": 32}, "model.layers.0.mlp.experts")
    if scheme in PACKED_WEIGHTS or scheme == "ct-w8a8":
        group = ({"targets": ["Linear"], **W8A8} if scheme == "ct-w8a8" else
                 {"targets": ["Linear"], "weights": PACKED_WEIGHTS[scheme], "input_activations": None})
        fmt = "int-quantized" if scheme == "ct-w8a8" else "pack-quantized"
        return CompressedTensorsMethod.for_experts(ct_config({"group_0": group}, fmt, []), "model.layers.0.mlp.experts")
    return GPTQMethod.for_experts({**GPTQ_EXPERTS, "desc_act": scheme == "gptq-desc-act"}, "model.layers.0.mlp.experts")


def checkpoint_part(scheme: str, outputs: int, inputs: int, gen: torch.Generator) -> tuple[dict, torch.Tensor]:
    """One expert projection's checkpoint tensors by suffix, and the float weight they stand for."""
    if scheme.startswith("fp8"):
        w = torch.randn(outputs, inputs, generator=gen) / inputs ** 0.5
        if scheme == "fp8-block":
            q, scale_inv = fp8_block_weight(w, (16, 16))
            return {"weight": q, "weight_scale_inv": scale_inv}, block_dequantized(q, scale_inv, (16, 16))
        q, scale = fp8_weight(w, scheme.removeprefix("fp8-"))
        return {"weight": q, "weight_scale": scale}, q.float() * scale.reshape(-1, 1)
    if scheme == "ct-w8a8":
        q, scale = quantize_symmetric_int8(torch.randn(outputs, inputs, generator=gen) / inputs ** 0.5, "channel")
        return {"weight": q, "weight_scale": scale}, q.float() * scale
    if scheme in PACKED_WEIGHTS:
        weights = PACKED_WEIGHTS[scheme]
        g_idx = input_groups(inputs, weights.get("group_size"), weights.get("actorder") == "group",
                             seed=int(torch.randint(1 << 30, (), generator=gen)))
        return pack_quantized(torch.randn(outputs, inputs, generator=gen) / inputs ** 0.5, weights, g_idx)
    fmt = {**(AWQ if scheme == "awq" else GPTQ_EXPERTS), "group_size": 32, "desc_act": scheme == "gptq-desc-act"}
    quantized = Quantized(fmt, inputs, outputs, gen, group_index(fmt, inputs, gen))
    return quantized.tensors, quantized.weight


def loaded_experts(scheme: str, seed: int) -> tuple[ExpertWeights, torch.Tensor, torch.Tensor]:
    """A layer of the plugin's experts loaded expert by expert through the normal weight loaders,
    and the float w13 / w2 its checkpoint stands for."""
    gen = torch.Generator().manual_seed(seed)
    e, h, i = PLUGIN_SHAPE["experts"], PLUGIN_SHAPE["hidden"], PLUGIN_SHAPE["inter"]
    method = plugin_method(scheme)
    layer = ExpertWeights(e, h, i, quant_method=method)
    w13, w2 = torch.zeros(e, 2 * i, h), torch.zeros(e, h, i)
    params = dict(layer.named_parameters())
    for expert in range(e):
        for part, rows, (outputs, inputs) in (("gate", slice(0, i), (i, h)), ("up", slice(i, 2 * i), (i, h)),
                                              ("down", slice(None), (h, i))):
            tensors, weight = checkpoint_part(scheme, outputs, inputs, gen)
            (w2 if part == "down" else w13)[expert, rows] = weight
            for suffix, tensor in tensors.items():
                param = params[f"{'w2' if part == 'down' else 'w13'}_{suffix}"]
                param.weight_loader(param, tensor, (expert, part))
    method.process_weights_after_loading(layer)
    return layer, w13, w2


@pytest.mark.parametrize("scheme", ["fp8-tensor", "fp8-channel", "fp8-block", "gptq4", "awq", "gptq-desc-act",
                                    *PACKED_WEIGHTS, "ct-w8a8"])
def test_expert_methods_compute_through_the_fused_kernel(scheme: str, monkeypatch) -> None:
    """Where the fused kernel applies (made to apply on CPU here: the interpreter runs it), each
    plugin's experts go through it on their packed tensors (weight-only: W8A8's activations stay
    16-bit there); act-order experts (GPTQ's, and compressed-tensors' ``actorder: group``) fall
    back to dequantizing."""
    layer, w13, w2 = loaded_experts(scheme, seed=len(scheme))
    layer.to(DEVICE)
    monkeypatch.setattr(moe_layer, "use_fused", lambda x: True)
    calls = []
    fused = moe.fused_moe
    monkeypatch.setattr(moe, "fused_moe", lambda *args, **kwargs: calls.append(args) or fused(*args, **kwargs))
    case = Case(scheme, PLUGIN_SHAPE["experts"], PLUGIN_SHAPE["top_k"], PLUGIN_SHAPE["tokens"],
                PLUGIN_SHAPE["hidden"], PLUGIN_SHAPE["inter"])
    hidden, topk_weights, topk_ids = routing(case, seed=3)
    got = layer.quant_method.apply(layer, hidden.to(DEVICE), topk_weights.to(DEVICE), topk_ids.to(DEVICE),
                                   SiluAndMul())
    assert len(calls) == (0 if scheme in ("gptq-desc-act", "ct-w4a16-actorder") else 1)
    torch.testing.assert_close(got.cpu().double(), reference(hidden, w13, w2, topk_weights, topk_ids, "silu"),
                               **TOLERANCE[torch.float32])


def test_outputs_packed_across_gate_and_up_are_refused() -> None:
    """An intermediate size of 12 packed 8 to a word: gate's last word would hold up's first
    outputs, which the kernel's whole-word tiles cannot split."""
    case = Case("awq", experts=2, top_k=1, tokens=3, hidden=16, inter=12, group=4)
    (w13, _), (w2, _) = quantized_experts(case, seed=0)
    hidden, topk_weights, topk_ids = routing(case, seed=0)
    with pytest.raises(ValueError, match="intermediate size 12"):
        moe.fused_moe(hidden, w13, w2, topk_weights, topk_ids)

"""Dummy FP8 weights (``--load-format dummy`` on an FP8 checkpoint's config), for timing the FP8
benchmark configs: block-wise (Qwen3-FP8), per-tensor static experts (AutoFP8 Mixtral) and
per-channel dynamic (compressed-tensors Llama). The e4m3 codes are finite, the scales positive,
and the weights they dequantize to (computed here from the raw parameters, by each layout's
published meaning) have about the std of a bf16 dummy model's (0.02), scale group by scale group;
an engine on a tiny version of each benchmark config generates finite log-probabilities.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig

from sglang_core.engine import Engine
from sglang_core.layers.experts import ExpertWeights
from sglang_core.layers.parallel import MergedColumnParallelLinear
from sglang_core.weights.loader import init_dummy_weights
from sglang_plugins.quant.fp8.method import Fp8LinearMethod

BENCHMARKS = Path(__file__).parent.parent / "benchmarks"
E4M3 = torch.float8_e4m3fn
# A tiny shape for each benchmark config (its quantization_config kept as it is): block-wise dims
# are whole 128-blocks where fused parts meet, as the checkpoints' are.
TINY = {
    "qwen3-8b-fp8-block": dict(hidden_size=128, intermediate_size=256, num_attention_heads=2, num_key_value_heads=1,
                               head_dim=128),
    "mixtral-8x7b-fp8": dict(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
                             num_local_experts=4),
    "llama-3.1-8b-fp8": dict(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
                             head_dim=16),
}
# What each config's modules hold: (layout, activations) of the linear layers and of the experts.
LAYOUTS = {
    "qwen3-8b-fp8-block": {"linear": ("block", "dynamic")},
    "mixtral-8x7b-fp8": {"linear": ("tensor", "static"), "experts": ("tensor", "static")},
    "llama-3.1-8b-fp8": {"linear": ("channel", "dynamic")},
}


def dequantized(codes: torch.Tensor, scale: torch.Tensor, block: tuple[int, int] | None) -> torch.Tensor:
    """``codes`` [rows, cols] times its scale: one per output row (``scale`` [rows]) or per block
    (``scale`` [ceil(rows / r), ceil(cols / c)], edge blocks partial)."""
    assert bool(torch.isfinite(codes.float()).all()), "e4m3 codes must be finite"
    assert bool(torch.isfinite(scale).all() & (scale > 0).all()), "scales must be positive and finite"
    if block is None:
        return codes.float() * scale.reshape(-1, 1)
    rows, cols = codes.shape
    per_element = scale.repeat_interleave(block[0], 0)[:rows].repeat_interleave(block[1], 1)[:, :cols]
    return codes.float() * per_element


def assert_plausible(weight: torch.Tensor, block: tuple[int, int] | None) -> None:
    """About a bf16 dummy weight's std (0.02, here within a factor of about two either way: one scale per
    tensor varies it that much) in every scale group (an output row, or a block, edge blocks
    included), and no huge value."""
    assert float(weight.abs().max()) < 0.2
    rows, cols = block or (1, weight.shape[-1])
    groups = [tile for band in weight.split(rows, 0) for tile in band.split(cols, 1)]
    group_std = torch.stack([tile.std() for tile in groups])
    assert bool((group_std > 0.006).all() & (group_std < 0.045).all()), group_std


def init_dummy_weights_once(model: torch.nn.Module) -> None:
    """``init_dummy_weights(model, seed=0)``, checking that it draws each parameter once: the core's
    noise and a quantization method's own fill (its ``init_dummy_weights``) never both write one."""
    def raw(p: torch.Tensor) -> torch.Tensor:
        return p.detach().reshape(-1).view(torch.uint8).clone()

    created = {name: raw(p) for name, p in model.named_parameters()}
    at_fill: dict[str, torch.Tensor] = {}
    prefixes = {id(module): prefix for prefix, module in model.named_modules()}
    methods = {id(m.quant_method): m.quant_method for m in model.modules() if getattr(m, "quant_method", None)}
    for method in methods.values():
        def fill_seen(layer, generator, fill=method.init_dummy_weights):
            at_fill.update({f"{prefixes[id(layer)]}.{n}".lstrip("."): raw(p)
                            for n, p in layer.named_parameters(recurse=False)})
            fill(layer, generator)
        method.init_dummy_weights = fill_seen
    init_dummy_weights(model, seed=0)
    assert at_fill, "no quantization method filled its layer"
    for name, p in model.named_parameters():
        if name in at_fill:
            by_core, by_method = not torch.equal(at_fill[name], created[name]), not torch.equal(raw(p), at_fill[name])
            assert not (by_core and by_method), f"{name} was drawn twice, by the core and by its method"


def test_partial_blocks_get_positive_scales_and_the_layer_computes_with_them():
    """A fused layer whose last part and last input block are partial (DeepSeek-V3's 576-row
    ``kv_a_proj_with_mqa``): every block, edge ones included, scaled; the layer's forward is
    ``x W^T`` of the weights dequantized here (activations rounded to e4m3 per 128-wide group)."""
    block = (128, 128)
    method = Fp8LinearMethod({"quant_method": "fp8", "activation_scheme": "dynamic", "weight_block_size": list(block)},
                             "model.layers.0.mlp.gate_up_proj")
    layer = MergedColumnParallelLinear(200, [128, 72], quant_method=method)
    init_dummy_weights_once(layer)
    method.process_weights_after_loading(layer)
    assert layer.weight.dtype == E4M3 and tuple(layer.weight_scale_inv.shape) == (2, 2)
    weight = dequantized(layer.weight, layer.weight_scale_inv, block)
    assert_plausible(weight, block)
    x = torch.randn(3, 200, generator=torch.Generator().manual_seed(1))
    got, want = layer(x), x @ weight.T
    assert float((got - want).norm() / want.norm()) < 0.05


def test_static_experts_get_codes_scales_and_input_scales():
    """Per-tensor experts with static activations (AutoFP8 Mixtral): each expert's gate, up and down
    scaled, the input scales positive and letting normalized activations through."""
    method = Fp8LinearMethod.for_experts({"quant_method": "fp8", "activation_scheme": "static"}, "model.layers.0.mlp.experts")
    experts = ExpertWeights(3, 64, 96, quant_method=method)
    init_dummy_weights_once(experts)
    method.process_weights_after_loading(experts)
    for stem in ("w13", "w2"):
        codes, scale = getattr(experts, f"{stem}_weight"), getattr(experts, f"{stem}_weight_scale")
        weights = [dequantized(codes[e], scale[e], None) for e in range(3)]
        assert_plausible(torch.cat(weights), None)
        input_scale = getattr(experts, f"{stem}_input_scale")
        assert bool((input_scale * 448 > 4).all() & (input_scale * 448 < 64).all()), input_scale


def tiny_config(name: str) -> dict:
    config = json.loads((BENCHMARKS / "configs" / name / "config.json").read_text())
    return {**config, **TINY[name], "num_hidden_layers": 2, "vocab_size": 256, "max_position_embeddings": 256}


def fp8_modules(model: torch.nn.Module) -> dict[str, list[tuple]]:
    """Each FP8 matrix of the engine's model (an expert's w13 or w2 one matrix) by kind, as
    (codes, scale, block, scheme)."""
    found: dict[str, list] = {"linear": [], "experts": []}
    for module in model.modules():
        scheme = getattr(getattr(module, "quant_method", None), "scheme", None)
        if scheme is None:
            continue
        kind, stems = ("experts", ("w13_", "w2_")) if isinstance(module, ExpertWeights) else ("linear", ("",))
        for stem in stems:
            codes = getattr(module, f"{stem}weight")
            scale = getattr(module, f"{stem}weight_scale_inv" if scheme.block else f"{stem}weight_scale")
            mats = zip(codes, scale) if kind == "experts" else [(codes, scale)]
            found[kind] += [(c, s, scheme.block, scheme) for c, s in mats]
    return found


def serve_dummy_weights(folder: Path, config: dict) -> torch.nn.Module:
    """An engine on ``config`` (written to ``folder``) with dummy weights: its log-probabilities of two
    prompts (prompt, output, top 5) are finite; returns its model."""
    (folder / "config.json").write_text(json.dumps(config))
    greedy = {"temperature": 0, "ignore_eos": True, "max_new_tokens": 4}
    with Engine(str(folder), load_format="dummy") as engine:
        results = engine.generate(input_ids=[[5, 17, 200, 42], list(range(30, 60))], sampling_params=greedy,
                                  return_logprob=True, logprob_start_len=0, top_logprobs_num=5)
        model = engine.core.core.runner.model
    for result in results:
        meta = result["meta_info"]
        logprobs = [lp for lp, _, _ in meta["input_token_logprobs"][1:] + meta["output_token_logprobs"]]
        logprobs += [lp for top in meta["output_top_logprobs"] for lp, _, _ in top]
        assert bool(torch.isfinite(torch.tensor(logprobs)).all()), logprobs
    return model


@pytest.mark.parametrize("name", sorted(TINY))
def test_tiny_benchmark_config_serves_dummy_fp8_weights(tmp_path: Path, name: str):
    """The benchmark config's quantization_config on a tiny shape: finite log-probabilities (prompt,
    output, top 5), every linear layer (and Mixtral's experts) in the config's FP8 layout with
    plausible dequantized weights."""
    model = serve_dummy_weights(tmp_path, tiny_config(name))
    expected = LAYOUTS[name]
    # Per layer: qkv, o (and gate_up, down, or each expert's w13 and w2).
    per_layer = {"linear": 2 if "experts" in expected else 4, "experts": 2 * TINY[name].get("num_local_experts", 0)}
    for kind, mats in fp8_modules(model).items():
        assert len(mats) == 2 * per_layer[kind], (kind, len(mats))
        for codes, scale, block, scheme in mats:
            assert codes.dtype == E4M3 and (scheme.weights, scheme.activations) == expected[kind]
            weight = dequantized(codes, scale, block)
            assert_plausible(weight, block)


def benchmark_module():
    spec = importlib.util.spec_from_file_location("gpu_llama8b", BENCHMARKS / "gpu_llama8b.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def test_benchmark_floor_counts_fp8_bytes_and_scales():
    """``gpu_llama8b.py --runs floor`` on the FP8 configs: a byte per e4m3 value plus a float32 scale
    per output row (per-channel; per-tensor ones are expanded to rows at load) or per 128 x 128
    block; the LM head, norms and Mixtral's router bf16; of the experts a step reads the top 2 of 8."""
    bench = benchmark_module()
    configs = {name: AutoConfig.from_pretrained(BENCHMARKS / "configs" / name)
               for name in ("llama-3.1-8b-fp8", "qwen3-8b-fp8-block", "mixtral-8x7b-fp8")}

    c = configs["llama-3.1-8b-fp8"]
    h, kv, inter, layers = c.hidden_size, c.num_key_value_heads * c.head_dim, c.intermediate_size, c.num_hidden_layers
    values, rows = h * (h + 2 * kv) + h * h + 3 * h * inter, 3 * h + 2 * kv + 2 * inter
    bf16 = 2 * (c.vocab_size * h + (2 * layers + 1) * h)
    assert bench.weight_bytes(c) == pytest.approx((layers * (values + 4 * rows) + bf16,) * 2, rel=1e-12)

    c = configs["qwen3-8b-fp8-block"]
    h, inter, layers, hd = c.hidden_size, c.intermediate_size, c.num_hidden_layers, c.head_dim
    q, kv = c.num_attention_heads * hd, c.num_key_value_heads * hd
    values = h * (q + 2 * kv) + q * h + 3 * h * inter
    blocks = (q // 128) * (h // 128) * 2 + 2 * (kv // 128) * (h // 128) + 3 * (inter // 128) * (h // 128)
    bf16 = 2 * (c.vocab_size * h + (2 * layers + 1) * h + 2 * layers * hd)  # q_norm, k_norm
    assert bench.weight_bytes(c) == pytest.approx((layers * (values + 4 * blocks) + bf16,) * 2, rel=1e-12)

    c = configs["mixtral-8x7b-fp8"]
    h, inter, layers = c.hidden_size, c.intermediate_size, c.num_hidden_layers
    kv = c.num_key_value_heads * h // c.num_attention_heads
    experts, top_k = c.num_local_experts, c.num_experts_per_tok
    attention = h * (h + 2 * kv) + h * h + 4 * (2 * h + 2 * kv)
    routed = experts * (3 * h * inter + 4 * (2 * inter + h))
    bf16 = 2 * (c.vocab_size * h + (2 * layers + 1) * h + layers * experts * h)  # head, norms, routers
    want = (layers * (attention + routed * top_k / experts) + bf16, layers * (attention + routed) + bf16)
    assert bench.weight_bytes(c) == pytest.approx(want, rel=1e-12)


def test_benchmark_floor_refuses_fp8_layouts_it_does_not_count():
    bench = benchmark_module()
    config = AutoConfig.from_pretrained(BENCHMARKS / "configs" / "llama-3.1-8b-fp8")
    quant = config.quantization_config
    config.quantization_config = {**quant, "ignore": []}
    with pytest.raises(ValueError, match="quantization_config.ignore"):
        bench.stored_bytes(config)
    group = quant["config_groups"]["group_0"]
    config.quantization_config = {**quant, "config_groups": {"g": {**group, "weights": {**group["weights"],
                                                                                     "strategy": "block"}}}}
    with pytest.raises(ValueError, match="quantization_config.config_groups"):
        bench.stored_bytes(config)

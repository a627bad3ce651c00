"""The fp8 quant plugin on the CPU, through the normal load path (Engine), against transformers
float32 with the same numbers.

Checkpoints are written here by a packer that follows the published compressed-tensors
"float-quantized" layout (llm-compressor's FP8 output), AutoFP8's (e4m3 ``weight``, float32
``weight_scale`` per tensor or per output channel, ``input_scale`` for static activations) or the
block-wise one DeepSeek-V3 publishes (``weight_scale_inv``, one scale per weight block). The
reference is the transformers model holding the dequantized weights; where activations are
quantized, forward pre-hooks quantize-dequantize each linear's input as the FP8 matmul would.
"""

from __future__ import annotations

import re

import pytest
import torch
import transformers
from safetensors.torch import save_file

from model_contract import tiny
from reference import byte_level_tokenizer
from sglang_core.engine import Engine
from sglang_core.layers.parallel import TPGroup
from sglang_plugins.quant.compressed_tensors.method import CompressedTensorsMethod
from sglang_plugins.quant.fp8.scheme import parse_scheme

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # the kernels' tests: compiled on a GPU, interpreted here
E4M3 = torch.float8_e4m3fn
E4M3_MAX = 448.0
PROMPTS = [[5, 17, 99, 42, 7], [200, 3, 3, 150, 77, 12, 64, 31, 9, 250, 18]]
NEW_TOKENS = 8
# Quantized activations: the engine's logprobs differed from the reference's by at most 1e-6 here
# (no activation rounded to a different e4m3 value); not quantizing them moves tokens or logprobs
# by far more than this bound.
ACTIVATION_ATOL = 1e-4
# Every linear layer a Llama decoder layer has, as the checkpoint names them.
LINEAR = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
          "mlp.up_proj", "mlp.down_proj")
# Parts of one fused layer share their input: the engine quantizes it once with the largest scale.
SHARED_INPUT = {"self_attn.k_proj": "self_attn.q_proj", "self_attn.v_proj": "self_attn.q_proj",
                "mlp.up_proj": "mlp.gate_proj"}


def tiny_llama() -> transformers.LlamaForCausalLM:
    config = transformers.LlamaConfig(**tiny(), architectures=["LlamaForCausalLM"])
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.normal_(0, 0.1)
    return model


def linear_names(model) -> list[str]:
    return [f"model.layers.{i}.{leaf}" for i in range(model.config.num_hidden_layers) for leaf in LINEAR]


def to_e4m3(w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return (w / scale).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3)


def fp8_weight(w: torch.Tensor, strategy: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``w`` in e4m3 and its scale: one per output channel ([out, 1]) or for the tensor ([1])."""
    amax = w.abs().amax(dim=1, keepdim=True) if strategy == "channel" else w.abs().amax().reshape(1)
    scale = amax / E4M3_MAX
    return to_e4m3(w, scale), scale


def fp8_block_weight(w: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """``w`` in e4m3 and its ``weight_scale_inv`` [ceil(out/rows), ceil(in/cols)]: each block's
    largest magnitude / 448 (a partial last block scaled by its own elements)."""
    rows, cols = block
    out, inputs = w.shape
    scale = torch.zeros(-(-out // rows), -(-inputs // cols))
    q = torch.zeros(out, inputs, dtype=E4M3)
    for i in range(scale.shape[0]):
        for j in range(scale.shape[1]):
            tile = w[i * rows:(i + 1) * rows, j * cols:(j + 1) * cols]
            scale[i, j] = tile.abs().max() / E4M3_MAX
            q[i * rows:(i + 1) * rows, j * cols:(j + 1) * cols] = to_e4m3(tile, scale[i, j])
    return q, scale


def block_dequantized(q: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """What DeepSeek-V3's ``weight_dequant`` computes: each element times its block's scale."""
    rows, cols = block
    w = q.float()
    for i in range(scale_inv.shape[0]):
        for j in range(scale_inv.shape[1]):
            w[i * rows:(i + 1) * rows, j * cols:(j + 1) * cols] *= scale_inv[i, j]
    return w


def calibrate(model) -> dict[str, float]:
    """Static input scales: each linear's largest input magnitude over a calibration pass / 448;
    k's is made 1.5 times larger so a fused layer's parts disagree (the largest must win)."""
    seen: dict[str, float] = {}
    hooks = [model.get_submodule(name).register_forward_pre_hook(
        lambda _m, args, name=name: seen.__setitem__(name, max(seen.get(name, 0.0), args[0].abs().max().item())))
        for name in linear_names(model)]
    with torch.no_grad():
        model(torch.tensor([list(range(3, 60))]))
    for hook in hooks:
        hook.remove()
    return {name: amax / E4M3_MAX * (1.5 if name.endswith("k_proj") else 1.0) for name, amax in seen.items()}


def pack(model, folder, quantization_config: dict, weights: str, input_scales: dict[str, float] | None = None,
         keep_float: tuple[str, ...] = (), scalar_scales: bool = False, kv_scales: str | None = None,
         quantized_head: bool = False) -> None:
    """Write ``model`` as an FP8 checkpoint and leave the dequantized weights in ``model``.

    ``weights``: "tensor" (``weight_scale`` [1], or [] with ``scalar_scales`` as AutoFP8 writes),
    "channel" ([out, 1]) or "block" (``weight_scale_inv`` per the config's ``weight_block_size``).
    Modules in ``keep_float`` (and lm_head unless ``quantized_head``, embeddings, norms) are written
    as they are. ``kv_scales``: KV-cache scales written as llm-compressor does ("attention":
    ``self_attn.k_scale`` [1]) or AutoFP8 ("projections": ``k_proj.output_scale`` []).
    """
    state = {name: t.clone() for name, t in model.state_dict().items()}
    with torch.no_grad():
        for name in linear_names(model) + (["lm_head"] if quantized_head else []):
            if name in keep_float:
                continue
            w = model.get_submodule(name).weight
            if weights == "block":
                block, scale_name = block_layout(quantization_config)
                q, state[f"{name}.{scale_name}"] = fp8_block_weight(w, block)
                w.copy_(block_dequantized(q, state[f"{name}.{scale_name}"], block))
            else:
                q, scale = fp8_weight(w, weights)
                w.copy_(q.float() * scale)
                state[f"{name}.weight_scale"] = scale.reshape(()) if scalar_scales else scale
            state[f"{name}.weight"] = q
            if input_scales is not None:
                s = torch.tensor([input_scales[name]])
                state[f"{name}.input_scale"] = s.reshape(()) if scalar_scales else s
        for layer in range(model.config.num_hidden_layers) if kv_scales else ():
            for kv in "kv":
                name = (f"self_attn.{kv}_scale" if kv_scales == "attention" else f"self_attn.{kv}_proj.output_scale")
                state[f"model.layers.{layer}.{name}"] = torch.tensor([0.01] if kv_scales == "attention" else 0.01)
    model.config.quantization_config = quantization_config
    model.config.save_pretrained(folder)
    del model.config.quantization_config
    save_file({n: t.contiguous() for n, t in state.items()}, str(folder / "model.safetensors"), metadata={"format": "pt"})
    byte_level_tokenizer().save_pretrained(folder)


def block_layout(quantization_config: dict) -> tuple[tuple[int, int], str]:
    """A block-wise config's block shape and the name of its scales: compressed-tensors' strategy
    block (``block_structure``, ``weight_scale``) or DeepSeek-V3's (``weight_block_size``,
    ``weight_scale_inv``)."""
    if quantization_config["quant_method"] == "compressed-tensors":
        return tuple(quantization_config["config_groups"]["group_0"]["weights"]["block_structure"]), "weight_scale"
    return tuple(quantization_config["weight_block_size"]), "weight_scale_inv"


def compressed_tensors_config(weights: str, activations: dict | None, ignore: list[str]) -> dict:
    """The quantization_config llm-compressor writes for an FP8 scheme."""
    return {"quant_method": "compressed-tensors", "format": "float-quantized", "quantization_status": "compressed",
            "config_groups": {"group_0": {
                "targets": ["Linear"],
                "weights": {"num_bits": 8, "type": "float", "strategy": weights, "symmetric": True,
                            "dynamic": False, "observer": "minmax"},
                "input_activations": activations}},
            "ignore": ignore, "kv_cache_scheme": None}


STATIC = {"num_bits": 8, "type": "float", "strategy": "tensor", "symmetric": True, "dynamic": False}
DYNAMIC = {"num_bits": 8, "type": "float", "strategy": "token", "symmetric": True, "dynamic": True}
BLOCK_CONFIG = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}


def shared_input(name: str) -> str:
    """The module whose input ``name`` shares: the first part of its fused layer, or itself."""
    layer, leaf = re.fullmatch(r"(model\.layers\.\d+)\.(.+)", name).groups()
    return f"{layer}.{SHARED_INPUT.get(leaf, leaf)}"


def quantize_inputs(model, input_scales: dict[str, float] | None, group: int | None = None,
                    keep_float: tuple[str, ...] = (), quantized_head: bool = False) -> None:
    """Hooks quantizing each quantized linear's input (not those of ``keep_float``; lm_head's with
    ``quantized_head``) to e4m3 and back:
    per token (``None``), per token and ``group``-wide slice of features, or by its static scale, the
    largest among the parts of a fused layer."""
    static = None
    if input_scales is not None:
        static = {name: max(s for n, s in input_scales.items() if shared_input(n) == shared_input(name))
                  for name in input_scales}

    def scale_of(name: str, x: torch.Tensor) -> torch.Tensor:
        if static is None:
            return x.abs().amax(dim=-1, keepdim=True).clamp(min=1e-12) / E4M3_MAX
        return torch.tensor(static[name])

    def round_trip(name: str, x: torch.Tensor) -> torch.Tensor:
        if group is None:
            return to_e4m3(x, s := scale_of(name, x)).float() * s
        # A partial last group is scaled by its own features: zero padding leaves its largest magnitude.
        groups = torch.nn.functional.pad(x, (0, -x.shape[-1] % group)).unflatten(-1, (-1, group))
        return (to_e4m3(groups, s := scale_of(name, groups)).float() * s).flatten(-2)[..., :x.shape[-1]]

    names = input_scales or linear_names(model) + (["lm_head"] if quantized_head else [])
    for name in [n for n in names if n not in keep_float]:
        model.get_submodule(name).register_forward_pre_hook(lambda _m, args, name=name: (round_trip(name, args[0]),))


def reference(model, prompt: list[int]) -> tuple[list[int], torch.Tensor]:
    """Greedy tokens (recomputing the whole sequence each step) and the log-probability of every
    token of prompt + output after the first."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(NEW_TOKENS):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
        logits = model(torch.tensor([ids])).logits[0, :-1]
    logprobs = torch.log_softmax(logits, dim=-1).gather(1, torch.tensor(ids[1:])[:, None]).squeeze(1)
    return ids[len(prompt):], logprobs


def served(folder, **settings) -> list[tuple[list[int], torch.Tensor]]:
    with Engine(str(folder), **settings) as engine:
        results = engine.generate(input_ids=PROMPTS, return_logprob=True, logprob_start_len=0,
                                  sampling_params={"temperature": 0, "ignore_eos": True, "max_new_tokens": NEW_TOKENS})
    out = []
    for result in results:
        meta = result["meta_info"]
        got = [lp for lp, _, _ in meta["input_token_logprobs"][1:] + meta["output_token_logprobs"]]
        out.append((result["output_ids"], torch.tensor(got)))
    return out


def assert_matches(model, folder, atol: float, **settings) -> None:
    for prompt, (tokens, logprobs) in zip(PROMPTS, served(folder, **settings)):
        expected_tokens, expected_logprobs = reference(model, prompt)
        assert tokens == expected_tokens, f"prompt of {len(prompt)} tokens"
        torch.testing.assert_close(logprobs, expected_logprobs, atol=atol, rtol=0)


@pytest.mark.parametrize("weights", ["tensor", "channel"])
def test_compressed_tensors_weight_only(tmp_path, weights):
    model = tiny_llama()
    pack(model, tmp_path, compressed_tensors_config(weights, None, ["lm_head"]), weights)
    assert_matches(model, tmp_path, atol=1e-4)


def fp8_config(activations: str, ignored: list[str]) -> dict:
    """The quantization_config AutoFP8 writes."""
    return {"quant_method": "fp8", "activation_scheme": activations, "ignored_layers": ignored}


@pytest.mark.parametrize("layout", ["compressed-tensors", "fp8"])
def test_static_activations(tmp_path, layout):
    """Static input scales; the checkpoints also carry KV-cache scales (``kv_cache_scheme``), which
    load and go unused: the KV cache keeps the model's dtype."""
    model = tiny_llama()
    scales = calibrate(model)
    if layout == "compressed-tensors":
        config = {**compressed_tensors_config("tensor", STATIC, ["lm_head"]), "kv_cache_scheme": dict(STATIC)}
    else:
        config = {**fp8_config("static", ["lm_head"]), "kv_cache_scheme": "static"}
    pack(model, tmp_path, config, "tensor", input_scales=scales, scalar_scales=layout == "fp8",
         kv_scales="attention" if layout == "compressed-tensors" else "projections")
    quantize_inputs(model, scales)
    assert_matches(model, tmp_path, atol=ACTIVATION_ATOL)


@pytest.mark.parametrize("layout", ["compressed-tensors", "fp8"])
def test_dynamic_activations(tmp_path, layout):
    model = tiny_llama()
    weights = "channel" if layout == "compressed-tensors" else "tensor"
    config = (compressed_tensors_config(weights, DYNAMIC, ["lm_head"]) if layout == "compressed-tensors"
              else fp8_config("dynamic", ["lm_head"]))
    pack(model, tmp_path, config, weights, scalar_scales=layout == "fp8")
    quantize_inputs(model, None)
    assert_matches(model, tmp_path, atol=ACTIVATION_ATOL)


def compressed_tensors_block_config(block: tuple[int, int]) -> dict:
    """llm-compressor's FP8_BLOCK scheme on ``block``: block-wise weights, activations per token and
    group of the block's columns."""
    config = compressed_tensors_config("block", {**DYNAMIC, "strategy": "group", "group_size": block[1]}, ["lm_head"])
    config["config_groups"]["group_0"]["weights"]["block_structure"] = list(block)
    return config


@pytest.mark.parametrize("layout, block", [("fp8", (16, 16)), ("fp8", (32, 16)), ("fp8", (16, 24)),
                                           ("compressed-tensors", (16, 24))])
def test_block_wise_weights(tmp_path, layout, block):
    """Block-wise weights (one scale per block; fused q/k/v and gate/up each keep their parts'
    blocks) with activations quantized per token and group of the block's width; 24 columns leave
    every weight a partial last block and every input a partial last group."""
    model = tiny_llama()
    config = (compressed_tensors_block_config(block) if layout == "compressed-tensors" else
              {**BLOCK_CONFIG, "weight_block_size": list(block), "ignored_layers": ["lm_head"]})
    pack(model, tmp_path, config, "block")
    quantize_inputs(model, None, group=block[1])
    assert_matches(model, tmp_path, atol=ACTIVATION_ATOL)


def test_online_quantization_of_a_float_checkpoint(tmp_path):
    """``--quantization fp8`` on a float32 checkpoint: weights quantized per output channel at
    load, activations per token."""
    model = tiny_llama()
    model.save_pretrained(tmp_path)
    byte_level_tokenizer().save_pretrained(tmp_path)
    with torch.no_grad():
        for name in linear_names(model):
            w = model.get_submodule(name).weight
            q, scale = fp8_weight(w, "channel")
            w.copy_(q.float() * scale)
    quantize_inputs(model, None)
    assert_matches(model, tmp_path, atol=ACTIVATION_ATOL, quantization="fp8")


FUSED_QKV = ("model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj", "model.layers.0.self_attn.v_proj")
IGNORE_CASES = {
    # compressed-tensors' ignore: names and re: patterns.
    "compressed-tensors": (compressed_tensors_config("channel", None, ["lm_head", *FUSED_QKV,
                                                                       r"re:.*layers\.1\.mlp\.down_proj$"]),
                           "channel", (*FUSED_QKV, "model.layers.1.mlp.down_proj"), False),
    # transformers' FineGrainedFP8 modules_to_not_convert: a module path covers the modules under it,
    # an entry may be a suffix, and a router's "mlp.gate" must not take gate_proj with it.
    "fine-grained-fp8": ({**BLOCK_CONFIG, "weight_block_size": [16, 16],
                          "modules_to_not_convert": ["lm_head", "model.layers.0.self_attn", "layers.1.mlp.down_proj",
                                                     "model.layers.1.mlp.gate"]},
                         "block", (*FUSED_QKV, "model.layers.0.self_attn.o_proj", "model.layers.1.mlp.down_proj"),
                         False),
    # A list that leaves lm_head out quantizes it (transformers adds its default skips only without one);
    # its 259 vocabulary rows end in a partial block.
    "fine-grained-fp8-head": ({**BLOCK_CONFIG, "weight_block_size": [16, 16],
                               "modules_to_not_convert": ["model.layers.1.mlp.down_proj"]},
                              "block", ("model.layers.1.mlp.down_proj",), True),
}


@pytest.mark.parametrize("case", IGNORE_CASES)
def test_ignored_modules_stay_unquantized(tmp_path, case):
    """Modules the ignore list names are float in the checkpoint and load as plain linear layers;
    lm_head likewise where a list names it."""
    model = tiny_llama()
    config, weights, keep_float, quantized_head = IGNORE_CASES[case]
    pack(model, tmp_path, config, weights, keep_float=keep_float, quantized_head=quantized_head)
    if weights == "block":
        quantize_inputs(model, None, group=16, keep_float=keep_float, quantized_head=quantized_head)
    assert_matches(model, tmp_path, atol=ACTIVATION_ATOL if weights == "block" else 1e-4)


def test_partly_ignored_fused_layer_is_an_error(tmp_path):
    model = tiny_llama()
    pack(model, tmp_path, compressed_tensors_config("channel", None, ["lm_head", "model.layers.0.self_attn.k_proj"]),
         "channel", keep_float=("model.layers.0.self_attn.k_proj",))
    with pytest.raises(ValueError, match="ignore.*model.layers.0.self_attn.k_proj"):
        Engine(str(tmp_path))


def _broken(path: str, value) -> dict:
    """A valid compressed-tensors FP8 config with the entry at ``path`` (dot-separated) replaced."""
    config = compressed_tensors_config("tensor", dict(STATIC), ["lm_head"])
    *parents, leaf = path.split(".")
    node = config
    for key in parents:
        node = node[key]
    node[leaf] = value
    return config


# As DeepSeek-V3 and Qwen3-FP8 ship it.


@pytest.mark.parametrize("config, field", [
    (_broken("format", "pack-quantized"), "format"),
    (_broken("config_groups", {}), "config_groups"),
    (_broken("config_groups.group_0.targets", []), "config_groups group_0 targets"),
    (_broken("config_groups.group_0.weights.type", "int"), "format 'float-quantized' does not store weights type"),
    (_broken("config_groups.group_0.weights.num_bits", 4), "weights type"),
    (_broken("config_groups.group_0.weights.strategy", "group"), "weights strategy"),
    (_broken("config_groups.group_0.weights.strategy", "block"), "weights block_structure"),
    ({**compressed_tensors_block_config((16, 16)), "config_groups": {"group_0": {
        **compressed_tensors_block_config((16, 16))["config_groups"]["group_0"], "input_activations": DYNAMIC}}},
     "input_activations strategy 'token'"),
    (_broken("config_groups.group_0.weights.symmetric", False), "weights symmetric"),
    (_broken("config_groups.group_0.input_activations.strategy", "token"), "input_activations strategy"),
    (_broken("kv_cache_scheme", "static"), "kv_cache_scheme"),
    ({"quant_method": "fp8", "activation_scheme": "static", "kv_cache_scheme": "dynamic"}, "kv_cache_scheme"),
    ({"quant_method": "fp8", "activation_scheme": "per-tensor"}, "activation_scheme"),
    ({**BLOCK_CONFIG, "weight_block_size": [128]}, "weight_block_size"),
    ({**BLOCK_CONFIG, "weight_block_size": [128, 0]}, "weight_block_size"),
    ({**BLOCK_CONFIG, "weight_block_size": [128, True]}, "weight_block_size"),
    ({**BLOCK_CONFIG, "activation_scheme": "static"}, "activation_scheme"),
    ({**BLOCK_CONFIG, "fmt": "e5m2"}, "fmt"),
    ({**BLOCK_CONFIG, "modules_to_not_convert": "lm_head"}, "modules_to_not_convert"),
    ({**BLOCK_CONFIG, "ignored_layers": ["model.layers.(0"]}, "ignored_layers"),
    ({**BLOCK_CONFIG, "modules_to_convert": ["embed_tokens"]}, "modules_to_convert"),
    ({**BLOCK_CONFIG, "expert_dtype": "fp4"}, "expert_dtype"),
    ({**BLOCK_CONFIG, "scale_fmt": "e4m3"}, "scale_fmt"),
])
def test_bad_config_names_the_field(config, field):
    """compressed-tensors configs are read by their plugin, which hands float groups to fp8's."""
    with pytest.raises(ValueError, match=f"quantization_config {field}"):
        if config["quant_method"] == "compressed-tensors":
            CompressedTensorsMethod.for_layer(config, "model.layers.0.mlp.down_proj")
        else:
            parse_scheme(config)


def test_bad_config_fails_the_engine(tmp_path):
    model = tiny_llama()
    pack(model, tmp_path, _broken("config_groups.group_0.weights.strategy", "group"), "tensor")
    with pytest.raises(ValueError, match="quantization_config weights strategy"):
        Engine(str(tmp_path))


ON_GPU = pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(),
                                                                      reason="needs a CUDA GPU")])


@pytest.mark.parametrize("device", ["cpu", ON_GPU])
@pytest.mark.parametrize("activations", ["static", "dynamic"])
def test_fused_layer_with_per_part_scales(activations, device, monkeypatch):
    """A fused q/k/v layer whose parts carry their own per-tensor weight and input scales computes
    the product of the quantized input (one input scale: the parts' largest) and the dequantized
    weights. On a GPU with FP8 matmuls it goes through ``torch._scaled_mm``, whose bfloat16
    output bounds the precision there."""
    from sglang_core.layers.parallel import QKVParallelLinear
    from sglang_plugins.quant.fp8.method import Fp8LinearMethod

    calls = []
    scaled_mm = torch._scaled_mm
    monkeypatch.setattr(torch, "_scaled_mm", lambda *a, **k: calls.append(1) or scaled_mm(*a, **k))
    config = fp8_config(activations, [])
    with torch.device(device):
        layer = QKVParallelLinear(64, 16, 4, 2, quant_method=Fp8LinearMethod(config, "model.layers.0.self_attn.qkv_proj"))
    def load(param, tensor, part):  # as the model's load_weights does
        param.weight_loader(param, tensor.to(device, param.dtype), part)

    torch.manual_seed(0)
    x = torch.randn(7, 64)
    dequantized, input_scale = [], torch.tensor(0.0)
    for part, rows, part_scale in (("q", 64, 0.5), ("k", 32, 2.0), ("v", 32, 1.0)):
        q, scale = fp8_weight(torch.randn(rows, 64) * part_scale, "tensor")
        dequantized.append(q.float() * scale)
        load(layer.weight, q, part)
        load(layer.weight_scale, scale, part)
        if activations == "static":
            part_input_scale = x.abs().max() / E4M3_MAX * part_scale
            input_scale = torch.maximum(input_scale, part_input_scale)
            load(layer.input_scale, part_input_scale.reshape(1), part)
    layer.quant_method.process_weights_after_loading(layer)
    if activations == "dynamic":
        input_scale = x.abs().amax(dim=-1, keepdim=True) / E4M3_MAX
    expected = (to_e4m3(x, input_scale).float() * input_scale) @ torch.cat(dequantized).T
    got = layer(x.to(device)).cpu()
    assert bool(calls) == (device == "cuda"), "the FP8 matmul is used exactly on the GPU"
    rtol = 2e-2 if device == "cuda" else 1e-5
    torch.testing.assert_close(got, expected, rtol=rtol, atol=rtol * expected.abs().max().item())


@pytest.mark.parametrize("weights", ["tensor", "channel"])
def test_one_row_goes_through_the_fp8_gemv(weights, monkeypatch):
    """Batch-1 decode where the Triton kernels run (made to run on CPU here: the interpreter): the
    one-row FP8 GEMV reads a fused gate/up layer's e4m3 weight with one scale per output row
    (per-tensor scales expanded over their part's rows) and rounds the row to e4m3 by its own
    dynamic scale, as the scaled matmul of larger batches does."""
    from sglang_core.layers.parallel import MergedColumnParallelLinear
    from sglang_plugins.quant.fp8 import gemv
    from sglang_plugins.quant.fp8 import method as fp8_method
    from sglang_plugins.quant.fp8.scheme import Fp8Scheme

    monkeypatch.setattr(fp8_method, "use_fused", lambda x: True)
    calls = []
    kernel = gemv.fp8_gemv
    monkeypatch.setattr(gemv, "fp8_gemv", lambda *args: calls.append(1) or kernel(*args))
    method = fp8_method.Fp8LinearMethod(Fp8Scheme(weights, "dynamic"), "model.layers.0.mlp.gate_up_proj")
    layer = MergedColumnParallelLinear(64, [24, 40], quant_method=method).to(DEVICE)
    torch.manual_seed(0)
    dequantized = []
    for part, rows in enumerate((24, 40)):
        q, scale = fp8_weight(torch.randn(rows, 64) * (part + 1), weights)
        dequantized.append(q.float() * scale)
        layer.weight.weight_loader(layer.weight, q, part)
        layer.weight_scale.weight_loader(layer.weight_scale, scale, part)
    method.process_weights_after_loading(layer)
    x = torch.randn(1, 64).bfloat16()
    got = layer(x.to(DEVICE)).cpu()
    assert calls and got.dtype == torch.bfloat16
    x_scale = x.float().abs().amax() / E4M3_MAX
    rounded = to_e4m3(x.float(), x_scale).double() * x_scale.double()
    expected = rounded @ torch.cat(dequantized).double().T
    torch.testing.assert_close(got.double(), expected, atol=2e-2, rtol=1e-2)


def group_round_trip(x: torch.Tensor, group: int) -> torch.Tensor:
    """``x`` quantized to e4m3 and back with one scale per token and ``group``-wide slice."""
    groups = x.reshape(x.shape[0], -1, group)
    scale = groups.abs().amax(dim=-1, keepdim=True) / E4M3_MAX
    return (to_e4m3(groups, scale).float() * scale).reshape(x.shape)


def test_block_wise_tensor_parallel_shards():
    """Each rank of a 2-way tensor-parallel group loads its rows (q/k/v parts each cut by rank) or
    its input columns of the weight and the matching blocks of ``weight_scale_inv``; a row-parallel
    output of 40 rows ends in a partial block (scale_inv has ceil(40/16) rows)."""
    from sglang_core.layers.parallel import QKVParallelLinear, RowParallelLinear
    from sglang_plugins.quant.fp8.method import Fp8LinearMethod

    block, tp = (16, 16), 2
    config = {**BLOCK_CONFIG, "weight_block_size": list(block)}
    torch.manual_seed(0)
    x = group_round_trip(torch.randn(5, 64), block[1])
    parts = {part: fp8_block_weight(torch.randn(rows, 64), block) for part, rows in (("q", 64), ("k", 32), ("v", 32))}
    down_q, down_scale = fp8_block_weight(torch.randn(40, 64), block)
    down = block_dequantized(down_q, down_scale, block)
    row_sum = 0
    for rank in range(tp):
        group = TPGroup(group=None, rank=rank, size=tp)
        qkv = QKVParallelLinear(64, 16, 4, 2, tp=group, quant_method=Fp8LinearMethod(config, "layers.0.self_attn.qkv_proj"))
        row = RowParallelLinear(64, 40, tp=group, quant_method=Fp8LinearMethod(config, "layers.0.self_attn.o_proj"))
        for part, (q, scale) in parts.items():
            qkv.weight.weight_loader(qkv.weight, q, part)
            qkv.weight_scale_inv.weight_loader(qkv.weight_scale_inv, scale, part)
        row.weight.weight_loader(row.weight, down_q)
        row.weight_scale_inv.weight_loader(row.weight_scale_inv, down_scale)
        for layer in (qkv, row):
            layer.quant_method.process_weights_after_loading(layer)
        rank_rows = torch.cat([block_dequantized(q, scale, block).chunk(tp)[rank] for q, scale in parts.values()])
        torch.testing.assert_close(qkv(x), x @ rank_rows.T, rtol=1e-5, atol=1e-5)
        in_cols = slice(rank * 32, (rank + 1) * 32)
        row_sum = row_sum + row.quant_method.apply(row, x[:, in_cols], None)  # what the all-reduce adds up
    torch.testing.assert_close(row_sum, x @ down.T, rtol=1e-5, atol=1e-5)


def test_block_wise_partial_edge_blocks():
    """A weight whose rows and columns end in partial blocks (as DeepSeek-V3's 576-row
    kv_a_proj_with_mqa: 4.5 blocks of 128): 36 x 40 with 16 x 16 blocks has a 3 x 3
    ``weight_scale_inv``, the last row and column of blocks covering the remaining 4 rows and 8
    columns; the input's last group likewise has 8 features."""
    from sglang_core.layers.parallel import ColumnParallelLinear
    from sglang_plugins.quant.fp8.method import Fp8LinearMethod

    block = (16, 16)
    torch.manual_seed(0)
    q, scale = fp8_block_weight(torch.randn(36, 40), block)
    assert scale.shape == (3, 3)
    layer = ColumnParallelLinear(40, 36, quant_method=Fp8LinearMethod(
        {**BLOCK_CONFIG, "weight_block_size": list(block)}, "model.layers.0.self_attn.kv_a_proj_with_mqa"))
    layer.weight.weight_loader(layer.weight, q)
    layer.weight_scale_inv.weight_loader(layer.weight_scale_inv, scale)
    layer.quant_method.process_weights_after_loading(layer)
    x = torch.randn(5, 40) * 0.1  # below 1: padding the last group with anything but zeros would show
    rounded = torch.cat([group_round_trip(x[:, start:start + 16], x[:, start:start + 16].shape[1])
                         for start in range(0, 40, 16)], dim=1)
    torch.testing.assert_close(layer(x), rounded @ block_dequantized(q, scale, block).T, rtol=1e-5, atol=1e-5)


def test_partial_block_scale_loads_only_as_the_last_piece():
    """A part of 36 rows has ceil(36/16) = 3 block-scale rows: placed last (rows 2..4 of a 5-row
    scale, after a part of 32 rows) it loads; placed first, its partial block would hold the next
    part's first rows, and the loader refuses it."""
    from sglang_core.layers.parallel import load_output_shard
    from sglang_core.layers.quant import weight_param

    param = weight_param(torch.zeros(5, 4), lambda *args: None, output_dim=0, input_dim=1, packed_dim=0,
                         packed_factor=16)
    scale = torch.arange(12.0).reshape(3, 4)
    load_output_shard(param, param.data, scale, offset=32, size=36, index=0)
    assert torch.equal(param.data[2:], scale)
    with pytest.raises(ValueError, match="do not split"):
        load_output_shard(param, param.data, scale, offset=0, size=36, index=0)


@pytest.mark.parametrize("make, block, tp, what", [
    # k and v get 16 rows per rank: a 32-row block would straddle two parts.
    ("qkv", (32, 16), 2, "output parts of \\[32, 16, 16\\] rows"),
    # 96 input features split 48 per rank: a rank's input would cut a 32-column block.
    ("row", (16, 32), 2, "48 input features"),
    # gate's partial last block would hold up's first rows.
    ("merged", (16, 16), 1, "output parts of \\[36, 36\\] rows"),
    # 72 rows split 36 per rank: rank 1's rows start inside a block.
    ("column", (16, 16), 2, "output parts of \\[36\\] rows"),
])
def test_block_wise_layer_cutting_a_block_is_an_error(make, block, tp, what):
    from sglang_core.layers.parallel import (ColumnParallelLinear, MergedColumnParallelLinear, QKVParallelLinear,
                                             RowParallelLinear)
    from sglang_plugins.quant.fp8.method import Fp8LinearMethod

    method = Fp8LinearMethod({**BLOCK_CONFIG, "weight_block_size": list(block)}, "layers.0.proj")
    group = TPGroup(group=None, rank=0, size=tp)
    build = {"qkv": lambda: QKVParallelLinear(64, 16, 4, 2, tp=group, quant_method=method),
             "row": lambda: RowParallelLinear(96, 64, tp=group, quant_method=method),
             "merged": lambda: MergedColumnParallelLinear(64, [36, 36], tp=group, quant_method=method),
             "column": lambda: ColumnParallelLinear(64, 72, tp=group, quant_method=method)}
    with pytest.raises(ValueError, match=f"quantization_config weight_block_size.*{what}"):
        build[make]()


def test_unknown_quantization_name_is_an_error(tmp_path):
    tiny_llama().save_pretrained(tmp_path)
    byte_level_tokenizer().save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="quantization 'int3'"):
        Engine(str(tmp_path), quantization="int3")

"""AWQ and GPTQ checkpoints: packed here from random integers by the formats' published packing
rules, served by the engine, and compared with HF transformers float32 holding the dequantised
weights.

The packers below follow the rules as AutoAWQ (``WQLinear_GEMM.from_linear``) and AutoGPTQ /
GPTQModel (``QuantLinear.pack``) publish them; each is checked against hand-computed words and
against an element-by-element unpacking written from the same rules. The engine's side of the
comparison is the plugins' own unpacking, reached only through the normal load path.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from reference import byte_level_tokenizer, hf_greedy
from sglang_core.engine import Engine
from sglang_core.layers.parallel import ColumnParallelLinear, ParallelLMHead, RowParallelLinear, TPGroup
from sglang_plugins.quant.awq import method as awq_method
from sglang_plugins.quant.awq.method import AWQMethod
from sglang_plugins.quant.gptq.method import GPTQMethod

GREEDY = {"temperature": 0, "ignore_eos": True}
AWQ_SLOT_FEATURE = (0, 2, 4, 6, 1, 3, 5, 7)  # AutoAWQ's order_map: slot i of a word holds feature AWQ_SLOT_FEATURE[i]
PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


# ---- packers (the formats' published rules) and an element-wise reference unpacking ----

def to_int32(words: torch.Tensor) -> torch.Tensor:
    """int64 words holding 32 unsigned bits -> the int32 tensors checkpoints store."""
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def word_bits(words: torch.Tensor) -> int:
    """The 32 bits of a (first) int32 word as an unsigned integer."""
    return int(words.reshape(-1)[0]) & 0xFFFFFFFF


def awq_pack(values: torch.Tensor) -> torch.Tensor:
    """AutoAWQ GEMM: ``[rows, cols]`` 4-bit values -> ``[rows, cols/8]``; slot i (bits 4i..) of word
    w holds column ``8w + AWQ_SLOT_FEATURE[i]``."""
    rows, cols = values.shape
    words = torch.zeros(rows, cols // 8, dtype=torch.int64)
    for w in range(cols // 8):
        for slot in range(8):
            words[:, w] |= values[:, 8 * w + AWQ_SLOT_FEATURE[slot]].long() << (4 * slot)
    return to_int32(words)


def gptq_pack(values: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """AutoGPTQ: ``32 / bits`` values to an int32 along ``dim``, value j of a run in bits ``bits*j``."""
    per_word = 32 // bits
    v = values.long().movedim(dim, 0)
    words = torch.zeros(v.shape[0] // per_word, *v.shape[1:], dtype=torch.int64)
    for row in range(words.shape[0]):
        for j in range(per_word):
            words[row] |= v[row * per_word + j] << (bits * j)
    return to_int32(words).movedim(0, dim).contiguous()


def reference_awq_value(words: torch.Tensor, row: int, col: int) -> int:
    word = word_bits(words[row, col // 8])
    return (word >> (4 * AWQ_SLOT_FEATURE.index(col % 8))) & 0xF


def reference_gptq_value(words: torch.Tensor, bits: int, index: tuple[int, int], dim: int) -> int:
    per_word = 32 // bits
    at = list(index)
    at[dim] //= per_word
    word = word_bits(words[tuple(at)])
    return (word >> (bits * (index[dim] % per_word))) & ((1 << bits) - 1)


def test_packers_match_hand_computed_words():
    assert word_bits(awq_pack(torch.arange(8)[None])) == 0x75316420  # columns 0..7 in slots 0,4,1,5,2,6,3,7
    assert word_bits(gptq_pack(torch.arange(1, 9)[:, None], 4, 0)) == 0x87654321
    assert word_bits(gptq_pack(torch.tensor([[1, 2, 3, 4]]), 8, 1)) == 0x04030201
    assert int(gptq_pack(torch.full((8, 1), 15), 4, 0)[0, 0]) == -1  # all bits set: int32 -1


def test_packers_agree_with_elementwise_unpacking():
    gen = torch.Generator().manual_seed(0)
    values = torch.randint(0, 16, (6, 16), generator=gen)
    packed = awq_pack(values)
    assert all(reference_awq_value(packed, r, c) == values[r, c] for r in range(6) for c in range(16))
    for bits, dim in ((4, 0), (4, 1), (8, 0), (8, 1)):
        values = torch.randint(0, 1 << bits, (8, 8), generator=gen)
        packed = gptq_pack(values, bits, dim)
        assert all(reference_gptq_value(packed, bits, (r, c), dim) == values[r, c] for r in range(8) for c in range(8))


def test_awq_layer_is_repacked_into_gptq_words_after_loading(monkeypatch):
    """After loading, an AWQ layer holds its values in GPTQ's published layout (words along the inputs;
    zero points in output order, stored as they are: no v1 offset), in the bytes it loaded, repacked a
    few input features at a time (here 64: a last run of 32), and dequantises to the float64 weight
    of the AWQ checkpoint."""
    monkeypatch.setattr(awq_method, "REPACK_ROWS", 64)
    fmt = {"quant_method": "awq", "bits": 4, "group_size": 32, "zero_point": True, "version": "gemm"}
    inputs, outputs = 96, 24
    quant = Quantized(fmt, inputs, outputs, torch.Generator().manual_seed(5), torch.arange(inputs) // 32)
    layer = ColumnParallelLinear(inputs, outputs, quant_method=AWQMethod(fmt, "model.layers.0.mlp.up_proj"))
    for name, tensor in quant.tensors.items():
        getattr(layer, name).weight_loader(getattr(layer, name), tensor)
    loaded_bytes = {name: p.numel() * p.element_size() for name, p in layer.named_parameters()}
    layer.quant_method.process_weights_after_loading(layer)
    assert {name: p.numel() * p.element_size() for name, p in layer.named_parameters()} == loaded_bytes
    assert layer.qweight.shape == (inputs // 8, outputs) and layer.qzeros.shape == (inputs // 32, outputs // 8)
    assert all(reference_gptq_value(layer.qweight, 4, (k, n), 0) == quant.values[k, n]
               for k in range(inputs) for n in range(outputs))
    assert all(reference_gptq_value(layer.qzeros, 4, (g, n), 1) == quant.zeros[g, n]
               for g in range(inputs // 32) for n in range(outputs))
    groups = torch.arange(inputs) // 32
    expected = (quant.values - quant.zeros[groups]).double() * quant.scales.double()[groups]
    assert torch.equal(layer.quant_method.dequantized_weight(layer).double(), expected.t())  # exact in float16


# ---- quantized projections: integers, their packed tensors, and the float weight they stand for ----

def gptq_format(fmt: dict) -> str:
    """A GPTQ config's format: ``checkpoint_format`` (GPTQModel, older transformers), else ``format``
    (transformers' GPTQConfig), else the original "gptq"."""
    return fmt.get("checkpoint_format") or fmt.get("format") or "gptq"


class Quantized:
    """One projection, ``[in, out]`` integers drawn at random; ``weight`` is the float ``[out, in]``
    weight the format's dequantisation gives, ``tensors`` the checkpoint's packed tensors."""

    def __init__(self, fmt: dict, inputs: int, outputs: int, gen: torch.Generator, g_idx: torch.Tensor):
        bits, group = fmt["bits"], fmt["group_size"]
        groups = 1 if group == -1 else inputs // group
        top = (1 << bits) - 1
        self.values = torch.randint(0, top + 1, (inputs, outputs), generator=gen)
        if fmt.get("sym", False):
            self.zeros = torch.full((groups, outputs), 1 << (bits - 1))
        else:  # the original GPTQ format stores zero - 1, which must not go below 0
            low = 1 if gptq_format(fmt) == "gptq" else 0
            self.zeros = torch.randint(low, top + 1, (groups, outputs), generator=gen)
        # Powers-of-two fractions, exact in float16, sized so that weights are about 0.1.
        self.scales = (torch.randint(1, 8, (groups, outputs), generator=gen) / (2 ** (bits + 4))).half()
        self.g_idx = g_idx
        w = (self.values - self.zeros[g_idx]).float() * self.scales.float()[g_idx]
        self.weight = w.t().contiguous()
        if fmt["quant_method"] == "awq":
            self.tensors = {"qweight": awq_pack(self.values), "qzeros": awq_pack(self.zeros), "scales": self.scales}
        else:
            stored_zeros = self.zeros - (1 if gptq_format(fmt) == "gptq" else 0)
            self.tensors = {"qweight": gptq_pack(self.values, bits, 0), "qzeros": gptq_pack(stored_zeros, bits, 1),
                            "scales": self.scales, "g_idx": g_idx.to(torch.int32)}


def group_index(fmt: dict, inputs: int, gen: torch.Generator) -> torch.Tensor:
    """Each input feature's group: consecutive runs, or with ``desc_act`` the groups GPTQ forms
    over the features in a shuffled (activation) order."""
    group = inputs if fmt["group_size"] == -1 else fmt["group_size"]
    in_order = torch.arange(inputs) // group
    if not fmt.get("desc_act", False):
        return in_order
    g_idx = torch.empty(inputs, dtype=torch.long)
    g_idx[torch.randperm(inputs, generator=gen)] = in_order
    return g_idx


def quantized_model(folder: Path, fmt: dict, seed: int, family: str = "llama", vocab_size: int = 259,
                    hidden_size: int = 128, intermediate_size: int = 256):
    """A tiny Llama (or, ``family="qwen2"``, a Qwen2: biases on q/k/v) saved as a quantized
    checkpoint in ``folder``; returns the HF float32 model that holds the dequantised weights
    (modules matching ``modules_to_not_convert`` stay float; the LM head is packed with GPTQ's
    ``lm_head: true``)."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    config_cls, model_cls = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM)}[family]
    config = config_cls(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
                        num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                        eos_token_id=2, bos_token_id=1, tie_word_embeddings=False)
    config.architectures = [model_cls.__name__]
    torch.manual_seed(seed)
    model = model_cls(config).float().eval()
    gen = torch.Generator().manual_seed(seed)
    skipped = fmt.get("modules_to_not_convert") or []
    # GPTQ (optimum's rule): only modules whose path ends with a modules_in_block_to_quantize name.
    block_modules = sum(fmt.get("modules_in_block_to_quantize") or [], [])
    tensors = {}
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.normal_(0, 0.1)
        for layer_id, layer in enumerate(model.model.layers):
            # q/k/v/gate/up read the same normed hidden state: in a real checkpoint they share g_idx too.
            hidden_groups = group_index(fmt, config.hidden_size, gen)
            for proj in PROJECTIONS:
                name = f"model.layers.{layer_id}.{proj}"
                linear = layer.get_submodule(proj)
                if any(module in name for module in skipped) or (block_modules and
                                                                  not name.endswith(tuple(block_modules))):
                    continue
                out, inputs = linear.weight.shape
                reads_hidden = proj not in ("self_attn.o_proj", "mlp.down_proj")
                g_idx = hidden_groups if reads_hidden else group_index(fmt, inputs, gen)
                quant = Quantized(fmt, inputs, out, gen, g_idx)
                linear.weight.copy_(quant.weight)
                tensors.update({f"{name}.{key}": t for key, t in quant.tensors.items()})
        if fmt.get("lm_head"):
            quant = Quantized(fmt, config.hidden_size, vocab_size, gen, group_index(fmt, config.hidden_size, gen))
            model.lm_head.weight.copy_(quant.weight)
            tensors.update({f"lm_head.{key}": t for key, t in quant.tensors.items()})
    replaced = {f"{name.rsplit('.', 1)[0]}.weight" for name in tensors}  # a quantized module keeps its bias
    tensors.update({n: t.clone() for n, t in model.state_dict().items() if n not in replaced})
    save_file(tensors, str(folder / "model.safetensors"))
    config.save_pretrained(folder)
    config_path = folder / "config.json"
    saved = json.loads(config_path.read_text())
    saved["quantization_config"] = fmt
    config_path.write_text(json.dumps(saved))
    byte_level_tokenizer().save_pretrained(folder)
    return model


def assert_engine_matches_hf(folder: Path, hf) -> None:
    rng = random.Random(0)
    prompts = [[rng.randrange(3, 259) for _ in range(n)] for n in (5, 23, 40)]
    expected = [hf_greedy(hf, p, 12) for p in prompts]
    # float32 on any device: against transformers float32 a bfloat16 run (CUDA's default) may flip a
    # near-tie of the tiny random model; in float32 a mismatch on a GPU is the GPU path's own.
    with Engine(str(folder), dtype="float32") as engine:
        for prompt, exp in zip(prompts, expected):
            out = engine.generate(input_ids=prompt, sampling_params={**GREEDY, "max_new_tokens": 12})
            assert out["output_ids"] == exp


# Widths that are not multiples of 128 (hidden 160, intermediate 96): the formats need only whole groups and words.
ODD_WIDTHS = {"hidden_size": 160, "intermediate_size": 96}
AWQ_CASES = [
    ({"group_size": 32}, ODD_WIDTHS),
    # AutoAWQ's rule, substrings of the checkpoint's module paths: whole layers, and each part of
    # a fused q/k/v and gate/up (whose fused names, qkv_proj and gate_up_proj, contain none of them).
    ({"group_size": 64, "modules_to_not_convert": ["layers.1.mlp", "self_attn.q_proj", "self_attn.k_proj",
                                                   "self_attn.v_proj", "layers.0.mlp.gate_proj", "0.mlp.up_proj"]}, {}),
    ({"group_size": 128}, {}),
    ({"group_size": -1}, {}),  # one group of all input features
]


@pytest.mark.parametrize("case, widths", AWQ_CASES, ids=["g32-odd-widths", "g64-not-convert", "g128", "channel"])
def test_awq_checkpoint_matches_hf(tmp_path, case, widths):
    fmt = {"quant_method": "awq", "bits": 4, "zero_point": True, "version": "gemm", **case}
    hf = quantized_model(tmp_path, fmt, seed=1, **widths)
    assert_engine_matches_hf(tmp_path, hf)


GPTQ_CASES = [
    ({"bits": 4, "group_size": 32, "sym": True, "desc_act": False, "checkpoint_format": "gptq"}, {}),
    ({"bits": 4, "group_size": 64, "sym": False, "desc_act": True, "checkpoint_format": "gptq"}, {}),
    ({"bits": 4, "group_size": -1, "sym": False, "desc_act": False, "checkpoint_format": "gptq"}, {}),
    ({"bits": 8, "group_size": 32, "sym": True, "desc_act": True, "checkpoint_format": "gptq"}, {}),
    ({"bits": 8, "group_size": 128, "sym": False, "desc_act": False, "checkpoint_format": "gptq_v2"}, {}),
    # transformers' GPTQConfig names the format "format".
    ({"bits": 4, "group_size": 32, "sym": False, "desc_act": False, "format": "gptq_v2"}, {}),
    ({"bits": 8, "group_size": 32, "sym": False, "desc_act": True, "checkpoint_format": "gptq"}, ODD_WIDTHS),
    # Only q/k/v and down_proj packed (a fused layer's parts listed apart); o_proj, gate/up float.
    ({"bits": 4, "group_size": 32, "sym": False, "desc_act": True, "checkpoint_format": "gptq",
      "modules_in_block_to_quantize": [["self_attn.k_proj", "self_attn.v_proj"], ["self_attn.q_proj"],
                                       ["mlp.down_proj"]]}, {}),
]


@pytest.mark.parametrize("case, widths", GPTQ_CASES, ids=[
    "4bit-sym-g32", "4bit-asym-actorder", "4bit-asym-channel", "8bit-sym-actorder", "8bit-asym-v2-g128",
    "4bit-asym-v2-format", "8bit-asym-actorder-odd-widths", "some-modules"])
def test_gptq_checkpoint_matches_hf(tmp_path, case, widths):
    fmt = {"quant_method": "gptq", **case}
    hf = quantized_model(tmp_path, fmt, seed=2, **widths)
    assert_engine_matches_hf(tmp_path, hf)


def test_gptq_quantized_lm_head_matches_hf(tmp_path):
    """GPTQModel's ``lm_head: true``: the LM head packed like the linear layers (act-order, its own
    g_idx), over a vocabulary of whole packed words (264 rows; ids past the tokenizer's 259 are
    padding rows the model may still score)."""
    fmt = {"quant_method": "gptq", **GPTQ_CASES[1][0], "lm_head": True}
    hf = quantized_model(tmp_path, fmt, seed=3, vocab_size=264)
    assert_engine_matches_hf(tmp_path, hf)


@pytest.mark.parametrize("fmt", [{**GPTQ_CASES[1][0], "quant_method": "gptq"},
                                 {"quant_method": "awq", "bits": 4, "group_size": 64, "zero_point": True}],
                         ids=["gptq", "awq"])
def test_quantized_projections_with_biases_match_hf(tmp_path, fmt):
    """Qwen2's q/k/v carry a float bias beside their packed weight."""
    hf = quantized_model(tmp_path, fmt, seed=6, family="qwen2")
    assert hf.model.layers[0].self_attn.q_proj.bias is not None
    assert_engine_matches_hf(tmp_path, hf)


# ---- tensor parallelism: each rank dequantises its own slice of the weight ----

TP_CASES = [
    ({"quant_method": "awq", "bits": 4, "group_size": 32, "zero_point": True}, "awq"),
    ({"quant_method": "awq", "bits": 4, "group_size": -1, "zero_point": True}, "awq-channel"),
    ({"quant_method": "gptq", "bits": 4, "group_size": 32, "sym": False, "desc_act": False,
      "checkpoint_format": "gptq"}, "gptq-4bit"),
    ({"quant_method": "gptq", "bits": 4, "group_size": 32, "sym": False, "desc_act": True,
      "checkpoint_format": "gptq"}, "gptq-4bit-actorder"),
    ({"quant_method": "gptq", "bits": 8, "group_size": -1, "sym": True, "desc_act": False,
      "checkpoint_format": "gptq_v2"}, "gptq-8bit-channel"),
]


@pytest.mark.parametrize("fmt", [c[0] for c in TP_CASES], ids=[c[1] for c in TP_CASES])
def test_tp2_ranks_dequantise_their_slices(fmt):
    inputs, outputs, tp = 128, 64, 2
    method = AWQMethod if fmt["quant_method"] == "awq" else GPTQMethod
    gen = torch.Generator().manual_seed(3)
    quant = Quantized(fmt, inputs, outputs, gen, group_index(fmt, inputs, gen))
    x = torch.randn(3, inputs, generator=gen)
    row_sum = 0
    for rank in range(tp):
        tp_group = TPGroup(group=None, rank=rank, size=tp)
        row = RowParallelLinear(inputs, outputs, tp=tp_group, quant_method=method(fmt, "layers.0.mlp.down_proj"))
        column = ColumnParallelLinear(inputs, outputs, tp=tp_group, quant_method=method(fmt, "layers.0.mlp.up_proj"))
        # An LM head (GPTQ's lm_head: true) split by vocabulary rows, which run along its tensors' dim 1.
        heads = ([ParallelLMHead(outputs, inputs, tp=tp_group, quant_method=method(fmt, "lm_head"))]
                 if method is GPTQMethod else [])
        for layer in (row, column, *heads):
            for name, tensor in quant.tensors.items():
                param = getattr(layer, name)
                param.weight_loader(param, tensor)
            layer.quant_method.process_weights_after_loading(layer)
        in_rows = slice(rank * inputs // tp, (rank + 1) * inputs // tp)
        out_cols = slice(rank * outputs // tp, (rank + 1) * outputs // tp)
        assert torch.equal(row.quant_method.dequantized_weight(row).float(), quant.weight[:, in_rows])
        assert torch.equal(column.quant_method.dequantized_weight(column).float(), quant.weight[out_cols])
        for head in heads:
            assert torch.equal(head.quant_method.dequantized_weight(head).float(), quant.weight[out_cols])
        row_sum = row_sum + row.quant_method.apply(row, x[:, in_rows], None)  # what the all-reduce adds up
    assert torch.allclose(row_sum, x @ quant.weight.t(), atol=1e-5)


# ---- bad configurations ----

AWQ_OK = {"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": True, "version": "gemm"}
GPTQ_OK = {"quant_method": "gptq", "bits": 4, "group_size": 128, "sym": True, "desc_act": False,
           "checkpoint_format": "gptq"}


@pytest.mark.parametrize("method,base,change,field", [
    (AWQMethod, AWQ_OK, {"bits": 8}, "bits"),
    (AWQMethod, AWQ_OK, {"group_size": 0}, "group_size"),
    (AWQMethod, AWQ_OK, {"zero_point": False}, "zero_point"),
    (AWQMethod, AWQ_OK, {"version": "gemv"}, "version"),
    (AWQMethod, {**AWQ_OK, "version": None}, {"format": "gemv_fast"}, "format"),
    (AWQMethod, AWQ_OK, {"modules_to_not_convert": "lm_head"}, "modules_to_not_convert"),
    (GPTQMethod, GPTQ_OK, {"bits": 3}, "bits"),
    (GPTQMethod, GPTQ_OK, {"group_size": -2}, "group_size"),
    (GPTQMethod, GPTQ_OK, {"checkpoint_format": "marlin"}, "checkpoint_format"),
    (GPTQMethod, {**GPTQ_OK, "checkpoint_format": None}, {"format": "marlin"}, "format"),
    (GPTQMethod, GPTQ_OK, {"pack_dtype": "int16"}, "pack_dtype"),
    (GPTQMethod, GPTQ_OK, {"modules_in_block_to_quantize": ["self_attn.q_proj"]}, "modules_in_block_to_quantize"),
    (GPTQMethod, GPTQ_OK, {"desc_act": "yes"}, "desc_act"),
    (GPTQMethod, GPTQ_OK, {"sym": "no"}, "sym"),
    (GPTQMethod, GPTQ_OK, {"lm_head": "yes"}, "lm_head"),
    (GPTQMethod, GPTQ_OK, {"is_marlin_format": True}, "is_marlin_format"),
    (GPTQMethod, GPTQ_OK, {"dynamic": {r"-:.*down_proj": {}}}, "dynamic"),
])
def test_bad_config_names_the_field(method, base, change, field):
    with pytest.raises(ValueError, match=field):
        method({**base, **change}, "model.layers.0.mlp.down_proj")


@pytest.mark.parametrize("method,base", [(AWQMethod, AWQ_OK), (GPTQMethod, GPTQ_OK)])
def test_group_size_not_dividing_the_inputs_names_the_field(method, base):
    with pytest.raises(ValueError, match="group_size"):
        ColumnParallelLinear(96, 64, quant_method=method(base, "model.layers.0.mlp.up_proj"))


def change_quant_config(folder: Path, **changes) -> None:
    config_path = folder / "config.json"
    config = json.loads(config_path.read_text())
    config["quantization_config"].update(changes)
    config_path.write_text(json.dumps(config))


def test_bad_config_in_a_checkpoint_stops_the_engine(tmp_path):
    quantized_model(tmp_path, {**AWQ_OK, "group_size": 32}, seed=4)
    change_quant_config(tmp_path, version="gemv")
    with pytest.raises(ValueError, match="quantization_config.version"):
        Engine(str(tmp_path))


def test_gptq_act_order_g_idx_under_a_config_without_desc_act_is_an_error(tmp_path):
    """Groups looked up by position would silently compute a wrong weight from a shuffled g_idx."""
    quantized_model(tmp_path, {**GPTQ_OK, "group_size": 32, "desc_act": True}, seed=5)
    change_quant_config(tmp_path, desc_act=False)
    with pytest.raises(ValueError, match="desc_act"):
        Engine(str(tmp_path))


def test_awq_not_converting_only_part_of_a_fused_layer_is_an_error(tmp_path):
    """"gate" is a substring of gate_proj but not of up_proj: their fused layer cannot be half float."""
    quantized_model(tmp_path, {**AWQ_OK, "group_size": 32, "modules_to_not_convert": ["gate"]}, seed=4)
    with pytest.raises(ValueError, match="modules_to_not_convert.*gate_up_proj.*layers.0.mlp.gate_proj"):
        Engine(str(tmp_path))


def test_awq_reads_autoawq_field_names():
    """AutoAWQ's own quant_config names (``w_bit``, ``q_group_size``) mean what ``bits``/``group_size`` do."""
    config = {"quant_method": "awq", "w_bit": 4, "q_group_size": 64, "zero_point": True, "version": "GEMM"}
    layer = ColumnParallelLinear(128, 64, quant_method=AWQMethod(config, "layers.0.mlp.up_proj"))
    assert layer.scales.shape == (2, 64) and layer.qweight.shape == (128, 8)

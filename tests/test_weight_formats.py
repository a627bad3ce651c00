"""Weight formats as plugins (hook ``register_weight_formats``) and reading model configs.

``--load-format auto`` picks the registered format that claims the model path (the higher
priority first), a format's name picks it, and a third-party format plugin loads a model the
engine then runs token for token like Hugging Face. ``load_config`` reads config.json files of
vision-language models (the language model's config nested as ``text_config``) and of custom-code
architectures (``auto_map``, a ``model_type`` transformers does not know) without running any
code the folder ships.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open

from reference import hf_causal_lm, hf_greedy
from sglang_core.plugins import PluginManager, Registry
from sglang_core.weights.default_model import default_model_path
from sglang_core.weights.loader import language_config, load_config, resolve_model_source
from test_plugins import fake_distribution

NPZ_FORMAT = """
import numpy as np
import torch

from sglang_core.hookspecs import hookimpl
from sglang_core.weights.format import WeightFormat


class NpzFormat(WeightFormat):
    def claims(self, path):
        return path.is_dir() and (path / "weights.npz").is_file()

    def iter_weights(self, path):
        with np.load(path / "weights.npz", allow_pickle=False) as archive:
            for name in archive.files:
                yield name, torch.from_numpy(archive[name])


@hookimpl
def register_weight_formats(register):
    register("npz", NpzFormat, priority=10)
"""


@pytest.fixture(scope="module")
def formats():
    return PluginManager().registry("weight_formats")


def test_builtin_formats_register_through_entry_points():
    manager = PluginManager()
    infos = {info.name: info for info in manager.infos}
    assert infos["safetensors"].registered == {"weight_formats": ["safetensors"]}
    assert infos["gguf"].registered == {"weight_formats": ["gguf", "gguf_quantized"]}
    assert infos["gguf_quant"].registered == {"quant_methods": ["gguf"]}
    assert infos["safetensors"].distribution == infos["gguf"].distribution == "sglang-core"


def test_auto_picks_the_format_that_claims_the_path(formats, tiny_llama, tmp_path):
    default = resolve_model_source(None, "auto", formats)
    assert default.load_format == "gguf" and default.folder == default_model_path()
    assert default.weights.suffix == ".gguf"
    folder = resolve_model_source(str(default.folder), "auto", formats)  # the written folder links its GGUF
    assert (folder.load_format, folder.folder) == ("gguf", default.folder)
    hf = resolve_model_source(str(tiny_llama), "auto", formats)
    assert (hf.load_format, hf.folder, hf.weights) == ("safetensors", tiny_llama, tiny_llama)

    both = tmp_path / "both"
    shutil.copytree(tiny_llama, both)
    (both / "extra.gguf").symlink_to(default.weights)
    assert resolve_model_source(str(both), "auto", formats).load_format == "safetensors"  # priority 100 > 50
    assert resolve_model_source(str(both), "gguf", formats).load_format == "gguf"  # named: that format


def test_load_format_names_and_errors(formats, tiny_llama, tmp_path):
    with pytest.raises(ValueError, match=r"^load_format: 'npy' is not one of auto, dummy, ") as error:
        resolve_model_source(str(tiny_llama), "npy", formats)
    assert {"gguf", "safetensors"} <= set(str(error.value).split(", "))
    config_only = tmp_path / "config_only"
    config_only.mkdir()
    shutil.copy(tiny_llama / "config.json", config_only)
    dummy = resolve_model_source(str(config_only), "dummy", formats)
    assert (dummy.load_format, dummy.folder, dummy.reader) == ("dummy", config_only, None)
    with pytest.raises(ValueError, match="no weights a registered format reads.*--load-format dummy"):
        resolve_model_source(str(config_only), "auto", formats)
    with pytest.raises(ValueError, match="no \\*.safetensors files"):
        list(resolve_model_source(str(config_only), "safetensors", formats).read_weights())
    text = tmp_path / "weights.txt"
    text.write_text("not a checkpoint")
    with pytest.raises(ValueError, match="is a file no registered weight format reads"):
        resolve_model_source(str(text), "auto", formats)
    # --plugins without a weight format: the error says what to add.
    with pytest.raises(ValueError, match=r"registered: none; name one in --plugins \(safetensors, gguf\)"):
        resolve_model_source(str(tiny_llama), "auto", Registry("weight_formats"))


def test_third_party_format_plugin_loads_a_model(tmp_path, monkeypatch, tiny_llama):
    """A plugin's format (numpy .npz, no pickle) reads tiny Llama's weights; greedy tokens equal HF's."""
    from sglang_core.engine import Engine

    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    fake_distribution(tmp_path / "site", "npz-plugin", {"npz": NPZ_FORMAT})
    folder = tmp_path / "npz_model"
    folder.mkdir()
    for file in tiny_llama.iterdir():
        if file.suffix != ".safetensors":
            shutil.copy(file, folder)
    with safe_open(str(tiny_llama / "model.safetensors"), framework="np") as f:
        np.savez(folder / "weights.npz", **{name: f.get_tensor(name) for name in f.keys()})

    prompt = [5, 17, 99, 3, 42]
    expected = hf_greedy(hf_causal_lm(tiny_llama), prompt, 12)
    params = {"temperature": 0, "max_new_tokens": 12, "ignore_eos": True}
    for load_format in ("auto", "npz"):
        with Engine(str(folder), plugins=["llama", "torch_native", "safetensors", "npz"], load_format=load_format) as engine:
            assert engine.generate(input_ids=prompt, sampling_params=params)["output_ids"] == expected


# ---- load_config ----

LLAMA_TEXT = {"model_type": "llama", "vocab_size": 321, "hidden_size": 64, "intermediate_size": 128,
              "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
              "max_position_embeddings": 777}


def write_config(folder: Path, config: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_vision_language_config_gives_its_text_config(tmp_path):
    llava = write_config(tmp_path / "llava", {
        "architectures": ["LlavaForConditionalGeneration"], "model_type": "llava", "image_token_index": 32000,
        "text_config": LLAMA_TEXT,
        "vision_config": {"model_type": "clip_vision_model", "hidden_size": 32, "num_hidden_layers": 1,
                          "num_attention_heads": 2, "intermediate_size": 64, "image_size": 28, "patch_size": 14},
    })
    config = load_config(llava)
    assert config.architectures == ["LlavaForConditionalGeneration"]
    text = language_config(config)
    assert (text.vocab_size, text.max_position_embeddings, text.num_key_value_heads) == (321, 777, 2)
    assert text.model_type == "llama"
    plain = load_config(write_config(tmp_path / "plain", {**LLAMA_TEXT, "architectures": ["LlamaForCausalLM"]}))
    assert language_config(plain) is plain


def test_custom_code_config_loads_without_running_its_code(tmp_path):
    """InternLM2-like: auto_map to code shipped in the folder, a model_type transformers does not know."""
    marker = tmp_path / "code_ran"
    folder = write_config(tmp_path / "internlm2", {
        "architectures": ["InternLM2ForCausalLM"], "model_type": "internlm2",
        "auto_map": {"AutoConfig": "configuration_internlm2.InternLM2Config",
                     "AutoModelForCausalLM": "modeling_internlm2.InternLM2ForCausalLM"},
        "vocab_size": 92544, "hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2,
        "num_hidden_layers": 2, "intermediate_size": 128, "max_position_embeddings": 4096, "bias": False,
        "rope_theta": 1000000, "rms_norm_eps": 1e-5,
    })
    (folder / "configuration_internlm2.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    config = load_config(folder)
    assert not marker.exists()
    assert config.architectures == ["InternLM2ForCausalLM"] and config.model_type == "internlm2"
    assert (config.vocab_size, config.num_key_value_heads, config.bias, config.rope_theta) == (92544, 2, False, 1000000)
    assert language_config(config) is config


def test_custom_code_tokenizer_loads_without_running_or_asking(tmp_path, capfd):
    """A tokenizer_config.json naming the checkpoint's own tokenizer code (InternLM2 ships one):
    the tokenizer loads from tokenizer.json with transformers' generic class, the shipped code
    never runs and nothing asks on the terminal whether to run it."""
    from reference import byte_level_tokenizer
    from sglang_core.tokenizer import load_tokenizer

    marker = tmp_path / "code_ran"
    reference = byte_level_tokenizer()
    reference.save_pretrained(tmp_path)
    write_config(tmp_path, {"architectures": ["InternLM2ForCausalLM"], "model_type": "internlm2",
                            "auto_map": {"AutoConfig": "configuration_internlm2.InternLM2Config"}, "vocab_size": 259})
    settings = json.loads((tmp_path / "tokenizer_config.json").read_text())
    settings.update(tokenizer_class="InternLM2Tokenizer", auto_map={"AutoTokenizer": [
        "tokenization_internlm2.InternLM2Tokenizer", "tokenization_internlm2_fast.InternLM2TokenizerFast"]})
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(settings))
    for module in ("configuration_internlm2", "tokenization_internlm2", "tokenization_internlm2_fast"):
        (tmp_path / f"{module}.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    tokenizer = load_tokenizer(tmp_path)
    text = "custom code, ünïcode"
    assert tokenizer.encode(text) == reference.encode(text)
    assert not marker.exists()
    out, err = capfd.readouterr()
    assert "run the custom code" not in out + err


def test_unknown_vision_language_config_nests_its_text_config(tmp_path):
    folder = write_config(tmp_path / "custom_vl", {
        "architectures": ["CustomVLForCausalLM"], "model_type": "custom_vl", "auto_map": {"AutoConfig": "x.Y"},
        "text_config": {**LLAMA_TEXT, "model_type": "custom_text"}, "vision_config": {"hidden_size": 16},
        "quantization_config": {"quant_method": "awq", "bits": 4},
    })
    config = load_config(folder)
    text = language_config(config)
    assert text is config.text_config and (text.vocab_size, text.max_position_embeddings) == (321, 777)
    assert config.vision_config.hidden_size == 16
    assert config.quantization_config == {"quant_method": "awq", "bits": 4}  # stays the dict quant plugins read


def test_unreadable_config_is_a_value_error(tmp_path):
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="cannot read the model config"):
        load_config(tmp_path)


def test_engine_reads_vocab_and_context_from_the_language_config(tmp_path, tiny_llama):
    """A config transformers has no class for, holding a Llama architecture: the runner builds and
    sizes the model from it (context length from its max_position_embeddings)."""
    from sglang_core.engine import Engine

    raw = json.loads((tiny_llama / "config.json").read_text())
    folder = tmp_path / "renamed"
    shutil.copytree(tiny_llama, folder)
    write_config(folder, {**raw, "model_type": "my_llama", "auto_map": {"AutoConfig": "x.Y"}})
    with Engine(str(folder)) as engine:
        assert (engine.info.vocab_size, engine.info.context_len) == (raw["vocab_size"], raw["max_position_embeddings"])
        expected = hf_greedy(hf_causal_lm(tiny_llama), [5, 6, 7], 6)
        out = engine.generate(input_ids=[5, 6, 7], sampling_params={"temperature": 0, "max_new_tokens": 6,
                                                                     "ignore_eos": True})
        assert out["output_ids"] == expected

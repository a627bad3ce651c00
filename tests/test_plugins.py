"""Plugin discovery, selection, failure isolation and duplicate detection.

Fake third-party distributions are written as ``*.dist-info`` folders on ``sys.path``, which is
exactly what ``importlib.metadata`` reads for an installed package.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from sglang_core.plugins import PluginError, PluginManager

BUILTINS = {"llama", "torch_native"}


def fake_distribution(root: Path, dist: str, plugins: dict[str, str]) -> Path:
    """Install (on a sys.path folder) a distribution whose plugin modules have the given source."""
    info = root / f"{dist.replace('-', '_')}-0.3.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.3\n")
    lines = ["[sglang_core.plugins]"]
    for name, source in plugins.items():
        module = f"{dist.replace('-', '_')}_{name}"
        (root / f"{module}.py").write_text(textwrap.dedent(source))
        lines.append(f"{name} = {module}")
    (info / "entry_points.txt").write_text("\n".join(lines) + "\n")
    return root


BROKEN = "raise ImportError('this plugin is broken on purpose')\n"
DUPLICATE = """
from sglang_core.hookspecs import hookimpl

@hookimpl
def register_models(register):
    register("LlamaForCausalLM", "somewhere:Else")
"""
BAN_TOKEN = """
from sglang_core.hookspecs import hookimpl
from sglang_core.sampling.logits_processor import LogitsProcessor


class BanToken(LogitsProcessor):
    def wants(self, params):
        return bool(params.custom_params and "ban" in params.custom_params)

    def __call__(self, logits, batch, rows):
        for row in batch.host_rows(self):
            logits[row, batch.reqs[row].sampling_params.custom_params["ban"]] = float("-inf")


@hookimpl
def register_logits_processors(register):
    register("ban_token", BanToken)
"""
MISSPELLED = """
from sglang_core.hookspecs import hookimpl

@hookimpl
def register_modelz(register):
    pass
"""

PICKY_BACKEND = """
from sglang_core.hookspecs import hookimpl
from sglang_core.layers.attention import UnsupportedSpecError
from sglang_plugins.attention.torch_native.backend import TorchNativeBackend


class Picky(TorchNativeBackend):
    def __init__(self, spec, kv_pool):
        if spec.head_dim != 4096:
            raise UnsupportedSpecError(f"no kernels for head size {spec.head_dim}")
        super().__init__(spec, kv_pool)


@hookimpl
def register_attention_backends(register):
    register("picky", Picky, priority=1000)
"""


@pytest.fixture
def site(tmp_path, monkeypatch) -> Path:
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def test_builtins_register_through_entry_points():
    manager = PluginManager()
    infos = {i.name: i for i in manager.infos}
    assert BUILTINS <= set(infos)
    assert infos["llama"].distribution == "sglang-core"
    assert infos["llama"].registered == {"models": ["LlamaForCausalLM", "MistralForCausalLM"]}
    assert infos["torch_native"].registered == {"attention_backends": ["torch_native"]}
    assert set(manager.registry("logits_processors").names()) >= {
        "repetition_penalty", "frequency_presence_penalty", "logit_bias", "min_new_tokens"}


def test_selection_loads_exactly_those(site):
    fake_distribution(site, "extra-plugin", {"extra": DUPLICATE})
    manager = PluginManager("llama, torch_native")
    assert set(manager.loaded_names()) == BUILTINS
    assert "extra" not in {i.name for i in manager.infos}


def test_missing_selected_plugin_lists_installed():
    with pytest.raises(PluginError) as err:
        PluginManager(["llama", "no_such_plugin"])
    assert "no_such_plugin" in str(err.value) and "torch_native" in str(err.value)


def test_broken_plugin_is_reported_not_fatal(site):
    fake_distribution(site, "broken-plugin", {"broken": BROKEN})
    manager = PluginManager()
    infos = {i.name: i for i in manager.infos}
    assert not infos["broken"].loaded and "broken on purpose" in infos["broken"].error
    assert BUILTINS <= set(manager.loaded_names())
    assert "LlamaForCausalLM" in manager.registry("models")
    with pytest.raises(PluginError, match="broken on purpose"):
        PluginManager(["llama", "broken"])


def test_duplicate_registration_names_both_plugins(site):
    fake_distribution(site, "dup-plugin", {"dup": DUPLICATE})
    with pytest.raises(PluginError) as err:
        PluginManager()
    message = str(err.value)
    assert "LlamaForCausalLM" in message and "'llama'" in message and "'dup'" in message


def test_misspelled_hook_is_an_error(site):
    fake_distribution(site, "typo-plugin", {"typo": MISSPELLED})
    with pytest.raises(Exception, match="register_modelz"):
        PluginManager(["typo"])


def test_environment_variable_selects(site, monkeypatch, tiny_llama):
    from sglang_core.config import EngineSettings

    monkeypatch.setenv("SGLANG_CORE_PLUGINS", "llama,torch_native")
    assert EngineSettings().plugins == ["llama", "torch_native"]


def test_plugin_logits_processor_runs_in_sampling(site, tiny_llama):
    """A third-party logits processor is called by the sampler like the core's own."""
    from sglang_core.engine import Engine

    fake_distribution(site, "ban-plugin", {"ban": BAN_TOKEN})
    with Engine(str(tiny_llama), plugins=["llama", "torch_native", "safetensors", "ban"]) as engine:
        prompt = [5, 6, 7, 8, 9]
        params = {"temperature": 0, "max_new_tokens": 8, "ignore_eos": True}
        plain = engine.generate(input_ids=prompt, sampling_params=params)["output_ids"]
        banned = plain[0]
        out = engine.generate(input_ids=prompt, sampling_params={**params, "custom_params": {"ban": banned}})
        assert banned not in out["output_ids"]
        assert out["output_ids"][0] != plain[0]


def test_cli_lists_plugins_and_errors(site):
    fake_distribution(site, "broken-plugin", {"broken": BROKEN})
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), *sys.path])}
    out = subprocess.run([sys.executable, "-m", "sglang_core.cli", "plugins", "--json"], capture_output=True,
                         text=True, env=env, check=True)
    rows = {r["name"]: r for r in json.loads(out.stdout)}
    assert rows["llama"]["registered"] == {"models": ["LlamaForCausalLM", "MistralForCausalLM"]}
    assert rows["llama"]["version"] not in ("", "?")
    # Every quantization scheme, by the name a checkpoint's quant_method (or --quantization) gives.
    schemes = {scheme for row in rows.values() for scheme in row["registered"].get("quant_methods", [])}
    assert schemes == {"fp8", "awq", "gptq", "gguf", "compressed-tensors"}
    assert rows["broken"]["loaded"] is False and "broken on purpose" in rows["broken"]["error"]
    text = subprocess.run([sys.executable, "-m", "sglang_core.cli", "plugins"], capture_output=True, text=True,
                          env=env, check=True).stdout
    assert "torch_native" in text and "FAILED" in text
    bad = subprocess.run([sys.executable, "-m", "sglang_core.cli", "plugins", "--plugins", "nope"],
                         capture_output=True, text=True, env=env)
    assert bad.returncode == 2 and "nope" in bad.stderr and "llama" in bad.stderr


def test_auto_attention_skips_a_backend_that_refuses_the_model(site, tiny_llama):
    """The highest-priority backend refuses this head size: auto takes the next one; naming it
    explicitly is an error that says why."""
    from sglang_core.engine import Engine

    fake_distribution(site, "picky-plugin", {"picky": PICKY_BACKEND})
    plugins = ["llama", "torch_native", "safetensors", "picky"]
    with Engine(str(tiny_llama), plugins=plugins) as engine:
        assert engine.info.attention_backend == "torch_native"
        assert engine.generate(input_ids=[5, 6, 7], sampling_params={"max_new_tokens": 2})["meta_info"]["completion_tokens"] == 2
    with pytest.raises(ValueError, match="no kernels for head size"):
        Engine(str(tiny_llama), plugins=plugins, attention_backend="picky")

"""Shared fixtures (tiny random Hugging Face models, the embedded default model), and in CI a
skip for want of an installed dependency made a failure."""

from __future__ import annotations

import functools
import gc
import os
import re
import sys
from pathlib import Path

# Before torch loads OpenMP: spinning idle workers would starve the engine and server processes
# the tests start on a 2-core machine.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# Without a GPU, Triton kernels run in Triton's interpreter (set before anything imports triton).
if not os.path.exists("/dev/nvidia0"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from reference import hf_causal_lm, save_tiny_model  # noqa: E402

torch.set_num_threads(2)


def pytest_collection_finish(session: pytest.Session) -> None:
    """What collecting imported (torch, transformers, every test module: ~650k objects) lives for
    the whole run, so the garbage collector stops scanning it: each full collection, one per
    in-process engine's shutdown and more as the run allocates, then costs microseconds, not
    about 0.4 s."""
    gc.freeze()


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    """Llama with GQA (4 heads, 2 kv heads), a non-default rope base and Llama-3.1 rope scaling."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=259, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=1024, eos_token_id=2, bos_token_id=1, rope_theta=50000.0,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 64},
    )
    return save_tiny_model(tmp_path_factory.mktemp("tiny_llama"), config, LlamaForCausalLM)


@pytest.fixture(scope="session")
def default_model_folder() -> Path:
    from sglang_core.weights.default_model import default_model_path

    return default_model_path()


# Servers of the default model that live the whole session hold their KV pool all along: 1 GiB
# (about 23k tokens of SmolLM2-135M in float32) instead of the CPU default 2 GiB, so that two of
# them, the module servers and the engines beside them fit a small CI machine's memory.
SESSION_SERVER_FLAGS = ("--kv-cache-memory-gb", "1")


@pytest.fixture(scope="session")
def lang_server():
    """One `sglang-core serve` of the default model, shared by every test that needs no server
    setting of its own (frontend language, API backends, the OpenAI and Anthropic APIs,
    constrained decoding over HTTP, fuzzing, load): each server started costs seconds of CI time."""
    from server_util import running_server

    with running_server(*SESSION_SERVER_FLAGS) as server:
        yield server


@pytest.fixture(scope="session")
def tool_server():
    """One `sglang-core serve` of the default model with a chat template that renders tools
    (tests/tool_chat_template.jinja) and ``--reasoning-parser qwen3``, for the tool-calling tests."""
    from server_util import running_server

    with running_server("--chat-template", str(Path(__file__).with_name("tool_chat_template.jinja")),
                        "--reasoning-parser", "qwen3", "--max-running-requests", "32", *SESSION_SERVER_FLAGS) as server:
        yield server


@pytest.fixture(scope="session")
def tiny_server(tiny_llama, tmp_path_factory):
    """One `sglang-core serve` of ``tiny_llama`` (context 256, the chatml template) for the HTTP
    tests of bench-serving, streaming and server robustness, with the test plugin
    ``tests/pace_plugin.py`` installed beside the built-ins."""
    from server_util import running_server

    site = tmp_path_factory.mktemp("pace_site")
    info = site / "sglang_core_test_pace-0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: sglang-core-test-pace\nVersion: 0\n")
    (info / "entry_points.txt").write_text("[sglang_core.plugins]\npace = pace_plugin\n")
    env = {"PYTHONPATH": os.pathsep.join([str(site), str(Path(__file__).parent), *sys.path])}
    with running_server("--model-path", str(tiny_llama), "--chat-template", "chatml", "--context-length", "256",
                        env=env) as server:
        yield server


@pytest.fixture(scope="session")
def hf_tokenizer(default_model_folder: Path):
    """The default model's tokenizer through transformers: an independent reference for counts."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(default_model_folder))


@pytest.fixture(scope="session")
def hf_model(default_model_folder: Path):
    """The default model in HF transformers, float32: the reference for outputs and logprobs."""
    return hf_causal_lm(default_model_folder)


# -- in CI, a missing dependency fails instead of skipping ------------------------------------------

_IMPORT_SKIP = re.compile(r"could not import '([\w.]+)'")  # pytest.importorskip's skip message


def _canonical(name: str) -> str:
    """Distribution and module names compared as PEP 503 normalises names: google-genai is
    google.genai, outlines-core outlines_core."""
    return re.sub(r"[-_.]+", "-", name).lower()


@functools.cache
def installed_for_tests() -> frozenset[str]:
    """What ``pip install -e ".[test]"`` installs: the dependencies and the ``test`` extra."""
    from importlib.metadata import requires

    from packaging.requirements import Requirement

    wanted = set()
    for requirement in map(Requirement, requires("sglang-core") or ()):
        if requirement.marker is None or requirement.marker.evaluate({"extra": "test"}):
            wanted.add(_canonical(requirement.name))
    return frozenset(wanted)


def _fail_missing_dependency(report: pytest.CollectReport | pytest.TestReport) -> None:
    """With ``CI`` set, a skip by ``pytest.importorskip`` of a package the set-up command installs
    becomes a failure: CI must run those tests, not skip them (a GPU-only skip stays a skip)."""
    if not (os.environ.get("CI") and report.skipped):
        return
    match = _IMPORT_SKIP.search(str(report.longrepr))
    if match and _canonical(match.group(1)) in installed_for_tests():
        report.outcome = "failed"
        report.longrepr = f"{match.group(0)}, which pip install -e '.[test]' installs: in CI it must be importable"


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    _fail_missing_dependency(report)
    return report


@pytest.hookimpl(wrapper=True)
def pytest_make_collect_report(collector):
    report = yield
    _fail_missing_dependency(report)
    return report

"""The example third-party plugin, end to end: pip-install ``examples/granite-plugin``, find it
through its entry point, and serve a tiny random IBM Granite model token for token like
Hugging Face transformers (float32, CPU)."""

from __future__ import annotations

import importlib
import json
import random
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import pytest
import torch

from reference import hf_greedy, save_tiny_model

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "examples" / "granite-plugin"
DISTRIBUTION = "sglang-core-granite"
VOCAB = 259  # the byte-level test tokenizer's size
PLUGINS = ["torch_native", "safetensors", "granite"]  # no other model plugin: it needs only the core
GREEDY = {"temperature": 0, "max_new_tokens": 16, "ignore_eos": True}


@pytest.fixture(scope="module")
def granite_installed() -> None:
    """Install the example into this environment, as a user would (no network needed)."""
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "-q", str(PACKAGE)],
        capture_output=True, text=True,
    )
    assert proc.returncode == 0, f"pip install {PACKAGE} failed:\n{proc.stdout}\n{proc.stderr}"
    importlib.invalidate_caches()  # let this process see the new module and dist-info


def _tiny_granite(folder: Path, tie_word_embeddings: bool) -> Path:
    from transformers import GraniteConfig, GraniteForCausalLM

    config = GraniteConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, bos_token_id=1, eos_token_id=2,
        tie_word_embeddings=tie_word_embeddings, rope_theta=1e6,
        # Chosen so that dropping any one of them changes the greedy tokens (logits_scaling aside:
        # division keeps the argmax, so the logprob check below covers it). Real Granite values
        # (embedding 12, residual 0.22, attention 1/head_dim) drown this tiny model's layers under
        # the embedding, making its greedy output nearly a bigram table that hides such bugs.
        embedding_multiplier=2.0, residual_multiplier=0.8, attention_multiplier=0.7, logits_scaling=8.0,
    )
    return save_tiny_model(folder, config, GraniteForCausalLM)


def test_entry_point_is_installed(granite_installed):
    eps = {ep.name: ep for ep in entry_points(group="sglang_core.plugins")}
    assert "granite" in eps
    assert eps["granite"].value == "sglang_granite"
    assert eps["granite"].dist is not None and eps["granite"].dist.name == DISTRIBUTION


def test_cli_lists_granite(granite_installed):
    proc = subprocess.run([sys.executable, "-m", "sglang_core.cli", "plugins", "--json"],
                          capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert proc.returncode == 0, proc.stderr
    rows = {row["name"]: row for row in json.loads(proc.stdout)}
    assert "granite" in rows, f"granite missing from {sorted(rows)}"
    row = rows["granite"]
    assert row["distribution"] == DISTRIBUTION
    assert row["loaded"] and row["error"] is None
    assert row["registered"] == {"models": ["GraniteForCausalLM"]}


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_granite_matches_hf(granite_installed, tmp_path, tied):
    from transformers import GraniteForCausalLM

    from sglang_core.engine import Engine

    folder = _tiny_granite(tmp_path / "granite", tied)
    rng = random.Random(7)
    prompts = [[rng.randrange(3, VOCAB) for _ in range(n)] for n in (1, 4, 13, 38, 71)]

    hf = GraniteForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    expected = [hf_greedy(hf, p, GREEDY["max_new_tokens"]) for p in prompts]

    engine = Engine(str(folder), plugins=PLUGINS)
    try:
        results = engine.generate(input_ids=prompts, sampling_params=GREEDY, return_logprob=True)
        for i, (res, exp) in enumerate(zip(results, expected)):
            assert res["output_ids"] == exp, f"prompt {i} ({len(prompts[i])} tokens) differs from HF"

        # Greedy choices cannot see logits_scaling (division keeps the argmax); logprobs can.
        prompt, res = prompts[2], results[2]
        ids = torch.tensor([prompt + res["output_ids"]])
        with torch.no_grad():
            hf_logprobs = torch.log_softmax(hf(ids).logits[0].float(), dim=-1)
        positions = range(len(prompt) - 1, ids.shape[1] - 1)
        want = [hf_logprobs[p, ids[0, p + 1]].item() for p in positions]
        got = [lp for lp, _tid, _text in res["meta_info"]["output_token_logprobs"]]
        assert got == pytest.approx(want, abs=1e-4)
    finally:
        engine.shutdown()

"""Tensor-parallel ranks as processes (gloo on the CPU): one KV head replicated on two ranks gives
the reference's tokens; a rank that dies ends requests with an error naming it and takes the
engine process down; a config the
ranks cannot split is refused; two "nodes" on loopback serve together, and rank 0's death takes
the other node down; no rank outlives its engine.

A module of its own: a tensor-parallel engine in this process holds its one torch.distributed
group, which tests/test_tensor_parallel.py's shared engines would otherwise still hold."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import subprocess
import sys
import time

import psutil
import pytest
import transformers

from model_contract import BIGCODE_TINY, tiny
from sglang_core.config import EngineSettings
from sglang_core.engine import Engine
from sglang_core.layers.parallel import TPGroup
from sglang_core.model_executor.model_api import ModelContext
from sglang_core.model_executor.tp_launch import engine_settings_json, group_settings
from sglang_core.server.settings import ServerSettings
from sglang_plugins.models.gpt_bigcode.model import GPTBigCodeForCausalLM
from sglang_plugins.models.llama.model import LlamaForCausalLM
from sglang_plugins.models.qwen_moe.model import Qwen2MoeForCausalLM
from test_model_contract import _build, _reference_greedy

NEW_TOKENS = 8
GREEDY = {"temperature": 0, "ignore_eos": True, "max_new_tokens": NEW_TOKENS}


@pytest.fixture(scope="module")
def yi_folder(tmp_path_factory):
    """The "yi" contract case: one KV head, replicated on both ranks."""
    folder = tmp_path_factory.mktemp("tp-yi")
    model, _ = _build("yi", folder)
    return model, folder


def test_replicated_kv_head_then_a_rank_dying(yi_folder):
    """Rank 0 in an engine process (the server's layout), one KV head on two ranks: the
    reference's tokens and logprobs. Then rank 1 is killed during a request: the request ends
    with an error naming the rank, the engine process exits (the server's /health turns 503)
    and later requests are refused; nothing hangs or is left running."""
    model, folder = yi_folder
    engine = Engine(str(folder), device="cpu", tp_size=2, engine_in_subprocess=True)
    try:
        (rank1,) = [p for p in psutil.Process(engine.core.process.pid).children()
                    if "sglang_core.model_executor.tp_ranks" in " ".join(p.cmdline())]
        prompt = [5, 6, 7, 8, 9, 10, 11]
        result = engine.generate(input_ids=prompt, sampling_params=GREEDY, return_logprob=True)
        tokens, logprobs = _reference_greedy(model, prompt, NEW_TOKENS)
        assert result["output_ids"] == tokens
        assert [lp for lp, _, _ in result["meta_info"]["output_token_logprobs"]] == pytest.approx(logprobs, abs=1e-4)

        async def run() -> dict:
            stream = await engine.async_generate(input_ids=[5, 6], sampling_params={**GREEDY, "max_new_tokens": 400},
                                                 stream=True)
            chunks = [await anext(stream)]  # the request is running now
            rank1.kill()
            chunks += [c async for c in stream]
            return chunks[-1]

        reason = asyncio.run(asyncio.wait_for(run(), 30))["meta_info"]["finish_reason"]
        assert reason["type"] == "abort" and "tensor-parallel rank 1 exited" in reason["message"]
        engine.core.process.wait(timeout=10)
        deadline = time.monotonic() + 10
        while engine.alive and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not engine.alive
        with pytest.raises(RuntimeError):
            engine.generate(input_ids=[7, 8], sampling_params=GREEDY)
    finally:
        engine.shutdown()
    assert not _left_running(folder)


def test_heads_not_divisible_by_ranks_is_refused(tmp_path):
    """Two ranks over 3 attention heads: a ValueError naming the field, and no rank left running."""
    config = transformers.LlamaConfig(**tiny(hidden_size=48, num_attention_heads=3, num_key_value_heads=1))
    config.architectures = ["LlamaForCausalLM"]
    config.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="num_attention_heads"):
        Engine(str(tmp_path), device="cpu", load_format="dummy", tp_size=2)
    assert not _left_running(tmp_path)


@pytest.mark.parametrize("config, model_cls, layer", [
    (transformers.LlamaConfig(**tiny(intermediate_size=30)), LlamaForCausalLM, "model.layers.0.mlp"),
    (transformers.GPTBigCodeConfig(**BIGCODE_TINY, n_inner=30), GPTBigCodeForCausalLM, "model.layers.0.mlp"),
    (transformers.Qwen2MoeConfig(**tiny(num_experts=4, moe_intermediate_size=32, shared_expert_intermediate_size=30)),
     Qwen2MoeForCausalLM, "model.layers.0.mlp.shared_expert"),
], ids=["llama", "gpt-bigcode-n_inner", "qwen2-moe-shared-expert"])
def test_an_mlp_width_not_divisible_by_ranks_names_the_field_and_layer(config, model_cls, layer: str) -> None:
    """An MLP 30 wide over 4 ranks, whatever the config calls its width: a ValueError naming the
    field and the layer, as the model is built (before any rank loads a weight)."""
    message = rf"intermediate_size: 30 \({re.escape(layer)}\) is not divisible by tp_size=4"
    with pytest.raises(ValueError, match=message):
        model_cls(config, ModelContext(tp=TPGroup(rank=1, size=4)))


def _left_running(folder) -> list[psutil.Process]:
    """Processes whose command line names the model folder (engine processes, ranks) still running
    after up to 10 s."""
    serving = [p for p in psutil.process_iter(["cmdline"]) if str(folder) in " ".join(p.info["cmdline"] or [])]
    _, alive = psutil.wait_procs(serving, timeout=10)
    return alive


def _start_node1(folder, tp_size: int, address_flag: str) -> tuple[str, subprocess.Popen]:
    """A free loopback address, and node 1 of two started there by the documented command."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{probe.getsockname()[1]}"
    return address, subprocess.Popen([sys.executable, "-m", "sglang_core.cli", "serve", "--model-path", str(folder),
                                      "--device", "cpu", "--tp", str(tp_size), "--nnodes", "2", "--node-rank", "1",
                                      address_flag, address])


def test_two_nodes_on_loopback_then_rank_zero_dying(yi_folder):
    """Two "nodes" meeting at one loopback address: node 1, started by the documented command,
    runs rank 1 only; node 0's engine (rank 0 in an engine process, the server's layout) serves
    the reference's tokens. When that engine process is killed, the engine notices and node 1's
    rank and node 1 itself exit."""
    model, folder = yi_folder
    address, node1 = _start_node1(folder, tp_size=2, address_flag="--nccl-init")
    try:
        engine = Engine(str(folder), device="cpu", tp_size=2, nnodes=2, node_rank=0, dist_init_addr=address,
                        engine_in_subprocess=True)
        try:
            prompt = [9, 8, 7, 6, 5]
            assert engine.generate(input_ids=prompt, sampling_params=GREEDY)["output_ids"] == _reference_greedy(
                model, prompt, NEW_TOKENS)[0]
            os.kill(engine.core.process.pid, signal.SIGKILL)
            node1.wait(timeout=20)
            deadline = time.monotonic() + 10
            while engine.alive and time.monotonic() < deadline:
                time.sleep(0.05)
            assert not engine.alive
        finally:
            engine.shutdown()
    finally:
        if node1.poll() is None:
            node1.kill()
    assert not _left_running(folder)


def test_a_node_started_with_another_layout_is_refused_by_name(yi_folder):
    """Node 1 started with --tp 4 while node 0 runs two ranks: its rank reads node 0's settings
    from the store and refuses them; node 0's engine fails at once with that reason, node 1 exits
    with an error, nothing is left running."""
    _, folder = yi_folder
    address, node1 = _start_node1(folder, tp_size=4, address_flag="--dist-init-addr")
    try:
        with pytest.raises(RuntimeError, match="tp_size: node 1 was started with tp_size=4, node 0 with tp_size=2"):
            Engine(str(folder), device="cpu", tp_size=2, nnodes=2, node_rank=0, dist_init_addr=address)
        assert node1.wait(timeout=20) != 0
    finally:
        if node1.poll() is None:
            node1.kill()
    assert not _left_running(folder)


def test_another_nodes_ranks_build_from_node_zeros_settings():
    """What another node's ranks build from: node 0's settings (the model and step every rank must
    share), its own machine's paths, GPUs and name for node 0."""
    leader = EngineSettings(model_path="/node0/model", dtype="bfloat16", context_length=100, tp_size=4, nnodes=2,
                            dist_init_addr="10.0.0.1:5000", kv_cache_dtype="fp8_e5m2")
    own = EngineSettings(model_path="/node1/model", tp_size=4, nnodes=2, node_rank=1, dist_init_addr="node0:5000",
                         cuda_visible_devices="2,3")
    agreed = group_settings(engine_settings_json(leader), own)
    assert (agreed.dtype, agreed.context_length, agreed.kv_cache_dtype) == ("bfloat16", 100, "fp8_e5m2")
    assert (agreed.model_path, agreed.node_rank, agreed.dist_init_addr, agreed.cuda_visible_devices) == (
        "/node1/model", 1, "node0:5000", "2,3")
    with pytest.raises(ValueError, match="nnodes: node 1 was started with nnodes=4, node 0 with nnodes=2"):
        group_settings(engine_settings_json(leader),
                       EngineSettings(tp_size=4, nnodes=4, node_rank=1, dist_init_addr="node0:5000"))


@pytest.mark.parametrize("settings, field", [
    ({"tp_size": 3, "nnodes": 2, "dist_init_addr": "127.0.0.1:29500"}, "tp_size"),
    ({"tp_size": 2, "nnodes": 2, "node_rank": 2, "dist_init_addr": "127.0.0.1:29500"}, "node_rank"),
    ({"tp_size": 2, "nnodes": 2}, "dist_init_addr"),
    ({"tp_size": 2, "nnodes": 2, "dist_init_addr": "127.0.0.1"}, "dist_init_addr"),
    ({"tp_size": 2, "nnodes": 2, "dist_init_addr": "127.0.0.1:99999"}, "dist_init_addr"),
    ({"tp_size": 2, "ep_size": 4}, "ep_size"),
    ({"tp_size": 2, "enable_ep_moe": True, "ep_size": 1}, "ep_size"),
    ({"tp_size": 2, "dp_size": 2, "dist_init_addr": "127.0.0.1:29500"}, "dp_size"),
    ({"tp_size": 2, "dp_size": 2, "nnodes": 2, "dist_init_addr": "127.0.0.1:29500"}, "dp_size"),
])
def test_node_settings_refused(settings: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        ServerSettings(**settings)  # the engine's settings and the server's own


def test_ep_size_or_enable_ep_moe_turns_expert_parallelism_on() -> None:
    assert EngineSettings(tp_size=2, ep_size=2).expert_parallel
    assert EngineSettings(tp_size=2, enable_ep_moe=True).expert_parallel
    assert not EngineSettings(tp_size=2, ep_size=1).expert_parallel


def test_an_engine_is_not_built_on_another_node(yi_folder):
    """Node 1 runs only ranks (``sglang-core serve --node-rank 1``), never an engine."""
    _, folder = yi_folder
    with pytest.raises(ValueError, match="node_rank"):
        Engine(str(folder), device="cpu", tp_size=2, nnodes=2, node_rank=1, dist_init_addr="127.0.0.1:29500")

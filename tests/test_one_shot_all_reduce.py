"""The one-shot all-reduce on the CPU: which messages ``TPGroup.all_reduce`` sends to it and which to
NCCL, with both faked as two ranks holding the same message (the kernel needs GPUs that map each
other's memory; benchmarks/allreduce.py checks its sums there); when the ranks set it up; and
benchmarks/allreduce.py's dry run over gloo, whose results it checks against the ranks' sums.
On two GPUs: a two-rank engine decodes the same with it as over NCCL alone."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from sglang_core.config import EngineSettings
from sglang_core.engine import Engine
from sglang_core.layers import one_shot_all_reduce
from sglang_core.layers.one_shot_all_reduce import ONE_SHOT_MAX_BYTES, OneShotAllReduce, with_one_shot
from sglang_core.layers.parallel import TPGroup
from test_model_contract import CHUNK, _build

RANKS = 2
BENCHMARK = Path(__file__).resolve().parent.parent / "benchmarks" / "allreduce.py"
CUDA = torch.device("cuda", 0)  # a device object only: nothing runs on it here


@pytest.fixture
def paths(monkeypatch) -> list[str]:
    """Both all-reduces faked for two ranks holding the same message; the path each call took."""
    taken: list[str] = []

    def one_shot(staging: torch.Tensor, x: torch.Tensor, group_name: str) -> None:
        assert staging.shape == x.shape and staging.dtype == x.dtype
        staging.copy_(x)  # the kernel's copy into the symmetric buffer, then the peers' sum
        x.copy_(staging * RANKS)
        taken.append("one-shot")

    def nccl(x: torch.Tensor, group=None) -> None:
        x.mul_(RANKS)
        taken.append("nccl")

    monkeypatch.setattr(one_shot_all_reduce, "_one_shot_all_reduce", one_shot)
    monkeypatch.setattr(dist, "all_reduce", nccl)
    return taken


def group_with_one_shot() -> TPGroup:
    return TPGroup("group", 0, RANKS, one_shot=OneShotAllReduce(torch.empty(ONE_SHOT_MAX_BYTES, dtype=torch.uint8),
                                                                    "group"))


def reduced(tp: TPGroup, x: torch.Tensor) -> None:
    """All-reduce ``x`` and check it now holds the ranks' sum, in place."""
    expected = x.double() * RANKS
    assert tp.all_reduce(x) is x
    assert torch.equal(x.double(), expected)


@pytest.mark.parametrize("size, path", [
    (16, "one-shot"),
    (8 * 1024, "one-shot"),  # a decode token's hidden state at hidden 4096
    (ONE_SHOT_MAX_BYTES, "one-shot"),
    (ONE_SHOT_MAX_BYTES + 16, "nccl"),
    (16 * 2**20, "nccl"),
])
def test_small_messages_go_one_shot_larger_ones_to_nccl(paths, size, path):
    x = torch.randint(-8, 8, (size // 2,)).to(torch.bfloat16)
    reduced(group_with_one_shot(), x)
    assert paths == [path]


def test_messages_the_kernel_cannot_take_go_to_nccl(paths):
    tp = group_with_one_shot()
    reduced(tp, torch.ones(8, 64, dtype=torch.float32))  # float32: the kernel's other dtype
    assert paths == ["one-shot"]
    reduced(tp, torch.ones(8, 64, dtype=torch.float16))  # not compiled for float16
    reduced(tp, torch.ones(64, 8, dtype=torch.bfloat16).t())  # not contiguous
    reduced(tp, torch.ones(7, dtype=torch.bfloat16))  # 14 bytes: not whole 16-byte vectors
    reduced(tp, torch.ones(16, dtype=torch.bfloat16)[1:9])  # starts off a 16-byte boundary
    assert paths == ["one-shot"] + ["nccl"] * 4


def test_a_single_rank_reduces_nothing(paths):
    x = torch.ones(8, dtype=torch.bfloat16)
    assert TPGroup(one_shot=group_with_one_shot().one_shot).all_reduce(x) is x
    assert torch.equal(x, torch.ones(8, dtype=torch.bfloat16)) and paths == []


@pytest.fixture
def setup(monkeypatch) -> dict:
    """``with_one_shot`` on a two-rank group with this rank able and the group's vote and the
    allocation faked; what to change, and how often the buffer was allocated."""
    state = {"peer_vote": 1, "allocated": 0, "allocation_fails": False}

    def agree_min(self: TPGroup, value: int, device: torch.device) -> int:
        return min(value, state["peer_vote"])

    def allocate(group, device: torch.device, max_bytes: int = ONE_SHOT_MAX_BYTES) -> OneShotAllReduce:
        state["allocated"] += 1
        if state["allocation_fails"]:
            raise RuntimeError("CUDA driver error: invalid device context")
        return OneShotAllReduce(torch.empty(max_bytes, dtype=torch.uint8), "group")

    monkeypatch.setattr(TPGroup, "agree_min", agree_min)
    monkeypatch.setattr(OneShotAllReduce, "allocate", staticmethod(allocate))
    monkeypatch.setattr(one_shot_all_reduce, "_local_obstacle", lambda tp, device: None)
    return state


def test_every_rank_able_and_the_setting_on_sets_it_up(setup):
    tp = with_one_shot(TPGroup("group", 0, RANKS), CUDA, EngineSettings(tp_size=RANKS, enable_custom_all_reduce=True))
    assert tp.one_shot is not None and setup["allocated"] == 1


@pytest.mark.parametrize("case", ["setting off", "gloo", "two nodes", "a peer cannot", "allocation fails"])
def test_no_one_shot_unless_the_setting_is_on_and_every_rank_can(setup, case):
    settings = {"tp_size": RANKS, "enable_custom_all_reduce": case != "setting off"}
    if case == "two nodes":
        settings.update(nnodes=2, dist_init_addr="127.0.0.1:29500")
    setup["peer_vote"] = int(case != "a peer cannot")
    setup["allocation_fails"] = case == "allocation fails"
    device = torch.device("cpu") if case == "gloo" else CUDA
    tp = TPGroup("group", 0, RANKS)
    assert with_one_shot(tp, device, EngineSettings(**settings)) is tp
    assert setup["allocated"] == (1 if case == "allocation fails" else 0)


def test_benchmark_dry_run_checks_gloo_sums():
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run([sys.executable, str(BENCHMARK), "--dry-run"], capture_output=True, text=True, timeout=120,
                          env=env)
    assert done.returncode == 0, done.stderr
    rows = [line for line in done.stdout.splitlines() if line.startswith("| ") and "KiB" in line]
    assert [row.split(" | ")[0] for row in rows] == ["| 2 KiB", "| 4 KiB", "| 8 KiB", "| 16 KiB"]
    assert all(row.endswith("| ok |") for row in rows), done.stdout


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_two_gpus_decode_alike_one_shot_and_over_nccl(tmp_path):
    """Two ranks on two GPUs, float32, CUDA graphs on: the llama contract case's greedy tokens and
    logprobs with every all-reduce of this tiny model one-shot equal those over NCCL alone (a sum of
    two rounds alike either way). The NCCL engine runs first: this process's symmetric memory
    stays bound to its group's name, which a later group would reuse."""
    _, prompts = _build("llama", tmp_path)
    greedy = {"temperature": 0, "ignore_eos": True, "max_new_tokens": 8}
    results = {}
    for one_shot in (False, True):
        with Engine(str(tmp_path), device="cuda", dtype="float32", tp_size=RANKS, chunked_prefill_size=CHUNK,
                    cuda_graph_max_bs=8, enable_custom_all_reduce=one_shot) as engine:
            assert (engine.core.core.tp_ranks.tp.one_shot is not None) == one_shot
            results[one_shot] = engine.generate(input_ids=prompts, sampling_params=greedy, return_logprob=True)
    for nccl, one_shot in zip(results[False], results[True]):
        assert one_shot["output_ids"] == nccl["output_ids"]
        logprobs = [[lp for lp, _, _ in r["meta_info"]["output_token_logprobs"]] for r in (nccl, one_shot)]
        assert logprobs[1] == pytest.approx(logprobs[0], abs=1e-5)

"""Tensor parallelism across processes: one model runner per rank, the scheduler on rank 0.

Rank 0 is the engine core (in the caller's process, or the engine process the server starts).
``TPRanks`` starts ranks 1..N-1, each a fresh interpreter running ``rank_main``, and joins them
in a torch.distributed group (gloo on the CPU, NCCL on CUDA, one GPU per rank) through a TCP
store rank 0 opens on a free loopback port (or at ``dist_init_addr``). Every rank builds the same ``ModelRunner`` over its
own shards (the layers' weight loaders cut them) and the KV pool size all can hold.

For each forward pass rank 0 broadcasts the step (``StepChannel``), then every rank runs it; the
layers' all-reduces and the LM head's all-gather keep the ranks in step. Only rank 0 samples: the
sampling state (seeded generators, penalties' token counts, grammars) lives in its scheduler,
and the sampled ids reach the other ranks as the next step's input ids anyway. The other ranks
compute the same gathered logits and drop them, so every rank runs one program (the same CUDA
graphs).

Several nodes (``nnodes``): node 0 runs rank 0 and its ranks 1..k-1 (k = tp_size / nnodes), and
its store listens at ``dist_init_addr``; on node n, ``sglang-core serve --node-rank n`` runs only
``tp_launch.run_node``, which starts ranks n*k..n*k+k-1 against that address. The group spans them all.
Those ranks build from node 0's settings (published in the store), with their machine's own model
path: another node's command needs only the flags that place it.

Failure: rank 0 checks that every rank lives before each step; a rank that died there, or during
a step (gloo raises when a peer's connection closes), stops the group and fails every request,
then every later one, with an error naming the rank; rank 0 kills its node's ranks and leaves
the group, whose closing connections end the other nodes' ranks. The other ranks also exit when
their parent process is gone (they watch it), and on ``stop`` at shutdown.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import subprocess
import sys
import threading
import time
import traceback
from typing import Callable

import torch
import torch.distributed as dist

from sglang_core.config import EngineSettings
from sglang_core.layers.one_shot_all_reduce import with_one_shot
from sglang_core.layers.parallel import TPGroup
from sglang_core.model_executor.runner import ModelRunner, StepInput, pick_device
from sglang_core.model_executor.step_channel import StepChannel
from sglang_core.model_executor.tp_launch import (
    FAILED_KEY,
    SETTINGS_KEY,
    START_TIMEOUT_S,
    WATCH_INTERVAL_S,
    engine_settings_json,
    group_settings,
    meeting_point,
    ranks_per_node,
    start_ranks,
)
from sglang_core.plugins import PluginManager
from sglang_core.weights.loader import ModelSource, resolve_model_source

logger = logging.getLogger(__name__)

# A rank waits for its next step as long as the engine idles: no collective may time out.
NO_TIMEOUT = datetime.timedelta(days=365)
# A collective fails (gloo: a RuntimeError) as a dead rank's connection closes, a moment before
# its exit can be seen: how long to look for it.
DEATH_GRACE_S = 2.0


def _joined_key(rank: int) -> str:
    return f"joined/{rank}"


def join_group(store: dist.Store, settings: EngineSettings, rank: int, device: torch.device) -> TPGroup:
    """Join the group of ``tp_size`` ranks that meet at ``store``; the device picks the backend. With
    ``enable_custom_all_reduce`` the ranks also set up the one-shot all-reduce (a collective)."""
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=store, rank=rank,
                            world_size=settings.tp_size, timeout=NO_TIMEOUT)
    return with_one_shot(TPGroup.from_process_group(dist.group.WORLD), device, settings)


class TPRanks:
    """Rank 0's handle on the other ranks: their processes, the group, the step channel."""

    def __init__(self, settings: EngineSettings, plugin_names: list[str]):
        if settings.node_rank != 0:
            raise ValueError(f"node_rank: node {settings.node_rank} runs only its ranks (sglang-core serve "
                             "--node-rank N); the engine runs on node 0")
        if dist.is_initialized():
            raise ValueError("tp_size: this process already has a torch.distributed group; "
                             "run the engine in a process of its own (engine_in_subprocess)")
        size, local = settings.tp_size, ranks_per_node(settings)
        self.device = pick_device(settings.device)
        if self.device.type == "cuda" and torch.cuda.device_count() < local:
            raise ValueError(f"tp_size={size}: {local} ranks on this node, only {torch.cuda.device_count()} "
                             "CUDA devices visible")
        host, port = meeting_point(settings)
        store = dist.TCPStore(host, port, size, is_master=True, wait_for_workers=False)
        store.set(SETTINGS_KEY, engine_settings_json(settings))  # what the other nodes' ranks build from
        # This node's ranks; the other nodes' are started there (``tp_launch.run_node``).
        self.processes = start_ranks(settings, plugin_names, host, store.port, range(1, local))
        self.failure: str | None = None
        try:
            self._wait_joined(store, size)
            self.tp = join_group(store, settings, 0, self.device)
        except BaseException:
            self._kill()
            raise
        self._store = store  # the other ranks' connections to it live as long as the group
        self.channel: StepChannel | None = None

    def build_runner(self, settings: EngineSettings, source: ModelSource, plugins: PluginManager) -> ModelRunner:
        """Rank 0's runner, built alongside the other ranks' (its steps go to them from now on);
        on failure every rank is stopped."""
        try:
            runner = ModelRunner(settings, source, plugins, self.tp)
        except BaseException as exc:
            dead = self._dead_rank(wait_s=DEATH_GRACE_S if isinstance(exc, RuntimeError) else 0)
            self.stop()
            # A bad config is refused alike on every rank: rank 0's own ValueError says why.
            if dead and not isinstance(exc, ValueError):
                raise RuntimeError(f"{dead} while building its model (see its log above)") from exc
            raise
        self.channel = StepChannel(self.tp, runner.req_pool)
        runner.run_on_all_ranks = self.run
        return runner

    def run(self, step: StepInput, forward: Callable[[StepInput], torch.Tensor]) -> torch.Tensor:
        """Send ``step`` to every rank, then run it here. An error once sent leaves the ranks in
        an unknown place in the step, so the group stops for good."""
        self._check_alive()
        try:
            self.channel.send(step)
            return forward(step)
        except BaseException as exc:
            dead = self._dead_rank(wait_s=DEATH_GRACE_S if isinstance(exc, RuntimeError) else 0)
            self._fail(dead or f"a step failed on rank 0 ({type(exc).__name__}: {exc})")
            if dead:
                raise RuntimeError(self.failure) from exc
            raise

    def stop(self) -> None:
        """Tell every rank to exit, wait for them (killing any that does not), leave the group."""
        if self.failure is None and self.channel is not None and self._dead_rank() is None:
            try:
                self.channel.stop()
            except RuntimeError:  # a rank died meanwhile: nothing left to tell
                pass
        deadline = time.monotonic() + 10
        for process in self.processes:
            try:
                process.wait(timeout=max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self.failure = self.failure or "tensor parallelism: the engine shut down"
        if dist.is_initialized():
            dist.destroy_process_group()

    def _wait_joined(self, store: dist.Store, size: int) -> None:
        """Wait until every rank, of every node, has reached the store (so joining the group
        cannot hang on a rank that failed to start); raise if one exited first."""
        keys = [_joined_key(rank) for rank in range(1, size)]
        deadline = time.monotonic() + START_TIMEOUT_S
        while not store.check(keys):
            dead = self._dead_rank()
            if dead:
                raise RuntimeError(f"{dead} while starting (see its log above)")
            if store.check([FAILED_KEY]):
                raise RuntimeError(store.get(FAILED_KEY).decode())
            if time.monotonic() > deadline:
                raise RuntimeError(f"tensor-parallel ranks did not start within {START_TIMEOUT_S} s")
            time.sleep(0.05)

    def _dead_rank(self, wait_s: float = 0) -> str | None:
        """Which rank has exited, if any (looking for up to ``wait_s``)."""
        deadline = time.monotonic() + wait_s
        while True:
            for rank, process in enumerate(self.processes, start=1):
                if process.poll() is not None:
                    return f"tensor-parallel rank {rank} exited (code {process.returncode})"
            if time.monotonic() >= deadline:
                return None
            time.sleep(0.01)

    def _check_alive(self) -> None:
        if self.failure is None and (dead := self._dead_rank()):
            self._fail(dead)
        if self.failure is not None:
            raise RuntimeError(self.failure)

    def _fail(self, reason: str) -> None:
        if self.failure is None:
            self.failure = f"tensor parallelism stopped: {reason}"
            logger.error(self.failure)
        self._kill()
        # Other nodes' ranks, waiting in a collective, fail once rank 0's connections close.
        if dist.is_initialized():
            dist.destroy_process_group()

    def _kill(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.kill()
                process.wait()


def _exit_with(leader_pid: int) -> None:
    """Exit this process once ``leader_pid`` (rank 0) is gone, even while blocked in a collective."""
    def watch() -> None:
        while os.getppid() == leader_pid:
            time.sleep(WATCH_INTERVAL_S)
        os._exit(1)

    threading.Thread(target=watch, name="sglang-core-tp-watch", daemon=True).start()


def rank_main(settings_json: str, plugin_names: list[str] | None, host: str, port: int, leader_pid: int,
              rank: int) -> None:
    """A rank other than 0: join the group, build the runner, run every step rank 0 sends."""
    _exit_with(leader_pid)
    settings = EngineSettings.model_validate_json(settings_json)
    logging.basicConfig(level=settings.log_level.upper())
    device = pick_device(settings.device)
    if device.type == "cuda":
        torch.cuda.set_device(rank % ranks_per_node(settings))
    store = dist.TCPStore(host, port, settings.tp_size, is_master=False,
                          timeout=datetime.timedelta(seconds=START_TIMEOUT_S))
    if settings.node_rank != 0:
        try:
            settings = group_settings(store.get(SETTINGS_KEY).decode(), settings)
        except ValueError as exc:  # for rank 0 to raise, before any rank joins the group
            store.set(FAILED_KEY, str(exc))
            raise
    store.set(_joined_key(rank), "1")
    tp = join_group(store, settings, rank, device)
    plugins = PluginManager(plugin_names)
    source = resolve_model_source(settings.model_path, settings.load_format, plugins.registry("weight_formats"))
    runner = ModelRunner(settings, source, plugins, tp)
    channel = StepChannel(tp, runner.req_pool)
    code = 0
    try:
        with torch.inference_mode():
            while (step := channel.receive()) is not None:
                runner.forward_local(step)
    except Exception:  # rank 0's connections closed, or this rank failed: say why and exit at once
        traceback.print_exc()
        code = 1
    # Nothing to flush or hand back: skip the interpreter's teardown (a second of rank 0's shutdown;
    # after a failure, the process group's teardown can wait on peers that are gone).
    logging.shutdown()
    os._exit(code)


if __name__ == "__main__":
    rank_main(*json.loads(sys.argv[1]))

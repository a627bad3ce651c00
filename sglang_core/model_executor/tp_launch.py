"""Starting tensor-parallel rank processes, and another node's launcher (``run_node``).

Free of torch at import, so ``sglang-core serve --node-rank N`` starts its ranks at once; what
runs in each rank is ``tp_ranks.rank_main``.
"""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys
import time

from sglang_core.config import EngineSettings

HOST = "127.0.0.1"
START_TIMEOUT_S = 600
WATCH_INTERVAL_S = 0.5
FAILED_KEY = "failed"  # another node's failure to start, for rank 0 to report
SETTINGS_KEY = "settings"  # node 0's engine settings, which every rank builds from
# What may differ between machines: where each keeps the model, which GPUs, how it names node 0.
MACHINE_LOCAL = ("model_path", "tokenizer_path", "cuda_visible_devices", "node_rank", "dist_init_addr")
RANK_MODULE = "sglang_core.model_executor.tp_ranks"


def ranks_per_node(settings: EngineSettings) -> int:
    return settings.tp_size // settings.nnodes


def meeting_point(settings: EngineSettings) -> tuple[str, int]:
    """Where the ranks meet: ``dist_init_addr``, else loopback (port 0: rank 0's store picks one)."""
    if settings.dist_init_addr is None:
        return HOST, 0
    host, _, port = settings.dist_init_addr.rpartition(":")
    return host, int(port)


def engine_settings_json(settings: EngineSettings) -> str:
    """The engine's settings only (a server's API key stays out of the ranks' command lines)."""
    return settings.model_dump_json(include=set(EngineSettings.model_fields))


def group_settings(leader_json: str, own: EngineSettings) -> EngineSettings:
    """The settings another node's ranks build from: node 0's (that node's command may give fewer
    flags, and every rank must build the same model and step), with this machine's own
    ``MACHINE_LOCAL`` fields. A node whose ranks were laid out otherwise: a ValueError naming the field."""
    leader = EngineSettings.model_validate_json(leader_json)
    for field in ("tp_size", "nnodes"):
        if getattr(own, field) != getattr(leader, field):
            raise ValueError(f"{field}: node {own.node_rank} was started with {field}={getattr(own, field)}, "
                             f"node 0 with {field}={getattr(leader, field)}")
    return leader.model_copy(update={field: getattr(own, field) for field in MACHINE_LOCAL})


def start_ranks(settings: EngineSettings, plugin_names: list[str] | None, host: str, port: int,
                ranks: range) -> list[subprocess.Popen]:
    """One fresh interpreter per rank, each running ``tp_ranks.rank_main`` and watching this process.
    ``plugin_names`` None: every installed plugin."""
    args = [engine_settings_json(settings), plugin_names, host, port, os.getpid()]
    env = {"OMP_WAIT_POLICY": "PASSIVE", **os.environ}  # idle OpenMP workers sleep (see core_client)
    return [subprocess.Popen([sys.executable, "-m", RANK_MODULE, json.dumps([*args, rank])], env=env)
            for rank in ranks]


def run_node(settings: EngineSettings) -> int:
    """Node ``node_rank`` > 0 of several: start this node's ranks and wait for them. They exit when
    rank 0 stops them or its connections close; one that fails stops the others here (rank 0 then
    sees their connections close, or, while starting, reads why from the store). Returns 0 when
    every rank exited cleanly, else 1."""
    local = ranks_per_node(settings)
    first = settings.node_rank * local
    host, port = meeting_point(settings)
    processes = start_ranks(settings, settings.plugins, host, port, range(first, first + local))
    import torch.distributed as dist  # after the ranks are on their way: torch takes seconds to import

    store = dist.TCPStore(host, port, settings.tp_size, is_master=False,
                          timeout=datetime.timedelta(seconds=START_TIMEOUT_S))
    try:
        while (any(p.poll() is None for p in processes)
               and not any(p.poll() not in (None, 0) for p in processes)):
            time.sleep(WATCH_INTERVAL_S)
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
    failed = [(rank, p.returncode) for rank, p in enumerate(processes, start=first) if p.returncode != 0]
    if failed:
        rank, code = failed[0]
        try:  # rank 0 may still be waiting for this node's ranks to start: tell it why they won't
            if not store.check([FAILED_KEY]):  # unless a rank said why itself
                store.set(FAILED_KEY, f"tensor-parallel rank {rank} (node {settings.node_rank}) exited (code {code})")
        except RuntimeError:  # rank 0 is gone
            pass
        return 1
    return 0

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
RANK_MODULE = "sglang_core.model_executor.tp_ranks"


def ranks_per_node(settings: EngineSettings) -> int:
    return settings.tp_size // settings.nnodes


def meeting_point(settings: EngineSettings) -> tuple[str, int]:
    """Where the ranks meet: ``dist_init_addr``, else loopback (port 0: rank 0's store picks one)."""
    if settings.dist_init_addr is None:
        return HOST, 0
    host, _, port = settings.dist_init_addr.rpartition(":")
    return host, int(port)


def start_ranks(settings: EngineSettings, plugin_names: list[str] | None, host: str, port: int,
                ranks: range) -> list[subprocess.Popen]:
    """One fresh interpreter per rank, each running ``tp_ranks.rank_main`` and watching this process.
    ``plugin_names`` None: every installed plugin."""
    # The engine's settings only (a server's API key stays out of the ranks' command lines).
    args = [settings.model_dump_json(include=set(EngineSettings.model_fields)), plugin_names, host, port, os.getpid()]
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
            store.set(FAILED_KEY, f"tensor-parallel rank {rank} (node {settings.node_rank}) exited (code {code})")
        except RuntimeError:  # rank 0 is gone
            pass
        return 1
    return 0

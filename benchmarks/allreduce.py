"""All-reduce time on the GPUs of one machine: NCCL against the one-shot all-reduce
(``sglang_core/layers/one_shot_all_reduce.py``, PyTorch symmetric memory), eager and replayed in a
CUDA graph, for bf16 messages of 2 KiB to 16 MiB.

    python benchmarks/allreduce.py --gpus 2     # one process per GPU, started here (no torchrun)
    python benchmarks/allreduce.py --dry-run    # two CPU processes over gloo: the group's all-reduce only

Per message size and path: one all-reduce of fresh messages (small integers, so the bf16 sums are
exact) is compared on every rank with the sum of what all ranks sent, eagerly and through a
captured graph; then ``--repeats`` runs of 100 all-reduces back to back (eager: launched from
Python; graph: 100 captured, one replay), the median run's microseconds per all-reduce on the
slowest rank. A markdown table on stdout; exit status 1 if any result was wrong.

The physical floor: each GPU's NVLink bandwidth B each way (H100/H200 SXM: NVLink 4, 18 links,
450 GB/s). NCCL's ring moves 2 (N - 1) / N x S bytes of a message of S bytes through every GPU's
links; the one-shot kernel reads the N - 1 peers' whole messages, (N - 1) x S: the same bytes at
N = 2, N / 2 times the ring's beyond. At 16 MiB and N = 2 that is 37 us; at 1 MiB 2.3 us, less than
a kernel launch plus a barrier between GPUs (several us): below ~1 MB both are latency-bound,
which is where one-shot's single kernel should win. The table's floor column is those bytes over
``--nvlink-gbps``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from typing import Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from sglang_core.layers.one_shot_all_reduce import ONE_SHOT_MAX_BYTES, OneShotAllReduce

KIB = 1024
SIZES = [2 * KIB * 2**i for i in range(14)]  # 2 KiB .. 16 MiB
DRY_RUN_SIZES = SIZES[:4]
DTYPE = torch.bfloat16
WARMUP_REDUCTIONS = 3
# Message values are small integers below this (times the rank count): every partial sum is exact in bf16.
VALUE_RANGE = 4


def sent_message(rank: int, numel: int, device: torch.device) -> torch.Tensor:
    """What ``rank`` sends: small integers, different on every rank and along the message."""
    return ((torch.arange(numel, device=device) + rank) % VALUE_RANGE + rank).to(DTYPE)


def expected_sum(world: int, numel: int, device: torch.device) -> torch.Tensor:
    return sum(sent_message(rank, numel, device).double() for rank in range(world))


def measure(run: Callable[[], None], device: torch.device) -> float:
    """Seconds ``run`` takes (on the GPU's clock for CUDA)."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    begin = time.perf_counter()
    run()
    return time.perf_counter() - begin


def captured(reduce: Callable[[torch.Tensor], object], x: torch.Tensor, times: int) -> torch.cuda.CUDAGraph:
    """A graph of ``times`` all-reduces of ``x`` (warmed up on a side stream first, as capture wants)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(WARMUP_REDUCTIONS):
            reduce(x)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(times):
            reduce(x)
    return graph


def check(reduce: Callable[[torch.Tensor], object], rank: int, world: int, numel: int, device: torch.device,
          graph: bool) -> bool:
    """One all-reduce of fresh messages (through a captured graph if ``graph``) equals their sum."""
    x = torch.empty(numel, dtype=DTYPE, device=device)
    replay = captured(reduce, x, 1).replay if graph else (lambda: reduce(x))
    x.copy_(sent_message(rank, numel, device))
    replay()
    return torch.equal(x.double(), expected_sum(world, numel, device))


def time_per_reduction(reduce: Callable[[torch.Tensor], object], numel: int, device: torch.device, graph: bool,
                       args: argparse.Namespace) -> float:
    """Microseconds per all-reduce: the median of ``repeats`` runs of ``reductions`` back to back."""
    x = torch.zeros(numel, dtype=DTYPE, device=device)  # zeros stay zeros however often summed

    def eager() -> None:
        for _ in range(args.reductions):
            reduce(x)

    run = captured(reduce, x, args.reductions).replay if graph else eager
    for _ in range(WARMUP_REDUCTIONS):
        run()
    runs = []
    for _ in range(args.repeats):
        dist.barrier()  # every rank starts the run together
        runs.append(measure(run, device))
    return statistics.median(runs) / args.reductions * 1e6


def rank_main(rank: int, world: int, store_path: str, result_path: str, args: argparse.Namespace) -> None:
    """One rank: every size, path and mode; rank 0 writes the slowest rank's times and all checks."""
    if args.dry_run:
        device, backend = torch.device("cpu"), "gloo"
    else:
        torch.cuda.set_device(rank)
        device, backend = torch.device("cuda", rank), "nccl"
    dist.init_process_group(backend, store=dist.FileStore(store_path, world), rank=rank, world_size=world)
    paths: dict[str, Callable[[torch.Tensor], object]] = {backend: dist.all_reduce}
    if not args.dry_run:
        paths["one-shot"] = OneShotAllReduce.allocate(dist.group.WORLD, device, max_bytes=max(args.sizes))
    modes = ["eager"] if args.dry_run else ["eager", "graph"]
    columns = [f"{path} {mode}" for mode in modes for path in paths]
    times, correct = [], []
    for size in args.sizes:
        numel = size // DTYPE.itemsize
        for mode in modes:
            for reduce in paths.values():
                correct.append(check(reduce, rank, world, numel, device, mode == "graph"))
                times.append(time_per_reduction(reduce, numel, device, mode == "graph", args))
    slowest = torch.tensor(times, dtype=torch.float64, device=device)
    dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
    all_correct = torch.tensor(correct, dtype=torch.int32, device=device)
    dist.all_reduce(all_correct, op=dist.ReduceOp.MIN)
    if rank == 0:
        per_size = len(columns)
        rows = [{"bytes": size,
                 "us": dict(zip(columns, slowest[i * per_size:(i + 1) * per_size].tolist())),
                 "correct": dict(zip(columns, [bool(c) for c in all_correct[i * per_size:(i + 1) * per_size].tolist()]))}
                for i, size in enumerate(args.sizes)]
        with open(result_path, "w") as f:
            json.dump({"world": world, "columns": columns, "rows": rows}, f)
    dist.destroy_process_group()


def floor_us(size: int, world: int, nvlink_gbps: float) -> tuple[float, float]:
    """(ring, one-shot) microseconds to move an all-reduce's bytes through one GPU's NVLink."""
    ring = 2 * (world - 1) / world * size
    one_shot = (world - 1) * size
    return ring / nvlink_gbps / 1e3, one_shot / nvlink_gbps / 1e3


def size_label(size: int) -> str:
    return f"{size // (KIB * KIB)} MiB" if size >= KIB * KIB else f"{size // KIB} KiB"


def markdown(result: dict, args: argparse.Namespace) -> str:
    """The table, and where one-shot stops beating NCCL."""
    columns, world = result["columns"], result["world"]
    floor = [] if args.dry_run else [f"NVLink floor us, ring / one-shot ({args.nvlink_gbps:g} GB/s)"]
    header = ["message", *[f"{c} us" for c in columns], *floor, "result"]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for row in result["rows"]:
        wrong = [c for c in columns if not row["correct"][c]]
        cells = [size_label(row["bytes"]), *[f"{row['us'][c]:.1f}" for c in columns]]
        if not args.dry_run:
            cells.append("%.1f / %.1f" % floor_us(row["bytes"], world, args.nvlink_gbps))
        cells.append("WRONG: " + ", ".join(wrong) if wrong else "ok")
        lines.append("| " + " | ".join(cells) + " |")
    if "one-shot graph" in columns:
        faster = [row["bytes"] for row in result["rows"] if row["us"]["one-shot graph"] < row["us"]["nccl graph"]]
        lines.append("")
        lines.append(f"{world} ranks, bf16; one-shot beats NCCL in graphs at: "
                     f"{', '.join(size_label(s) for s in faster) or 'no size'} "
                     f"(ONE_SHOT_MAX_BYTES is {size_label(ONE_SHOT_MAX_BYTES)})")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpus", type=int, default=None, help="ranks, one GPU each (default: every visible GPU)")
    parser.add_argument("--dry-run", action="store_true", help="two CPU processes over gloo, small sizes")
    parser.add_argument("--reductions", type=int, default=None,
                        help="all-reduces per timed run (default: 100; --dry-run: 5)")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed runs per size, the median counts (default: 20; --dry-run: 3)")
    parser.add_argument("--nvlink-gbps", type=float, default=450.0,
                        help="one GPU's NVLink bandwidth each way in GB/s, for the floor (default: H100/H200's 450)")
    args = parser.parse_args()
    if args.dry_run:
        args.sizes, world = DRY_RUN_SIZES, args.gpus or 2
        args.reductions, args.repeats = args.reductions or 5, args.repeats or 3
    else:
        args.sizes, world = SIZES, args.gpus or torch.cuda.device_count()
        args.reductions, args.repeats = args.reductions or 100, args.repeats or 20
        if world < 2 or world > torch.cuda.device_count():
            parser.error(f"--gpus: {world} ranks need as many GPUs, at least 2 ({torch.cuda.device_count()} visible)")
    # NVLink multicast stays off: neither NCCL nor symmetric memory may create multicast objects here.
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
    with tempfile.TemporaryDirectory() as scratch:
        result_path = os.path.join(scratch, "result.json")
        mp.spawn(rank_main, args=(world, os.path.join(scratch, "store"), result_path, args), nprocs=world)
        with open(result_path) as f:
            result = json.load(f)
    print(markdown(result, args))
    return 0 if all(all(row["correct"].values()) for row in result["rows"]) else 1


if __name__ == "__main__":
    sys.exit(main())

"""Where a decode step's time goes: the GPU's share (a bare CUDA-graph replay) against a whole
scheduler step (``EngineCore.step``: batch building, graph replay, sampling, stop checks), and a
cProfile of the host side. Llama-3.1-8B shape, dummy bf16 weights.

    python benchmarks/profile_decode.py --batch-sizes 1,64 --backend triton
    python benchmarks/profile_decode.py --kernels      # also a per-kernel GPU time table (graph replays)
    python benchmarks/profile_decode.py --batch-sizes 1 --kernels --engine quantization=fp8   # any engine setting
    python benchmarks/profile_decode.py --batch-sizes 1 --disable-cuda-graph   # host cost of an eager step
    python benchmarks/profile_decode.py --batch-sizes 256 --input-len 2176 --shared-prefix 2048 \
        --group-size 16 --kernels [--cascade]         # the shared-prefix run's decode steps
    python benchmarks/profile_decode.py --batch-sizes 1 --input-len 1280 --rows-step 256 --kernels
        # also an extend step of 256 tokens as decode-graph rows (--extend-graph-max-tokens 256)
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import random
import sys
import time
from pathlib import Path

import torch

from sglang_core.config import EngineSettings
from sglang_core.engine_core import EngineCore
from sglang_core.messages import GenerateRequest
from sglang_core.model_executor.cuda_graph import decode_rows, row_chunks
from sglang_core.plugins import PluginManager

CONFIG = Path(__file__).parent / "configs" / "llama-3.1-8b"


def gpu_replay_ms(core: EngineCore, bs: int, iters: int = 50, graph=None) -> float:
    """GPU time of one replay of the batch's decode graph (or of ``graph``, inputs as they are)."""
    graphs = core.runner.cuda_graphs
    graph = graph or graphs.graphs[next(s for s in graphs.sizes if s >= bs)]
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    graph.replay()
    start.record()
    for _ in range(iters):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def kernel_table(core: EngineCore, bs: int, replays: int = 5, graph=None) -> None:
    """GPU time per kernel over a few replays of the batch's decode graph (or of ``graph``;
    CUPTI reports the kernels a graph launches one by one), or over a few eager steps without graphs."""
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    graphs = core.runner.cuda_graphs
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(replays):
            if graph is not None:
                graph.replay()
            elif graphs is not None:
                graphs.graphs[next(s for s in graphs.sizes if s >= bs)].replay()
            else:
                core.step()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="self_device_time_total", row_limit=45, max_name_column_width=70))


@torch.inference_mode()  # the engine's buffers are inference tensors
def rows_step(core: EngineCore, rows: int, kernels: bool) -> None:
    """An extend step of ``rows`` new tokens of one prompt as decode-graph rows: the last ``rows``
    tokens of a running request, replayed through the plain decode graph (each row reads its own
    prefix) and through the graph captured with row chunks (the chunk attended by the extend
    kernel, each key read once per block of rows), each timed alone and, with ``kernels``, per kernel."""
    graphs = core.runner.cuda_graphs
    req = core.scheduler.running[0]
    start, end = req.kv_len - rows, req.kv_len
    slots = core.runner.req_pool.req_to_token[req.req_pool_idx, start:end]
    table_rows, lens, fills = decode_rows([req.req_pool_idx], [start], [end], [end])
    size = next(s for s in graphs.sizes if s >= rows)
    chunks = row_chunks([req.req_pool_idx], [start], [end], graphs.chunk_limit)
    ways = [("plain decode rows", graphs.graphs, [])] + [("row chunks", graphs.chunk_graphs, chunks)] * bool(chunks)
    for name, graph_set, step_chunks in ways:
        graphs.replay([0] * rows, list(range(start, end)), slots, table_rows, lens, fills, chunks=step_chunks)
        ms = gpu_replay_ms(core, rows, graph=graph_set[size])
        print(f"\n== rows step: {rows} new tokens after {start} cached, graph of {size} rows with {name}: "
              f"replay {ms:.3f} ms")
        if kernels:
            kernel_table(core, rows, graph=graph_set[size])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-sizes", default="1,64")
    parser.add_argument("--backend", default="triton")
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--kernels", action="store_true", help="print a per-kernel GPU time table")
    parser.add_argument("--shared-prefix", type=int, default=0,
                        help="the first N prompt tokens are shared within each group of --group-size requests")
    parser.add_argument("--group-size", type=int, default=16)
    parser.add_argument("--cascade", action="store_true", help="--enable-cascade-decode")
    parser.add_argument("--disable-cuda-graph", action="store_true",
                        help="run decode eagerly: the cProfile then shows every launch's host cost")
    parser.add_argument("--model-path", default=str(CONFIG))
    parser.add_argument("--device", default="cuda", help="cpu: a smoke test of the script with a small config")
    parser.add_argument("--decode-programs", type=int, default=None,
                        help="experiment: override the Triton backend's TARGET_PROGRAMS")
    parser.add_argument("--engine", action="append", default=[], metavar="KEY=VALUE",
                        help="an extra engine setting, e.g. quantization=fp8 (repeatable)")
    parser.add_argument("--rows-step", type=int, default=0, metavar="N",
                        help="also time an extend step of N tokens (the last N of the first running request, "
                             "--input-len >= N) as decode-graph rows, with and without row chunks "
                             "(sets --extend-graph-max-tokens N, --cuda-graph-max-bs at least N)")
    args = parser.parse_args()
    extra = dict(item.split("=", 1) for item in args.engine if "=" in item)
    if len(extra) != len(args.engine):
        parser.error(f"--engine {args.engine}: expected KEY=VALUE")
    if args.rows_step:
        if args.disable_cuda_graph or args.input_len < args.rows_step:
            parser.error("--rows-step N replays graphs: needs CUDA graphs and --input-len >= N")
        extra.setdefault("extend_graph_max_tokens", args.rows_step)
        extra.setdefault("cuda_graph_max_bs", max(256, args.rows_step))
    if args.decode_programs:
        from sglang_plugins.attention.triton import backend

        backend.TARGET_PROGRAMS = args.decode_programs
    sizes = [int(b) for b in args.batch_sizes.split(",")]
    settings = EngineSettings(model_path=args.model_path, load_format="dummy", dtype="bfloat16", device=args.device,
                              attention_backend=args.backend, max_running_requests=max(sizes + [128]),
                              enable_cascade_decode=args.cascade, disable_cuda_graph=args.disable_cuda_graph,
                              **extra)
    core = EngineCore(settings, PluginManager(settings.plugins))
    rng = random.Random(0)
    for bs in sizes:
        for i in range(bs):
            if i % args.group_size == 0:
                shared = [rng.randrange(core.info.vocab_size) for _ in range(args.shared_prefix)]
            ids = shared + [rng.randrange(core.info.vocab_size) for _ in range(args.input_len - args.shared_prefix)]
            core.add(GenerateRequest(rid=f"{bs}-{i}", input_ids=ids, sampling_params={
                "max_new_tokens": args.steps + 20, "temperature": 0.0, "ignore_eos": True}))
        while core.scheduler.waiting or core.scheduler.chunked:  # prefill
            core.step()
        for _ in range(10):
            core.step()
        if core.runner.device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(args.steps // 2):
            core.step()
        step_ms = (time.perf_counter() - start) / (args.steps // 2) * 1000
        profile = cProfile.Profile()  # separately: the profiler slows the host side down
        profile.enable()
        for _ in range(args.steps // 2):
            core.step()
        profile.disable()
        gpu_ms = gpu_replay_ms(core, bs) if core.runner.cuda_graphs else float("nan")
        card = torch.cuda.get_device_name() if core.runner.device.type == "cuda" else "cpu (a smoke test)"
        if args.cascade:
            print(f"cascade decode rows so far: {core.scheduler.cascade_decode_rows}")
        print(f"\n== batch {bs}: whole step {step_ms:.3f} ms, graph replay alone {gpu_ms:.3f} ms "
              f"(host overhead not hidden: {step_ms - gpu_ms:.3f} ms) on {card}")
        pstats.Stats(profile).sort_stats("tottime").print_stats(20)
        if args.kernels:
            kernel_table(core, bs)
        if args.rows_step:
            rows_step(core, args.rows_step, args.kernels)
        for req in list(core.scheduler.running):
            core.abort(req.rid)
    return 0


if __name__ == "__main__":
    sys.exit(main())

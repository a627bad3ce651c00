"""CUDA graphs for decode: one graph per batch size, replayed with the step's inputs copied in.

A decode step of a small batch is hundreds of short kernels; launched one by one from Python,
the launches cost more than the kernels. Captured once per batch size (a batch is padded to the
next captured size) the whole step, logits included, is one graph launch.

Capture needs the attention backend's decode to read the batch only through device tensors
(``AttentionBackend.cuda_graph_decode``); a backend whose plan reads host-side lengths (FlashInfer)
is planned again before each replay (``plan_before_replay``). Padding rows decode token 0 at position 0 of request
row 0, write their K/V into slot 0 (the pool's padding slot) and their logits are dropped.
"""

from __future__ import annotations

import logging
from typing import Callable

import torch

from sglang_core.model_executor.forward_batch import ForwardBatch, ForwardMode

logger = logging.getLogger(__name__)


def capture_sizes(max_bs: int) -> list[int]:
    """1, 2, 4, 8, then every 8 up to 256, then every 16: padding wastes at most a few rows."""
    sizes = [1, 2, 4] + list(range(8, 257, 8)) + list(range(272, max_bs + 1, 16))
    sizes = [s for s in sizes if s <= max_bs]
    return sizes if sizes and sizes[-1] == max_bs else sizes + [max_bs]


class CudaGraphRunner:
    """Captures ``forward(batch) -> logits`` for decode batches and replays it."""

    def __init__(self, forward: Callable[[ForwardBatch], torch.Tensor], make_batch: Callable[..., ForwardBatch],
                 max_bs: int, device: torch.device):
        self.forward = forward
        self.sizes = capture_sizes(max_bs)
        n = self.sizes[-1]
        # Inputs of every graph, in one tensor so one host-to-device copy fills them:
        # rows are input ids, positions, KV slots written, request rows, sequence lengths.
        self.inputs = torch.zeros(5, n, dtype=torch.int64, device=device)
        self.inputs[4] = 1
        self.make_batch = make_batch
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        self.pool = torch.cuda.graph_pool_handle()
        for bs in reversed(self.sizes):  # largest first: smaller graphs reuse its memory
            self._capture(bs)
        logger.info("captured decode CUDA graphs for batch sizes %s", self.sizes)

    @property
    def max_bs(self) -> int:
        return self.sizes[-1]

    def _batch(self, bs: int, seq_lens_cpu: list[int] | None = None, shared_prefixes: tuple = ()) -> ForwardBatch:
        ids, pos, loc, rows, lens = self.inputs[:, :bs]
        seq_lens_cpu = seq_lens_cpu or [1] * bs
        return self.make_batch(mode=ForwardMode.DECODE, input_ids=ids, positions=pos, out_cache_loc=loc,
                               req_pool_indices=rows, seq_lens=lens, prefix_lens=lens - 1,
                               seq_lens_cpu=seq_lens_cpu, prefix_lens_cpu=[n - 1 for n in seq_lens_cpu],
                               shared_prefixes=shared_prefixes)

    def _capture(self, bs: int) -> None:
        batch = self._batch(bs)
        self.attn_backend = batch.attn_backend
        batch.attn_backend.plan(batch)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):  # compile kernels and settle allocations outside the capture
                self.forward(batch)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            self.outputs[bs] = self.forward(batch)
        self.graphs[bs] = graph

    def replay(self, input_ids: list[int] | torch.Tensor, positions: list[int], out_cache_loc: torch.Tensor,
               req_pool_indices: list[int], seq_lens: list[int], shared_prefixes: tuple = ()) -> torch.Tensor:
        """Logits [len(input_ids), vocab] of one decode step (``len(input_ids) <= max_bs``).
        ``input_ids`` may already be on the device (an overlapped step's sampled ids)."""
        bs = len(input_ids)
        size = next(s for s in self.sizes if s >= bs)
        # A fresh pinned buffer per step: the caching host allocator keeps it until its copy ran.
        host = torch.zeros(5, size, dtype=torch.int64, pin_memory=True)
        host[4, bs:] = 1  # padding rows: sequence length 1, slot 0, request row 0, token 0
        on_host = not isinstance(input_ids, torch.Tensor)
        for row, values in ((0, input_ids if on_host else None), (1, positions), (3, req_pool_indices),
                            (4, seq_lens)):
            if values is not None:
                host[row, :bs] = torch.tensor(values, dtype=torch.int64)
        self.inputs[:, :size].copy_(host, non_blocking=True)
        if not on_host:
            self.inputs[0, :bs].copy_(input_ids)
        self.inputs[2, :bs].copy_(out_cache_loc)
        if self.attn_backend.plan_before_replay:
            self.attn_backend.plan(self._batch(size, list(seq_lens) + [1] * (size - bs), shared_prefixes))
        self.graphs[size].replay()
        return self.outputs[size][:bs]

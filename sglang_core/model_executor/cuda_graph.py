"""CUDA graphs for decode: one graph per batch size, replayed with the step's inputs copied in.

A decode step of a small batch is hundreds of short kernels; launched one by one from Python,
the launches cost more than the kernels. Captured once per batch size (a batch is padded to the
next captured size) the whole step, logits included, is one graph launch.

Capture needs the attention backend's decode to read the batch only through device tensors
(``AttentionBackend.cuda_graph_decode``); a backend whose plan reads host-side lengths (FlashInfer)
is planned again before each replay (``plan_before_replay``). Padding rows decode token 0 at position 0 of request
row 0, write their K/V into slot 0 (the pool's padding slot) and their logits are dropped.

With ``--extend-graph-max-tokens``, a small extend step (a prefill chunk, decodes riding along)
replays the same graphs: each new token is a decode row of its own whose sequence ends at that
token (``decode_rows``). Its K/V is written with the others' before any attention reads the pool,
so the row attends exactly the causal prefix an extend kernel would, and the step costs about a
decode step of that many rows instead of an eager pass's launches (on an H100, ~17 ms of
launches for Llama-3.1-8B). A row on its own reads its whole prefix, though: a chunk of 256 rows
of one prompt reads that prompt's keys ~256 times. So where the attention backend
``attends_row_chunks``, each size up to the extend limit is captured a second time with the step's
prefill chunks named (``ForwardBatch.row_chunks``, ``row_chunks``): the backend attends a chunk's
rows together as an extend, each key read once per block of rows, the other rows as decode rows.
"""

from __future__ import annotations

import bisect
import contextlib
import itertools
import logging
from typing import Any, Callable, Iterator, NamedTuple

import torch

from sglang_core.layers.attention import AttentionBackend
from sglang_core.model_executor.forward_batch import ForwardBatch, ForwardMode, RowChunks

logger = logging.getLogger(__name__)


class GraphInputs(NamedTuple):
    """The captured graphs' inputs, one row of ``CudaGraphRunner.inputs`` each (names as in
    ``ForwardBatch``)."""

    input_ids: torch.Tensor
    positions: torch.Tensor
    out_cache_loc: torch.Tensor  # KV slot each new token's K/V is written to
    req_pool_indices: torch.Tensor
    seq_lens: torch.Tensor
    fill_lens: torch.Tensor  # ForwardBatch.fill_lens: a prompt's tokens go by the whole prompt's length


# An extend step runs as decode rows only while its rows read at most this many keys in all (the
# decode kernel reads each row's prefix on its own; an extend kernel shares the reads of a chunk):
# about a batch-256 decode at 4k tokens of context.
EXTEND_MAX_KEY_READS = 1 << 20
# Prefill chunks a step's rows graph attends as chunks (``ForwardBatch.row_chunks``): the chunk
# tables' size, which sizes the extend kernel's fixed launch. A step's further chunks replay as
# plain decode rows.
MAX_ROW_CHUNKS = 8
# A chunk's query rows per read of its keys (the extend kernel's query block, at most 64 rows).
CHUNK_ROWS_PER_KEY_READ = 64


def decode_rows(req_pool_indices: list[int], prefix_lens: list[int], seq_lens: list[int],
                fill_lens: list[int]) -> tuple[list[int], list[int], list[int]]:
    """An extend step's new tokens as decode rows: (request row, sequence length, fill length) of
    each token in order; token ``p`` of a request is a row whose sequence ends at it (``p + 1``)."""
    rows: list[int] = []
    lens: list[int] = []
    fills: list[int] = []
    for row, start, end, fill in zip(req_pool_indices, prefix_lens, seq_lens, fill_lens, strict=True):
        rows += [row] * (end - start)
        lens += range(start + 1, end + 1)
        fills += [fill] * (end - start)
    return rows, lens, fills


def chunked_requests(prefix_lens: list[int], seq_lens: list[int], limit: int) -> list[bool]:
    """Which requests of an extend step a rows graph attends as a chunk: those with more than one
    new token, the first ``limit`` of them; the others' rows stay decode rows."""
    chunked = []
    taken = 0
    for start, end in zip(prefix_lens, seq_lens, strict=True):
        chunked.append(end - start > 1 and taken < limit)
        taken += chunked[-1]
    return chunked


def row_chunks(req_pool_indices: list[int], prefix_lens: list[int], seq_lens: list[int],
               limit: int) -> list[tuple[int, int, int, int]]:
    """The chunks (request row, sequence length, prefix length, first row) of an extend step's
    rows in ``decode_rows``' order that a rows graph attends as chunks (``chunked_requests``)."""
    firsts = itertools.accumulate((end - start for start, end in zip(prefix_lens, seq_lens)), initial=0)
    return [(row, end, start, first) for row, start, end, first, chunk
            in zip(req_pool_indices, prefix_lens, seq_lens, firsts, chunked_requests(prefix_lens, seq_lens, limit))
            if chunk]


def chunk_inputs(chunks: list[tuple[int, int, int, int]], rows: int, pin_memory: bool = False) -> torch.Tensor:
    """``row_chunks``' chunks of a step of ``rows`` rows as the host tensor ``chunk_tables`` reads:
    the tables of MAX_ROW_CHUNKS entries (unused ones zero), then each row's ``in_chunk``."""
    host = torch.zeros(4 * MAX_ROW_CHUNKS + rows, dtype=torch.int64, device="cpu", pin_memory=pin_memory)
    if chunks:
        host[:4 * MAX_ROW_CHUNKS].view(4, MAX_ROW_CHUNKS)[:, :len(chunks)] = torch.tensor(chunks, dtype=torch.int64).T
    in_chunk = host[4 * MAX_ROW_CHUNKS:]
    for _row, end, start, first in chunks:
        in_chunk[first:first + end - start] = 1
    return host


def chunk_tables(inputs: torch.Tensor, rows: int) -> RowChunks:
    """The ``RowChunks`` of a batch of ``rows`` rows over inputs laid out as ``chunk_inputs``'s (views)."""
    return RowChunks(*inputs[:4 * MAX_ROW_CHUNKS].view(4, MAX_ROW_CHUNKS), in_chunk=inputs[4 * MAX_ROW_CHUNKS:][:rows])


def capture_sizes(max_bs: int) -> list[int]:
    """1, 2, 4, 8, then every 8 up to 256, then every 16: padding wastes at most a few rows."""
    sizes = [1, 2, 4] + list(range(8, 257, 8)) + list(range(272, max_bs + 1, 16))
    sizes = [s for s in sizes if s <= max_bs]
    return sizes if sizes and sizes[-1] == max_bs else sizes + [max_bs]


class GraphPrimitives:
    """The device's graph calls, CUDA's: capture and replay take them from here, so a test can put
    others in their place (tests/graph_emulation.py replays graphs on the CPU)."""

    def new_graph(self) -> Any:
        """An empty graph; capture fills it, and its ``replay()`` runs it again."""
        return torch.cuda.CUDAGraph()

    def pool_handle(self) -> Any:
        """The memory pool every graph of a runner shares."""
        return torch.cuda.graph_pool_handle()

    @contextlib.contextmanager
    def side_stream(self) -> Iterator[None]:
        """Warm-up runs before a capture, off the current stream as capture runs (it then waits for them)."""
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            yield
        torch.cuda.current_stream().wait_stream(stream)

    def capture(self, graph: Any, pool: Any, run: Callable[[], torch.Tensor]) -> torch.Tensor:
        """Record ``run()`` into ``graph``; its output, which every replay rewrites in place."""
        with torch.cuda.graph(graph, pool=pool):
            return run()


CUDA_GRAPHS = GraphPrimitives()


class CudaGraphRunner:
    """Captures ``forward(batch) -> logits`` for decode batches and replays it. With
    ``chunk_max_bs`` and a backend that ``attends_row_chunks``, the sizes up to it are also
    captured with row chunks, for extend steps replayed as rows."""

    def __init__(self, forward: Callable[[ForwardBatch], torch.Tensor], make_batch: Callable[..., ForwardBatch],
                 attn_backend: AttentionBackend, max_bs: int, device: torch.device,
                 primitives: GraphPrimitives = CUDA_GRAPHS, chunk_max_bs: int = 0):
        self.forward = forward
        self.primitives = primitives
        self.attn_backend = attn_backend
        self.sizes = capture_sizes(max_bs)
        n = self.sizes[-1]
        # Inputs of every graph: the rows of one tensor, so one host-to-device copy fills them all,
        # each also held by name in `buffers` (views of its row).
        self.inputs = torch.zeros(len(GraphInputs._fields), n, dtype=torch.int64, device=device)
        self.buffers = GraphInputs(*self.inputs)
        self.buffers.seq_lens.fill_(1)
        self.buffers.fill_lens.fill_(1)
        chunked = chunk_max_bs > 0 and attn_backend.attends_row_chunks
        # The sizes an extend step of up to chunk_max_bs tokens may be padded to.
        chunk_sizes = self.sizes[:bisect.bisect_left(self.sizes, chunk_max_bs) + 1] if chunked else []
        self.chunk_limit = MAX_ROW_CHUNKS if chunked else 0
        # The chunk graphs' chunk tables (``chunk_inputs``): one copy fills them; all zero, no chunk.
        self.chunk_inputs = torch.zeros(4 * MAX_ROW_CHUNKS + n, dtype=torch.int64, device=device)
        self.make_batch = make_batch
        self.graphs: dict[int, Any] = {}
        self.chunk_graphs: dict[int, Any] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        self.pool = primitives.pool_handle()
        for bs in reversed(self.sizes):  # largest first: smaller graphs reuse its memory
            self._capture(bs, chunked=False)
        for bs in reversed(chunk_sizes):
            self._capture(bs, chunked=True)
        logger.info("captured decode CUDA graphs for batch sizes %s, with row chunks for %s", self.sizes, chunk_sizes)

    @property
    def max_bs(self) -> int:
        return self.sizes[-1]

    def takes_extend(self, prefix_lens: list[int], seq_lens: list[int], max_tokens: int) -> bool:
        """Whether an extend step runs as decode rows of a graph: at most ``max_tokens`` new tokens
        (and the largest graph) whose rows read at most EXTEND_MAX_KEY_READS keys."""
        tokens = sum(seq_lens) - sum(prefix_lens)
        if tokens > min(max_tokens, self.max_bs):
            return False
        chunked = chunked_requests(prefix_lens, seq_lens, self.chunk_limit)
        # A chunk reads its keys once per block of rows, a decode row its own prefix.
        reads = sum(-(-(end - start) // CHUNK_ROWS_PER_KEY_READ) * end if chunk
                    else (end - start) * (start + end + 1) // 2 for start, end, chunk in zip(prefix_lens, seq_lens, chunked))
        return reads <= EXTEND_MAX_KEY_READS

    def _batch(self, bs: int, seq_lens_cpu: list[int] | None = None, shared_prefixes: tuple = (),
               chunked: bool = False) -> ForwardBatch:
        rows = GraphInputs(*(row[:bs] for row in self.buffers))
        seq_lens_cpu = seq_lens_cpu or [1] * bs
        # A decode step schedules one token per request: its length once in is seq_lens.
        return self.make_batch(mode=ForwardMode.DECODE, **rows._asdict(), prefix_lens=rows.seq_lens - 1,
                               seq_lens_cpu=seq_lens_cpu,
                               prefix_lens_cpu=[n - 1 for n in seq_lens_cpu], shared_prefixes=shared_prefixes,
                               row_chunks=chunk_tables(self.chunk_inputs, bs) if chunked else None)

    def _capture(self, bs: int, chunked: bool) -> None:
        batch = self._batch(bs, chunked=chunked)
        self.attn_backend.plan(batch)
        with self.primitives.side_stream():
            for _ in range(2):  # compile kernels and settle allocations outside the capture
                self.forward(batch)
        graph = self.primitives.new_graph()
        if not self.outputs:  # the largest size, captured first: its logits are the one buffer
            self.outputs[bs] = self.primitives.capture(graph, self.pool, lambda: self.forward(batch))
        else:
            # Every other graph writes its rows of that buffer: one copy of bs x vocab floats
            # instead of a buffer of its own (~5 GiB of logits for Llama-3.1-8B's 512-row graphs).
            # Safe because a step's logits are read before the next step replays any graph.
            shared = next(iter(self.outputs.values()))[:bs]
            self.outputs[bs] = self.primitives.capture(graph, self.pool, lambda: shared.copy_(self.forward(batch)))
        (self.chunk_graphs if chunked else self.graphs)[bs] = graph

    def replay(self, input_ids: list[int] | torch.Tensor, positions: list[int], out_cache_loc: torch.Tensor,
               req_pool_indices: list[int], seq_lens: list[int], fill_lens: list[int],
               shared_prefixes: tuple = (), chunks: list[tuple[int, int, int, int]] = ()) -> torch.Tensor:
        """Logits [len(input_ids), vocab] of one decode step (``len(input_ids) <= max_bs``).
        ``input_ids`` may already be on the device (an overlapped step's sampled ids). ``chunks``:
        an extend step's rows, its prefill chunks as ``row_chunks`` gives them."""
        bs = len(input_ids)
        size = next(s for s in self.sizes if s >= bs)
        # A fresh buffer per step (pinned on CUDA: the caching host allocator keeps it until its copy ran).
        host = torch.zeros(self.inputs.shape[0], size, dtype=torch.int64, pin_memory=self.inputs.is_cuda)
        staged = GraphInputs(*host)
        staged.seq_lens[bs:] = 1  # padding rows: sequence length 1, slot 0, request row 0, token 0
        staged.fill_lens[bs:] = 1
        on_host = not isinstance(input_ids, torch.Tensor)
        for row, values in ((staged.input_ids, input_ids if on_host else None), (staged.positions, positions),
                            (staged.req_pool_indices, req_pool_indices), (staged.seq_lens, seq_lens),
                            (staged.fill_lens, fill_lens)):
            if values is not None:
                row[:bs] = torch.tensor(values, dtype=torch.int64)
        self.inputs[:, :size].copy_(host, non_blocking=True)
        if not on_host:
            self.buffers.input_ids[:bs].copy_(input_ids)
        self.buffers.out_cache_loc[:bs].copy_(out_cache_loc)
        if chunks:
            self._stage_chunks(size, chunks)
        if self.attn_backend.plan_before_replay:
            self.attn_backend.plan(self._batch(size, list(seq_lens) + [1] * (size - bs), shared_prefixes, bool(chunks)))
        (self.chunk_graphs if chunks else self.graphs)[size].replay()
        return self.outputs[size][:bs]

    def _stage_chunks(self, size: int, chunks: list[tuple[int, int, int, int]]) -> None:
        """Write the chunk tables of a step of ``size`` rows (its padding rows: decode rows)."""
        host = chunk_inputs(chunks, size, pin_memory=self.inputs.is_cuda)
        self.chunk_inputs[:host.shape[0]].copy_(host, non_blocking=True)

"""CUDA graphs emulated on the CPU, so CI runs the decode graph runner (capture, replay, padding
rows, the extend steps replayed as rows: sglang_core/model_executor/cuda_graph.py) and the model
runner's graph paths without a GPU.

Capture runs the forward once, as a real capture does, and keeps the call and the tensor it
returned; the call reads the runner's static input buffers, as the captured kernels do. Replay
runs the call again and copies its result into that same tensor: whoever holds a view of a graph's
output or inputs sees what it would see with real graphs (the next replay overwrites it). Where the
emulation is looser than CUDA: a replay re-runs the forward's Python, so host-side reads during a
capture (``.item()``, which a real capture refuses) are not caught here.

Capturing needs an attention backend whose decode reads the batch only through device tensors;
torch_native's plan cuts its tables to the host-side lengths, so ``GraphSafeSdpa`` is torch_native
with such a decode, offered as the plugin ``graph_safe_sdpa`` while ``emulated_graphs()`` is open.
"""

from __future__ import annotations

import contextlib
from importlib.metadata import EntryPoint
from typing import Callable, Iterator

import pytest
import torch

from sglang_core import plugins as plugins_module
from sglang_core.hookspecs import hookimpl
from sglang_core.layers.attention import Attention, KVLayout
from sglang_core.model_executor.cuda_graph import GraphPrimitives
from sglang_core.model_executor.forward_batch import ForwardBatch, ForwardMode
from sglang_core.model_executor.runner import ModelRunner
from sglang_plugins.attention.torch_native.backend import TorchNativeBackend, attend

BACKEND = "graph_safe_sdpa"


class EmulatedGraph:
    """One captured step: the recorded forward and the output tensor its capture returned."""

    def __init__(self) -> None:
        self.run: Callable[[], torch.Tensor] | None = None
        self.output: torch.Tensor | None = None

    def replay(self) -> None:
        self.output.copy_(self.run())


class EmulatedGraphs(GraphPrimitives):
    """``GraphPrimitives`` on the CPU: no streams, no memory pool, graphs that re-run their forward."""

    def new_graph(self) -> EmulatedGraph:
        return EmulatedGraph()

    def pool_handle(self) -> None:
        return None

    @contextlib.contextmanager
    def side_stream(self) -> Iterator[None]:
        yield

    def capture(self, graph: EmulatedGraph, pool: None, run: Callable[[], torch.Tensor]) -> torch.Tensor:
        graph.run = run
        graph.output = run()
        return graph.output


class GraphSafeSdpa(TorchNativeBackend):
    """torch_native, but a decode row attends over its request's whole row of KV slots, the keys
    past its length (or outside its window) masked from its device-side ``seq_lens``. A row of a
    named chunk (``ForwardBatch.row_chunks``) takes its request row and length from its chunk's
    tables instead, so the graphs' chunk tables decide its keys."""

    cuda_graph_decode = True
    attends_row_chunks = True

    def plan(self, batch: ForwardBatch) -> None:
        if batch.mode is ForwardMode.EXTEND:  # decode plans nothing: a graph would freeze it
            super().plan(batch)

    def forward_decode(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor | None, layer: Attention,
                       batch: ForwardBatch) -> torch.Tensor:
        self.store_kv(k, v, layer, batch)
        spec = layer.spec
        table_rows, last = _rows_and_last_keys(batch)
        slots = batch.req_to_token[table_rows]  # [rows, context]
        key_pos = torch.arange(slots.shape[1], device=slots.device)
        last = last.unsqueeze(1)
        mask = key_pos <= last
        if spec.sliding_window is not None:
            mask &= key_pos > last - spec.sliding_window
        keys = self.kv_pool.k_buffer(layer.layer_id)[slots].transpose(1, 2).to(self.spec.dtype)
        if spec.kv_layout is KVLayout.LATENT:  # the values are the latents' first columns
            values = keys[..., :spec.v_head_dim]
        else:
            values = self.kv_pool.v_buffer(layer.layer_id)[slots].transpose(1, 2).to(self.spec.dtype)
        kv_heads = spec.num_kv_heads
        queries = q.view(-1, kv_heads, spec.num_heads // kv_heads, spec.head_dim)
        return attend(queries, keys, values, spec, mask[:, None, None, :]).reshape(q.shape[0], -1)


def _rows_and_last_keys(batch: ForwardBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's request row and last key: a chunk's row i is its request's token prefix + i."""
    if batch.row_chunks is None:
        return batch.req_pool_indices, batch.seq_lens - 1
    chunks = batch.row_chunks
    rows = torch.arange(batch.input_ids.shape[0], device=batch.input_ids.device).unsqueeze(1)
    ends = chunks.first_rows + chunks.seq_lens - chunks.prefix_lens
    inside = (rows >= chunks.first_rows) & (rows < ends)  # [rows, chunks]
    chunk = inside.int().argmax(1)
    in_chunk = inside.any(1)
    last_in_chunk = chunks.prefix_lens[chunk] + rows[:, 0] - chunks.first_rows[chunk]
    return (torch.where(in_chunk, chunks.req_pool_indices[chunk], batch.req_pool_indices),
            torch.where(in_chunk, last_in_chunk, batch.seq_lens - 1))


@hookimpl
def register_attention_backends(register) -> None:
    register(BACKEND, f"{__name__}:GraphSafeSdpa", priority=-1)


@contextlib.contextmanager
def emulated_graphs() -> Iterator[None]:
    """While open, a CPU engine being built captures its decode graphs as ``EmulatedGraph`` and
    may pick the attention backend ``graph_safe_sdpa``. Only the building reads either, so the
    engine keeps its graphs after the block and nothing outlives it."""
    installed = plugins_module.discover
    plugin = EntryPoint(BACKEND, __name__, plugins_module.ENTRY_POINT_GROUP)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ModelRunner, "_off_cuda_graphs", EmulatedGraphs())
        patch.setattr(plugins_module, "discover", lambda: {**installed(), BACKEND: plugin})
        yield

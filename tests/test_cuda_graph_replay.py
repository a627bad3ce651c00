"""The decode graphs' capture and replay (sglang_core/model_executor/cuda_graph.py) and the model
runner's graph paths, run on the CPU through emulated graphs (tests/graph_emulation.py): a replay
re-runs the captured forward over the runner's static buffers and writes into the tensor its
capture returned, so what the graphs read and keep is what they would on a GPU.

The engines capture batch sizes 1, 2, 4 and 8; their requests stop at different lengths, so the
decode batch shrinks through 3 (a padded graph), and every prefill chunk (8 tokens) replays as
decode rows (``--extend-graph-max-tokens``), also with a running request's decode riding along
(``--max-step-tokens``); those rows replay the graphs captured with row chunks, each chunk's rows
attended from its chunk's tables (graph_emulation.GraphSafeSdpa). Greedy tokens and logprobs must
be the reference model's (float32, recomputed from scratch each step), with the overlapped
schedule and without."""

from __future__ import annotations

import pytest
import torch

from graph_emulation import BACKEND, EmulatedGraphs, emulated_graphs
from sglang_core.engine import Engine
from sglang_core.model_executor.cuda_graph import CudaGraphRunner, chunk_tables
from sglang_core.model_executor.forward_batch import ForwardBatch
from test_model_contract import CASES, _build, _reference_greedy

CHUNK = 8
MAX_BS = 8  # captured sizes 1, 2, 4, 8
NEW_TOKENS = [12, 3, 8, 5]  # per prompt: the decode batch runs 4, 3 (padded to 4), 2, 1 rows


class PlannedLengths:
    """An attention backend planned on the host before each replay (as FlashInfer is): ``plan``
    copies the batch's host-side lengths into a fixed buffer the captured forward reads."""

    cuda_graph_decode = True
    plan_before_replay = True

    def __init__(self, max_bs: int):
        self.lengths = torch.zeros(max_bs, dtype=torch.int64)

    def plan(self, batch: ForwardBatch) -> None:
        self.lengths[:batch.batch_size] = torch.tensor(batch.seq_lens_cpu)


def test_replay_fills_rows_and_pads_with_the_padding_slot():
    """The captured forward writes each row's token into a stand-in KV pool at its slot and returns
    its inputs as logits. Padding rows must read token 0, position 0, request row 0, length 1, slot 0
    (not the last step's values), and so write nothing but slot 0."""
    pool = torch.full((32,), -1, dtype=torch.int64)
    backend = PlannedLengths(MAX_BS)

    def forward(batch: ForwardBatch) -> torch.Tensor:
        pool[batch.out_cache_loc] = batch.input_ids
        planned = backend.lengths[:batch.batch_size]
        return torch.stack([batch.input_ids, batch.positions, batch.out_cache_loc, batch.req_pool_indices,
                            batch.seq_lens, batch.fill_lens, planned], dim=1)

    def make_batch(**fields) -> ForwardBatch:
        return ForwardBatch(req_to_token=torch.zeros(8, 64, dtype=torch.int64), **fields)

    graphs = CudaGraphRunner(forward, make_batch, backend, MAX_BS, torch.device("cpu"), EmulatedGraphs())
    assert graphs.sizes == [1, 2, 4, 8]
    four = graphs.replay([11, 12, 13, 14], [4, 5, 6, 7], torch.tensor([21, 22, 23, 24]), [1, 2, 3, 4],
                         [5, 6, 7, 8], [9, 9, 9, 9])
    assert four.tolist() == [[11, 4, 21, 1, 5, 9, 5], [12, 5, 22, 2, 6, 9, 6], [13, 6, 23, 3, 7, 9, 7],
                             [14, 7, 24, 4, 8, 9, 8]]
    pool[24] = -2  # slot 24 freed and taken by another request since
    three = graphs.replay(torch.tensor([15, 16, 17]), [8, 9, 10], torch.tensor([25, 26, 27]), [1, 2, 3],
                          [9, 10, 11], [12, 12, 12])
    assert three.tolist() == [[15, 8, 25, 1, 9, 12, 9], [16, 9, 26, 2, 10, 12, 10], [17, 10, 27, 3, 11, 12, 11]]
    assert graphs.outputs[4][3].tolist() == [0, 0, 0, 0, 1, 1, 1]  # the padding row, dropped
    assert pool[24] == -2 and pool[0] == 0
    # Like a real graph's, the first replay's logits are the graph's output: the second overwrote them.
    assert four[:3].equal(three)


@pytest.fixture(scope="module", params=["llama", "mistral-window", "phi3-longrope-long"])
def served(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    model, prompts = _build(request.param, folder)
    with emulated_graphs():
        engine = Engine(str(folder), device="cpu", attention_backend=BACKEND, chunked_prefill_size=CHUNK,
                        cuda_graph_max_bs=MAX_BS, extend_graph_max_tokens=CHUNK, **CASES[request.param].engine)
    # A second set for the second test (the first's prompts would come from the prefix cache).
    prompt_sets = {"plain": prompts, "overlapped": [prompt[::-1] for prompt in prompts]}
    references = {name: [_reference_greedy(model, prompt, n) for prompt, n in zip(ps, NEW_TOKENS)]
                  for name, ps in prompt_sets.items()}
    yield engine, prompt_sets, references
    engine.shutdown()


@pytest.fixture
def replayed_rows(served, monkeypatch):
    """(rows, rows staged as a chunk's) of each graph replay of the served engine (this test's only)."""
    return _record_replays(served[0], monkeypatch)


def _record_replays(engine: Engine, monkeypatch) -> list[tuple[int, int]]:
    graphs = engine.core.core.runner.cuda_graphs
    replays = []
    replay = graphs.replay

    def recorded(input_ids, *args, **kwargs) -> torch.Tensor:
        out = replay(input_ids, *args, **kwargs)
        staged = chunk_tables(graphs.chunk_inputs, len(input_ids)).in_chunk
        replays.append((len(input_ids), int(staged.sum()) if kwargs.get("chunks") else 0))
        return out

    monkeypatch.setattr(graphs, "replay", recorded)
    return replays


def _generate(engine: Engine, prompts: list[list[int]], return_logprob: bool) -> list[dict]:
    params = [{"temperature": 0, "ignore_eos": True, "max_new_tokens": n} for n in NEW_TOKENS]
    return engine.generate(input_ids=prompts, sampling_params=params, return_logprob=return_logprob)


def _check_replays(replays: list[tuple[int, int]], requests: int) -> None:
    rows = [n for n, _ in replays]
    assert 3 in rows  # a padded decode
    assert max(rows) > requests  # more rows than requests: prefill chunks ran as rows
    assert max(in_chunks for _, in_chunks in replays) == CHUNK  # a chunk graph attended a whole chunk


def test_graphs_give_the_reference_tokens_and_logprobs(served, replayed_rows):
    """Logprobs are read back every step: the plain schedule."""
    engine, prompt_sets, references = served
    prompts = prompt_sets["plain"]
    results = _generate(engine, prompts, return_logprob=True)
    _check_replays(replayed_rows, len(prompts))
    for prompt, result, (tokens, logprobs) in zip(prompts, results, references["plain"]):
        assert result["output_ids"] == tokens, f"prompt of {len(prompt)} tokens"
        got = [logprob for logprob, _token, _text in result["meta_info"]["output_token_logprobs"]]
        assert got == pytest.approx(logprobs, abs=1e-4), f"prompt of {len(prompt)} tokens"
    engine.check_memory()


def test_overlapped_graphs_give_the_reference_tokens(served, replayed_rows):
    """Overlapped decode (on wherever graphs are) feeds each step the last one's ids on the device."""
    engine, prompt_sets, references = served
    prompts = prompt_sets["overlapped"]
    overlapped = engine.stats()["overlapped_steps"]
    results = _generate(engine, prompts, return_logprob=False)
    assert engine.stats()["overlapped_steps"] > overlapped
    _check_replays(replayed_rows, len(prompts))
    for prompt, result, (tokens, _) in zip(prompts, results, references["overlapped"]):
        assert result["output_ids"] == tokens, f"prompt of {len(prompt)} tokens"
    engine.check_memory()


def test_decodes_riding_along_a_chunk_replay_as_rows_with_it(tmp_path, monkeypatch):
    """--max-step-tokens (the rows policies of benchmarks/itl_sweep.py): every step carrying prefill
    holds the running requests' decodes first, so the replayed rows mix a decode row with a prefill
    chunk's rows. The first prompt is decoding before the others are prefilled: its tokens and
    everyone's must still be the reference's."""
    from sglang_core.model_executor import runner as runner_module

    model, prompts = _build("llama", tmp_path)
    replayed = []
    as_decode_rows = runner_module.as_decode_rows
    monkeypatch.setattr(runner_module, "as_decode_rows", lambda step: replayed.append(step) or as_decode_rows(step))
    with emulated_graphs():
        engine = Engine(str(tmp_path), device="cpu", attention_backend=BACKEND, chunked_prefill_size=CHUNK,
                        cuda_graph_max_bs=2 * CHUNK, extend_graph_max_tokens=2 * CHUNK, max_step_tokens=CHUNK + 4,
                        **CASES["llama"].engine)
    replays = _record_replays(engine, monkeypatch)
    with engine:
        results = _generate(engine, prompts, return_logprob=True)
        engine.check_memory()
    assert any(0 < in_chunks < rows for rows, in_chunks in replays), replays  # a chunk graph with a decode row
    extend_lens = [[end - start for start, end in zip(step.prefix_lens, step.seq_lens)] for step in replayed]
    assert any(1 in lens and max(lens) > 1 for lens in extend_lens), extend_lens  # a decode beside a chunk
    for prompt, result, n in zip(prompts, results, NEW_TOKENS):
        tokens, logprobs = _reference_greedy(model, prompt, n)
        assert result["output_ids"] == tokens, f"prompt of {len(prompt)} tokens"
        got = [logprob for logprob, _token, _text in result["meta_info"]["output_token_logprobs"]]
        assert got == pytest.approx(logprobs, abs=1e-4), f"prompt of {len(prompt)} tokens"

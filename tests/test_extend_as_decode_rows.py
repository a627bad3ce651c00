"""Extend steps replayed through the decode graphs (``cuda_graph.decode_rows``,
``runner.as_decode_rows``): each new token of a prefill chunk becomes a decode row of its own whose
sequence ends at it. Here the engine runs EVERY extend step as decode rows through the eager
decode path (tests/test_cuda_graph_replay.py replays them through emulated graphs); its greedy
tokens and logprobs must still be the reference model's (float32, recomputed from scratch each
step), over batched prompts, prefill chunks, cached prefixes, sliding windows, LongRoPE (which
chooses factors by the whole prompt's length) and latent attention (absorbed decode)."""

from __future__ import annotations

import pytest
import torch

from sglang_core.engine import Engine
from sglang_core.model_executor import runner as runner_module
from sglang_core.model_executor.cuda_graph import (EXTEND_MAX_KEY_READS, MAX_ROW_CHUNKS, CudaGraphRunner, chunk_inputs,
                                                   chunk_tables, decode_rows, row_chunks)
from sglang_core.model_executor.forward_batch import ForwardMode
from test_model_contract import CASES, CHUNK, NEW_TOKENS, _build, _reference_greedy, serve_case

ROW_CASES = ["llama", "mistral-window", "gemma2", "phi3-longrope-long", "deepseek-v2"]


def test_decode_rows_end_each_sequence_at_its_token():
    rows, lens, fills = decode_rows([4, 7], [0, 5], [3, 7], [3, 9])
    assert rows == [4, 4, 4, 7, 7]
    assert lens == [1, 2, 3, 6, 7]
    assert fills == [3, 3, 3, 9, 9]


def test_only_small_extends_take_the_graphs():
    graphs = CudaGraphRunner.__new__(CudaGraphRunner)
    graphs.sizes = [1, 2, 4, 8, 16]
    graphs.chunk_limit = 0  # no chunk graphs: every row reads its own prefix
    assert graphs.takes_extend([0, 10], [8, 18], max_tokens=16)
    assert not graphs.takes_extend([0, 10], [9, 18], max_tokens=16)  # 17 tokens: past the largest graph
    assert not graphs.takes_extend([0], [8], max_tokens=4)  # past the setting
    long_prefix = EXTEND_MAX_KEY_READS // 4
    assert not graphs.takes_extend([long_prefix], [long_prefix + 4], max_tokens=16)  # too many key reads
    graphs.chunk_limit = 1  # a chunk reads its keys once per block of rows
    assert graphs.takes_extend([long_prefix], [long_prefix + 4], max_tokens=16)
    # a second chunk past the limit: its rows read their prefixes
    assert not graphs.takes_extend([long_prefix, long_prefix], [long_prefix + 4, long_prefix + 4], max_tokens=16)


def test_row_chunks_name_each_prefill_chunk_up_to_the_limit():
    """(request row, sequence length, prefix length, first row) of each request with more than one
    new token among the rows, in order, up to the limit; the staged tables as a graph reads them."""
    chunks = row_chunks([4, 7, 2, 9, 5], [0, 5, 3, 0, 8], [3, 6, 7, 2, 9], limit=2)
    assert chunks == [(4, 3, 0, 0), (2, 7, 3, 4)]  # 7 is a decode; 9 is past the limit
    tables = chunk_tables(chunk_inputs(chunks, 12), 12)
    assert tables.req_pool_indices.tolist() == [4, 2] + [0] * (MAX_ROW_CHUNKS - 2)
    assert tables.seq_lens.tolist() == [3, 7] + [0] * (MAX_ROW_CHUNKS - 2)
    assert tables.prefix_lens.tolist() == [0, 3] + [0] * (MAX_ROW_CHUNKS - 2)
    assert tables.first_rows.tolist() == [0, 4] + [0] * (MAX_ROW_CHUNKS - 2)
    assert tables.in_chunk.tolist() == [1, 1, 1, 0, 1, 1, 1, 1, 0, 0, 0, 0]


@pytest.fixture(scope="module", params=ROW_CASES)
def served(request, tmp_path_factory):
    yield from serve_case(request.param, tmp_path_factory)


@pytest.fixture
def served_as_rows(served, monkeypatch):
    """The engine with every extend step run as decode rows (for this test only: a module-wide
    patch would outlive the module's tests), and the sizes of those steps."""
    forward_local = runner_module.ModelRunner.forward_local
    extends = []

    def rows_for_extends(self, step):
        if step.mode is ForwardMode.EXTEND:
            extends.append(len(step.input_ids))
            step = runner_module.as_decode_rows(step)
        return forward_local(self, step)

    monkeypatch.setattr(runner_module.ModelRunner, "forward_local", rows_for_extends)
    return (*served, extends)


def test_rows_give_the_reference_tokens_and_logprobs(served_as_rows):
    model, engine, prompts, extends = served_as_rows
    results = engine.generate(input_ids=prompts, sampling_params={"temperature": 0, "ignore_eos": True,
                                                                  "max_new_tokens": NEW_TOKENS}, return_logprob=True)
    assert max(extends) > 1  # prefill chunks did run as rows
    for prompt, result in zip(prompts, results):
        tokens, logprobs = _reference_greedy(model, prompt, NEW_TOKENS)
        assert result["output_ids"] == tokens, f"prompt of {len(prompt)} tokens"
        got = [logprob for logprob, _token, _text in result["meta_info"]["output_token_logprobs"]]
        assert got == pytest.approx(logprobs, abs=1e-4), f"prompt of {len(prompt)} tokens"
    prompt = prompts[3] + [5, 6, 7]  # its prefix is cached now: the rows start past it
    result = engine.generate(input_ids=prompt, return_logprob=True, logprob_start_len=len(prompts[3]) - 2,
                             sampling_params={"temperature": 0, "ignore_eos": True, "max_new_tokens": 4})
    assert result["meta_info"]["cached_tokens"] >= CHUNK
    ids = prompt + result["output_ids"]
    with torch.no_grad():
        out = model(torch.tensor([ids]))
    logits = getattr(out, "logits", out)[0, :-1].float()
    expected = torch.log_softmax(logits, dim=-1).gather(1, torch.tensor(ids[1:])[:, None]).squeeze(1)
    meta = result["meta_info"]
    got = [lp for lp, _, _ in meta["input_token_logprobs"] + meta["output_token_logprobs"]]
    torch.testing.assert_close(torch.tensor(got), expected[len(prompts[3]) - 3:], atol=1e-4, rtol=1e-4)
    engine.check_memory()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("name", ROW_CASES)
def test_gpu_graph_extends_match_reference(name: str, tmp_path) -> None:
    """On a GPU, float32 (the Triton backend: FlashInfer has no float32 kernels): prefill chunks
    replay the decode graphs captured with row chunks (every extend step here is small enough: each
    chunk attended by the extend kernel, the decodes beside it by the decode kernel) and give the
    reference's greedy tokens."""
    model, prompts = _build(name, tmp_path)
    model = model.cuda()
    rows = []
    as_decode_rows = runner_module.as_decode_rows
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(runner_module, "as_decode_rows", lambda step: rows.append(step) or as_decode_rows(step))
        with Engine(str(tmp_path), device="cuda", dtype="float32", attention_backend="triton",
                    chunked_prefill_size=CHUNK, cuda_graph_max_bs=64, extend_graph_max_tokens=64,
                    **CASES[name].engine) as engine:
            results = engine.generate(input_ids=prompts, sampling_params={"temperature": 0, "ignore_eos": True,
                                                                          "max_new_tokens": NEW_TOKENS})
            engine.check_memory()
            assert engine.core.core.runner.cuda_graphs.chunk_graphs, "no graph was captured with row chunks"
    assert rows, "no extend step replayed the graphs"
    for prompt, result in zip(prompts, results):
        assert result["output_ids"] == _reference_greedy(model, prompt, NEW_TOKENS)[0], f"prompt of {len(prompt)} tokens"

"""Every model plugin's contract on the CPU, for each architecture in tests/model_contract.py:
greedy tokens equal to an independent float32 reference (transformers, or a model written in
tests/ from the public definition), for a batch of prompts longer than any sliding window and
than a prefill chunk, and again when a later request reuses a cached prefix. Checkpoints are
saved sharded, with an index, as real ones are."""

from __future__ import annotations

import json
import random

import pytest
import torch
from safetensors.torch import save_file

from model_contract import CASES
from reference import byte_level_tokenizer
from sglang_core.engine import Engine

NEW_TOKENS = 12
CHUNK = 16


def _randomize(model: torch.nn.Module, seed: int) -> None:
    """Matrices drawn N(0, 0.1) (wider than usual, so greedy choices are no near-ties); vectors
    (norm scales, biases) moved by N(0, 0.1) from their init, so every one of them matters."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.1)
            else:
                p.add_(torch.randn_like(p) * 0.1)


def _save(folder, config, model) -> None:
    """The folder a real checkpoint is: config.json, safetensors shards and their index, a tokenizer."""
    if not getattr(config, "architectures", None):  # a custom-code reference's config names its own
        config.architectures = [type(model).__name__]
    config.save_pretrained(folder)
    state = {}
    seen = set()
    for name, tensor in model.state_dict().items():
        if tensor.data_ptr() in seen:  # a tied head: real checkpoints store the table once
            continue
        seen.add(tensor.data_ptr())
        state[name] = tensor.contiguous()
    names = sorted(state)
    shards = [names[i::3] for i in range(3)]
    index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in state.values())}, "weight_map": {}}
    for i, shard in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file({n: state[n] for n in shard}, str(folder / file), metadata={"format": "pt"})
        index["weight_map"].update({n: file for n in shard})
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    byte_level_tokenizer().save_pretrained(folder)


def _reference_greedy(model, prompt: list[int], n: int) -> tuple[list[int], list[float]]:
    """Greedy continuation and each chosen token's log-probability, by recomputing the whole
    sequence each step (no cache to get wrong)."""
    ids, logprobs = list(prompt), []
    with torch.no_grad():
        for _ in range(n):
            out = model(torch.tensor([ids]))
            logits = getattr(out, "logits", out)[0, -1].float()
            ids.append(int(logits.argmax()))
            logprobs.append(torch.log_softmax(logits, -1)[ids[-1]].item())
    return ids[len(prompt):], logprobs


@pytest.fixture(scope="module", params=sorted(CASES))
def served(request, tmp_path_factory):
    case = CASES[request.param]
    config, model = case.make()
    model = model.float().eval()
    _randomize(model, seed=sorted(CASES).index(request.param))
    folder = tmp_path_factory.mktemp(request.param)
    _save(folder, config, model)
    rng = random.Random(request.param)
    vocab = config.vocab_size
    prefix = [rng.randrange(3, vocab) for _ in range(9)]
    longest = max(70, 3 * (case.window or 0))
    prompts = [[rng.randrange(3, vocab) for _ in range(3)], prefix + [rng.randrange(3, vocab) for _ in range(12)],
               prefix + [rng.randrange(3, vocab) for _ in range(36)], [rng.randrange(3, vocab) for _ in range(longest)]]
    engine = Engine(str(folder), chunked_prefill_size=CHUNK, **case.engine)
    yield model, engine, prompts
    engine.shutdown()


def test_batched_greedy_matches_reference(served):
    model, engine, prompts = served
    results = engine.generate(input_ids=prompts, sampling_params={"temperature": 0, "ignore_eos": True,
                                                                  "max_new_tokens": NEW_TOKENS}, return_logprob=True)
    for prompt, result in zip(prompts, results):
        ids, logprobs = _reference_greedy(model, prompt, NEW_TOKENS)
        assert result["output_ids"] == ids, f"prompt of {len(prompt)} tokens"
        # Greedy choices ignore a positive scale on the logits; their log-probabilities do not.
        ours = [lp for lp, _, _ in result["meta_info"]["output_token_logprobs"]]
        assert ours == pytest.approx(logprobs, abs=1e-4), f"logprobs, prompt of {len(prompt)} tokens"
    engine.check_memory()


def test_cached_prefix_matches_reference(served):
    """A request extending one already served takes its prefix from the cache, and decodes alike."""
    model, engine, prompts = served
    prompt = prompts[3] + [5, 6, 7, 8, 9]
    result = engine.generate(input_ids=prompt, sampling_params={"temperature": 0, "ignore_eos": True,
                                                                "max_new_tokens": NEW_TOKENS})
    assert result["meta_info"]["cached_tokens"] >= CHUNK
    assert result["output_ids"] == _reference_greedy(model, prompt, NEW_TOKENS)[0]
    engine.check_memory()

"""Every model plugin's contract on the CPU, for each architecture in tests/model_contract.py:
greedy tokens equal to an independent float32 reference (transformers, or a model written in
tests/ from the public definition), for a batch of prompts longer than any sliding window and
than a prefill chunk, and again when a later request reuses a cached prefix. Checkpoints are
saved sharded, with an index, as real ones are."""

from __future__ import annotations

import json
import random
import zlib

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
    (biases) and norm scales (initialised to ones, per-head ones [heads, head_dim] too) moved by
    N(0, 0.1) from their init, so every one of them matters; so is a router's
    ``e_score_correction_bias`` (a buffer in transformers)."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2 and not bool((p == 1).all()):
                p.normal_(0, 0.1)
            else:
                p.add_(torch.randn_like(p) * 0.1)
        for name, buffer in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buffer.add_(torch.randn_like(buffer) * 0.1)


def _save(folder, config, model) -> None:
    """The folder a real checkpoint is: config.json, safetensors shards and their index, a tokenizer."""
    if not getattr(config, "architectures", None):  # a custom-code reference's config names its own
        config.architectures = [type(model).__name__]
    config.save_pretrained(folder)
    state = {}
    seen = set()
    for name, tensor in model.state_dict().items():
        # A tied head: real checkpoints store the table once (empty tensors all share address 0).
        if tensor.numel() and tensor.data_ptr() in seen:
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
    """Greedy continuation and each chosen token's logprob, by recomputing the whole sequence each
    step (no cache to get wrong)."""
    ids, logprobs = list(prompt), []
    with torch.no_grad():
        for _ in range(n):
            out = model(torch.tensor([ids], device=next(model.parameters()).device))
            logits = getattr(out, "logits", out)[0, -1].float()
            ids.append(int(logits.argmax()))
            logprobs.append(torch.log_softmax(logits, dim=-1)[ids[-1]].item())
    return ids[len(prompt):], logprobs


def _build(name: str, folder) -> tuple[torch.nn.Module, list[list[int]]]:
    """The case's reference model (float32, randomised, saved to ``folder`` as a checkpoint) and
    its prompts: short, sharing a prefix, and one longer than a prefill chunk and any window."""
    case = CASES[name]
    config, model = case.make()
    model = model.float().eval()
    _randomize(model, seed=zlib.crc32(name.encode()))  # by name: adding a case changes no other's weights
    _save(folder, config, model)
    rng = random.Random(name)
    vocab = config.vocab_size
    prefix = [rng.randrange(3, vocab) for _ in range(9)]
    longest = max(70, 3 * (case.window or 0))
    prompts = [[rng.randrange(3, vocab) for _ in range(3)], prefix + [rng.randrange(3, vocab) for _ in range(12)],
               prefix + [rng.randrange(3, vocab) for _ in range(36)], [rng.randrange(3, vocab) for _ in range(longest)]]
    return model, prompts


def serve_case(name: str, tmp_path_factory):
    """The case's reference model, a CPU engine on its saved checkpoint, and its prompts; shuts
    the engine down when the caller's fixture ends."""
    folder = tmp_path_factory.mktemp(name)
    model, prompts = _build(name, folder)
    engine = Engine(str(folder), device="cpu", chunked_prefill_size=CHUNK, **CASES[name].engine)
    yield model, engine, prompts
    engine.shutdown()


@pytest.fixture(scope="module", params=sorted(CASES))
def served(request, tmp_path_factory):
    yield from serve_case(request.param, tmp_path_factory)


def test_batched_greedy_matches_reference(served):
    """Tokens and their logprobs: a scale on the logits (Command-R's ``logit_scale``) keeps every
    argmax, so only the logprobs show it."""
    model, engine, prompts = served
    results = engine.generate(input_ids=prompts, sampling_params={"temperature": 0, "ignore_eos": True,
                                                                  "max_new_tokens": NEW_TOKENS}, return_logprob=True)
    for prompt, result in zip(prompts, results):
        tokens, logprobs = _reference_greedy(model, prompt, NEW_TOKENS)
        assert result["output_ids"] == tokens, f"prompt of {len(prompt)} tokens"
        got = [logprob for logprob, _token, _text in result["meta_info"]["output_token_logprobs"]]
        assert got == pytest.approx(logprobs, abs=1e-4), f"prompt of {len(prompt)} tokens"
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


def test_logprobs_match_reference(served):
    """Prompt and output logprobs equal the reference's log-softmax at every position (through the
    prefill chunks and past any window): changes greedy choices cannot show, such as a final
    logit soft-cap or scale, show here."""
    model, engine, prompts = served
    prompt = prompts[3]
    result = engine.generate(input_ids=prompt, return_logprob=True, logprob_start_len=0,
                             sampling_params={"temperature": 0, "ignore_eos": True, "max_new_tokens": 4})
    meta = result["meta_info"]
    ids = prompt + result["output_ids"]
    with torch.no_grad():
        out = model(torch.tensor([ids]))
    logits = getattr(out, "logits", out)[0, :-1].float()
    expected = torch.log_softmax(logits, dim=-1).gather(1, torch.tensor(ids[1:])[:, None]).squeeze(1)
    got = [lp for lp, _, _ in meta["input_token_logprobs"][1:] + meta["output_token_logprobs"]]
    torch.testing.assert_close(torch.tensor(got), expected, atol=1e-4, rtol=1e-4)
    engine.check_memory()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("name", sorted(CASES))
def test_gpu_triton_matches_reference(name: str, tmp_path) -> None:
    """On a GPU, in float32: the Triton attention kernels, the fused layer kernels and CUDA graphs
    give every family the reference's greedy tokens (the reference on the GPU too)."""
    model, prompts = _build(name, tmp_path)
    model = model.cuda()
    with Engine(str(tmp_path), device="cuda", dtype="float32", attention_backend="triton",
                chunked_prefill_size=CHUNK, cuda_graph_max_bs=8, **CASES[name].engine) as engine:
        results = engine.generate(input_ids=prompts, sampling_params={"temperature": 0, "ignore_eos": True,
                                                                      "max_new_tokens": NEW_TOKENS})
        engine.check_memory()
    for prompt, result in zip(prompts, results):
        expected = _reference_greedy(model, prompt, NEW_TOKENS)[0]
        assert result["output_ids"] == expected, f"prompt of {len(prompt)} tokens"

"""Independent references: tiny random Hugging Face models and transformers' own generate."""

from __future__ import annotations

from pathlib import Path

import torch


def byte_level_tokenizer():
    """A 259-token byte-level tokenizer (3 specials + 256 bytes), enough to encode any text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def save_tiny_model(folder: Path, config, model_cls, seed: int = 0) -> Path:
    """Random weights of ``config`` saved as a Hugging Face folder with a byte-level tokenizer.

    Weights are drawn wider than the usual 0.02 so greedy choices are not near-ties that float
    rounding differences could flip.
    """
    torch.manual_seed(seed)
    model = model_cls(config).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.normal_(0, 0.1)
    model.save_pretrained(folder)
    byte_level_tokenizer().save_pretrained(folder)
    return folder


def hf_causal_lm(folder: str | Path):
    """A model folder in HF transformers, float32, eval mode. A GGUF model's folder (config,
    tokenizer and a ``model.gguf`` link, as the default model's) loads through transformers' own
    GGUF reader, an independent dequantize/rename/un-permute path."""
    from transformers import AutoModelForCausalLM

    from sglang_core.weights.gguf_convert import GGUF_LINK

    gguf = {"gguf_file": GGUF_LINK} if (Path(folder) / GGUF_LINK).exists() else {}
    return AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32, **gguf).eval()


def hf_greedy(model, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    """The reference: transformers' own greedy generate, EOS ignored."""
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt_ids]), attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
                             max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, do_sample=False,
                             eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt_ids):].tolist()


def hf_greedy_logprobs(model, inputs, max_new_tokens: int) -> tuple[list[int], list[float]]:
    """transformers' greedy generate (EOS ignored) on a processor's inputs for one prompt: the new
    tokens and their logprobs."""
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, do_sample=False,
                             eos_token_id=None, pad_token_id=0, output_logits=True, return_dict_in_generate=True)
    tokens = out.sequences[0, inputs["input_ids"].shape[1]:].tolist()
    return tokens, [float(torch.log_softmax(step[0].float(), -1)[t]) for step, t in zip(out.logits, tokens)]


def hf_choice_logprobs(hf, tokenizer, prompt: str, choice: str) -> tuple[list[float], list[float]]:
    """Logprobs of ``choice``'s tokens after ``prompt`` (where the joint tokenization leaves the
    prompt's own, never at position 0) and of the same tokens alone, without the prompt (the
    first has none: 0.0, as SGLang's unconditional_likelihood_normalized counts it)."""
    prompt_ids = tokenizer(prompt)["input_ids"]
    ids = tokenizer(prompt + choice)["input_ids"]
    start = next((i for i, (a, b) in enumerate(zip(prompt_ids, ids)) if a != b), min(len(prompt_ids), len(ids)))
    start = max(1, min(start, len(ids) - 1))

    def logprobs(seq: list[int], first: int) -> list[float]:
        with torch.no_grad():
            table = torch.log_softmax(hf(torch.tensor([seq])).logits[0].float(), dim=-1)
        return [float(table[p - 1, seq[p]]) for p in range(first, len(seq))]

    return logprobs(ids, start), [0.0] + logprobs(ids[start:], 1)


def expected_choice(method: str, conditional: list[list[float]], unconditional: list[list[float]]) -> int:
    """The index SGLang's choices method picks, computed directly from the logprobs."""
    mean = [sum(lps) / len(lps) for lps in conditional]
    if method == "token_length_normalized":
        scores = mean
    elif method == "unconditional_likelihood_normalized":
        scores = [sum(c - u for c, u in zip(cs, us)) / len(cs) for cs, us in zip(conditional, unconditional)]
    else:  # greedy_token_selection: first token, ties (within 1e-4 nats) to the next; a shorter choice
        # goes on at its mean
        width = max(map(len, conditional))
        rows = [lps + [m] * (width - len(lps)) for lps, m in zip(conditional, mean)]
        alive = list(range(len(rows)))
        for column in range(width):
            top = max(rows[i][column] for i in alive)
            alive = [i for i in alive if top - rows[i][column] <= 1e-4]
        return alive[0]
    return max(range(len(scores)), key=lambda i: (scores[i], -i))


CONSTRAINED_SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 8}, "count": {"type": "integer", "minimum": 0, "maximum": 99},
    "colour": {"enum": ["red", "green", "blue"]}}, "required": ["name", "count", "colour"],
    "additionalProperties": False}
CONSTRAINED_REGEX = r"[a-z]{2,6}@[a-z]{2,5}\.(com|org)"


def constrained_requests() -> list[dict]:
    """Sampling parameters for the overlapped-schedule tests, 16 requests that share batches:
    greedy and seeded sampling; JSON with fixed keys (jump-forward) and a regex; and the
    processors that read token history or per-request tables (penalties, min_new_tokens,
    logit bias), with and without a constraint."""
    import json

    schema = json.dumps(CONSTRAINED_SCHEMA)
    kinds = [{"json_schema": schema}, {"regex": CONSTRAINED_REGEX},
             {"regex": CONSTRAINED_REGEX, "repetition_penalty": 1.3}, {"ignore_eos": True},
             {"json_schema": schema, "frequency_penalty": 0.5, "presence_penalty": 0.3}, {"min_new_tokens": 20},
             {"logit_bias": {"65": 4.0}, "ignore_eos": True}, {"regex": CONSTRAINED_REGEX, "logit_bias": {"98": 2.0}}]
    return [{"max_new_tokens": 80, "seed": i, "temperature": 0 if i % 2 else 1.0, **kinds[i % len(kinds)]}
            for i in range(16)]


def check_constrained(params: dict, text: str) -> None:
    import json
    import re

    import jsonschema

    if "json_schema" in params:
        jsonschema.validate(json.loads(text), CONSTRAINED_SCHEMA)
    elif "regex" in params:
        assert re.fullmatch(CONSTRAINED_REGEX, text), text


def check_stops_and_aborts(engine, prompts: list[list[int]]) -> None:
    """Stop tokens, max_new_tokens and abandoned requests (every fourth) land while decode steps
    are in flight; outputs stop where they should, and afterwards every KV slot and request row
    is free or cached exactly once."""
    import asyncio
    import time

    stops = (7, 11, 13)

    async def one(i: int) -> dict | None:
        params = {"temperature": 1.0, "seed": i, "max_new_tokens": 5 + 3 * i, "stop_token_ids": list(stops)}
        if i % 4 == 3:  # abandoned mid-generation
            task = asyncio.ensure_future(engine.async_generate(input_ids=prompts[i], sampling_params=params))
            await asyncio.sleep(0.01)
            task.cancel()
            return None
        return await engine.async_generate(input_ids=prompts[i], sampling_params=params)

    async def all_requests() -> list:
        return await asyncio.gather(*(one(i) for i in range(len(prompts))), return_exceptions=True)

    results = asyncio.run(all_requests())
    deadline = time.monotonic() + 10  # the engine thread aborts abandoned requests
    while engine.memory_report()["running"] and time.monotonic() < deadline:
        time.sleep(0.05)
    engine.check_memory()
    for i, res in enumerate(results):
        if i % 4 != 3:
            out = res["output_ids"]
            assert len(out) <= 5 + 3 * i and all(t not in stops for t in out[:-1])

"""The ``/generate`` wire format (SGLang 0.2.10's ``GenerateReqInput``): parse a request body into
one job per output sequence, and shape engine results into SGLang's response items."""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Iterator

from sglang_core.engine import split_prompts
from sglang_core.sampling.params import SamplingParams

FIELDS = frozenset({"text", "input_ids", "image_data", "sampling_params", "rid", "return_logprob",
                    "logprob_start_len", "top_logprobs_num", "return_text_in_logprobs", "stream"})


@dataclasses.dataclass
class Job:
    """One output sequence: the keyword arguments of ``ctx.stream`` for it."""

    kwargs: dict[str, Any]


@dataclasses.dataclass
class GenerateInput:
    jobs: list[Job]  # prompt i's copy j (of n) at index i * n + j, as SGLang orders them
    single: bool  # answer with one object rather than a list
    stream: bool
    prompt_field: str  # "text" or "input_ids": the field that errors about the prompt name


def parse_generate(body: Any, vocab_size: int) -> GenerateInput:
    """Check the body's shape and types and validate the sampling parameters; the engine checks
    the prompts themselves (token ids, length) when each job is submitted."""
    if not isinstance(body, dict):
        raise ValueError("body: expected a JSON object")
    unknown = sorted(set(body) - FIELDS)
    if unknown:
        raise ValueError(f"{unknown[0]}: unknown field")
    if body.get("image_data") is not None:
        raise ValueError("image_data: images are not supported")
    prompt_field, prompts, single_prompt = split_prompts(body.get("text"), body.get("input_ids"), "text")
    count = len(prompts)
    stream = _bool("stream", body.get("stream"))
    with_text = _bool("return_text_in_logprobs", body.get("return_text_in_logprobs"))
    params = _per_item("sampling_params", body.get("sampling_params"), count, None)
    logprob = [_bool("return_logprob", v) for v in _per_item("return_logprob", body.get("return_logprob"), count, False)]
    # SGLang 0.2.10 reports prompt logprobs from the first token unless told otherwise.
    start = _per_item("logprob_start_len", body.get("logprob_start_len"), count, 0)
    top = _per_item("top_logprobs_num", body.get("top_logprobs_num"), count, 0)
    rids = _rids(body.get("rid"), count)
    engine_field = "prompt" if prompt_field == "text" else "input_ids"
    jobs = []
    for i, prompt in enumerate(prompts):
        sampling = SamplingParams.from_dict(params[i])
        sampling.validate(vocab_size)
        for j in range(sampling.n):
            copy = dataclasses.replace(sampling, n=1, seed=None if sampling.seed is None else sampling.seed + j)
            rid = rids[i] if sampling.n == 1 or rids[i] is None else f"{rids[i]}-{j}"
            jobs.append(Job({engine_field: prompt, "sampling_params": copy, "return_logprob": logprob[i],
                             "logprob_start_len": start[i], "top_logprobs_num": top[i],
                             "return_text_in_logprobs": with_text, "rid": rid}))
    return GenerateInput(jobs, single_prompt and len(jobs) == 1, stream, prompt_field)


@contextlib.contextmanager
def prompt_errors_named(field: str) -> Iterator[None]:
    """The engine calls the prompt ``prompt``; this API calls it ``text`` or ``input_ids``."""
    try:
        yield
    except ValueError as exc:
        head, sep, rest = str(exc).partition(":")
        if sep and head == "prompt":
            raise ValueError(f"{field}:{rest}") from exc
        raise


def response_item(result: dict) -> dict:
    """An engine result (``text`` is the whole text so far) as SGLang's ``{"text", "meta_info"}``."""
    return {"text": result["text"], "meta_info": result["meta_info"]}


def _per_item(name: str, value: Any, count: int, default: Any) -> list:
    """A scalar applies to every prompt; a list gives one value per prompt; null is the default."""
    if isinstance(value, list):
        if len(value) != count:
            raise ValueError(f"{name}: a list must have one entry per prompt ({count}), got {len(value)}")
        return [default if v is None else v for v in value]
    return [default if value is None else value] * count


def _rids(rid: Any, count: int) -> list[str | None]:
    """One request id per prompt: a list as given, or a string (suffixed ``-i`` in a batch)."""
    if rid is None:
        return [None] * count
    if isinstance(rid, str) and rid:
        return [rid] if count == 1 else [f"{rid}-{i}" for i in range(count)]
    if (isinstance(rid, list) and len(rid) == count and all(isinstance(r, str) and r for r in rid)
            and len(set(rid)) == count):
        return rid
    raise ValueError(f"rid: expected a non-empty string or a list of {count} distinct non-empty strings")


def _bool(name: str, value: Any) -> bool:
    """true or false; null means false."""
    if value is None:
        return False
    if not isinstance(value, bool):
        raise ValueError(f"{name}: expected true or false, got {value!r}")
    return value

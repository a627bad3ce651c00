"""The native API's bodies (SGLang 0.2.10's ``GenerateReqInput`` and the small management
ones) as Pydantic models parsed by ``sglang_core.server.bodies.parse_body``, like every other
route's; and ``/generate``'s jobs, one per output sequence, and its response items."""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Callable, Iterator

from pydantic import ConfigDict, Field

from sglang_core.engine import split_prompts
from sglang_core.media_inputs import images_per_prompt
from sglang_core.sampling.params import SamplingParams, choice_seed
from sglang_core.server.bodies import StrictBody


class NativeBody(StrictBody):
    """SGLang's native API refuses a field it does not know (OpenAI's ignores it)."""

    model_config = ConfigDict(extra="forbid")


class GenerateBody(NativeBody):
    """A scalar applies to every prompt; a list gives one value per prompt (null: the default)."""

    text: str | list[str] | None = Field(None, description="a prompt or a batch (give text or input_ids)")
    input_ids: list[int | list[int]] | None = Field(  # split_prompts refuses a mix
        None, description="a prompt as token ids, or a batch of them")
    image_data: Any = Field(None, description="images for the prompt (data URL or base64; URLs and files where allowed): one or a "
                          "list for one prompt; an entry (null, one, a list) per prompt for several")
    modalities: list[Any] | None = Field(None, description="SGLang's: what each image_data entry of a prompt is, "
                                      "'image' (the default) or 'video' (a video file, or a list of frames); a list "
                                      "for one prompt, an entry (null or a list) per prompt for several")
    video_data: Any = Field(None, description="videos for the prompt, after image_data's (each a video file as image_data "
                          "takes it, or a list of frames): one or a list for one prompt; an entry per prompt for several")
    sampling_params: dict[str, Any] | list[dict[str, Any] | None] | None = Field(
        None, description="SGLang 0.2.10's sampling params (max_new_tokens default 128, temperature, top_p, top_k, "
                          "min_p, stop, stop_token_ids, n, regex, json_schema, ...)")
    rid: str | list[str] | None = Field(None, description="request id(s), for /abort_request")
    return_logprob: bool | list[bool | None] | None = None
    logprob_start_len: int | list[int | None] | None = Field(None, description="first prompt position to report "
                                                                              "logprobs for (default 0)")
    top_logprobs_num: int | list[int | None] | None = None
    return_text_in_logprobs: bool | None = None
    stream: bool | None = Field(None, description="answer with server-sent events, each the whole text so far")


class TokenizeBody(NativeBody):
    text: str | list[str]


class AbortBody(NativeBody):
    rid: str


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


def parse_generate(body: GenerateBody, vocab_size: int,
                   check_sequences: Callable[[int, str], None] = lambda sequences, field: None) -> GenerateInput:
    """Spread the per-prompt fields over the prompts and validate the sampling parameters; the
    engine checks the prompts themselves (token ids, length) when each job is submitted.
    ``check_sequences(count, field)`` refuses a request of too many output sequences before any
    job is built (so a huge batch or ``n`` costs no work)."""
    prompt_field, prompts, single_prompt = split_prompts(body.text, body.input_ids, "text")
    count = len(prompts)
    check_sequences(count, prompt_field)
    params = _per_item("sampling_params", body.sampling_params, count, None)
    samplings = [SamplingParams.from_dict(p) for p in params]
    check_sequences(sum(s.n for s in samplings), prompt_field)
    logprob = _per_item("return_logprob", body.return_logprob, count, False)
    # SGLang 0.2.10 reports prompt logprobs from the first token unless told otherwise.
    start = _per_item("logprob_start_len", body.logprob_start_len, count, 0)
    top = _per_item("top_logprobs_num", body.top_logprobs_num, count, 0)
    rids = _rids(body.rid, count)
    images = _media_per_prompt(body, count, single_prompt)
    engine_field = "prompt" if prompt_field == "text" else "input_ids"
    jobs = []
    for i, (prompt, sampling) in enumerate(zip(prompts, samplings)):
        sampling.validate(vocab_size)
        for j in range(sampling.n):
            copy = dataclasses.replace(sampling, n=1, seed=choice_seed(sampling.seed, j))
            rid = rids[i] if sampling.n == 1 or rids[i] is None else f"{rids[i]}-{j}"
            jobs.append(Job({engine_field: prompt, "sampling_params": copy, "return_logprob": logprob[i],
                             "logprob_start_len": start[i], "top_logprobs_num": top[i],
                             "return_text_in_logprobs": bool(body.return_text_in_logprobs), "rid": rid,
                             "image_data": images[i] or None}))
    return GenerateInput(jobs, single_prompt and len(jobs) == 1, bool(body.stream), prompt_field)


def _media_per_prompt(body: GenerateBody, count: int, single: bool) -> list[list[Any]]:
    """Each prompt's ``image_data`` entries, those ``modalities`` calls videos and then its
    ``video_data`` as the engine takes videos (``{"video": ...}``)."""
    images = images_per_prompt(body.image_data, count, single)
    kinds = images_per_prompt(body.modalities, count, single, "modalities")
    videos = images_per_prompt(body.video_data, count, single, "video_data")
    media = []
    for i, (entries, modalities) in enumerate(zip(images, kinds)):
        if modalities and len(modalities) != len(entries):
            raise ValueError(f"modalities: {len(modalities)} given for {len(entries)} image_data entries"
                             + (f" of prompt {i}" if not single else ""))
        if not all(kind in ("image", "multi-images", "video") for kind in modalities):
            raise ValueError(f"modalities: each is 'image' or 'video', got {modalities!r}")
        media.append([{"video": e} if kind == "video" and not isinstance(e, dict) else e
                      for e, kind in zip(entries, modalities or ["image"] * len(entries))])
    return [m + [v if isinstance(v, dict) else {"video": v} for v in video] for m, video in zip(media, videos)]


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


def _rids(rid: str | list[str] | None, count: int) -> list[str | None]:
    """One request id per prompt: a list as given, or a string (suffixed ``-i`` in a batch)."""
    if rid is None:
        return [None] * count
    if isinstance(rid, str) and rid:
        return [rid] if count == 1 else [f"{rid}-{i}" for i in range(count)]
    if isinstance(rid, list) and len(rid) == count and all(rid) and len(set(rid)) == count:
        return rid
    raise ValueError(f"rid: expected a non-empty string or a list of {count} distinct non-empty strings")

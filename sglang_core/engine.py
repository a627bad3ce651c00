"""The engine API: ``Engine(model_path=None, **settings).generate(...)``.

The request side (this module: tokenize, validate, detokenize, build results) talks to the
engine core (scheduler + model) only through ``GenerateRequest``/``TokenOutput`` messages. The
core runs in a background thread, or with ``engine_in_subprocess`` in a process of its own (as
the server runs it), so the caller's event loop never waits on a forward pass.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import queue
import threading
import uuid
from typing import Any, AsyncIterator, Iterator

from sglang_core.choices import check_select_args, choice_spans, pick_choice
from sglang_core.config import EngineSettings
from sglang_core.core_client import CoreClient, ProcessCoreClient, ThreadCoreClient, check_sendable
from sglang_core.engine_core import ModelInfo
from sglang_core.media_inputs import MediaInputs, images_per_prompt
from sglang_core.messages import GenerateRequest, TokenOutput
from sglang_core.multimodal import expanded_position
from sglang_core.plugins import PluginManager
from sglang_core.sampling.params import INT64_MAX, SamplingParams, choice_seed
from sglang_core.sampling.stop import IncrementalDetokenizer, StopChecker

logger = logging.getLogger(__name__)


class _Stream:
    """Delivers one request's outputs from the engine thread to a sync or async consumer.

    Items on the queue are lists of ``TokenOutput``. A streaming consumer gets one per step; a
    waiting one gets a single list when the request ends: waking a coroutine per request per
    token costs the host more than a large batch's whole decode step.
    """

    def __init__(self, request: GenerateRequest, loop: asyncio.AbstractEventLoop | None, every_token: bool):
        self.request = request
        self.loop = loop
        self.every_token = every_token
        self.queue: queue.Queue | asyncio.Queue = asyncio.Queue() if loop else queue.Queue()
        self._held: list[TokenOutput] = []

    def take(self, out: TokenOutput) -> list[TokenOutput] | None:
        """Accept one output; return what should reach the consumer now, if anything."""
        self._held.append(out)
        if not self.every_token and out.finished_reason is None:
            return None
        items, self._held = self._held, []
        return items


def _put_all(deliveries: list[tuple[asyncio.Queue, list[TokenOutput]]]) -> None:
    for target, items in deliveries:
        target.put_nowait(items)


class OutputBuilder:
    """Accumulates one request's ``TokenOutput`` messages into SGLang-style results: text deltas
    while streaming, and the final ``{"text", "output_ids", "meta_info"}``."""

    def __init__(self, tokenizer, eos_token_ids: set[int], request: GenerateRequest, params: SamplingParams,
                 return_text_in_logprobs: bool = False):
        self.tokenizer = tokenizer
        self.request = request
        self.detok = IncrementalDetokenizer(tokenizer, params.skip_special_tokens, params.spaces_between_special_tokens)
        self.stop = StopChecker(tokenizer, params, eos_token_ids)
        self.with_text = return_text_in_logprobs
        self.output_ids: list[int] = []
        self.output_logprobs: list[float] = []
        self.output_top_logprobs: list = []
        self.input_logprobs: list = []
        self.input_top_logprobs: list = []
        self.cached_tokens = 0
        self.forced_tokens = 0
        self.produced_at = 0.0
        self.constrained = params.constraint is not None
        self.finished_reason: dict | None = None
        self.sent = 0  # characters of visible text already streamed
        self._undecoded: list[int] = []  # ids not yet given to the detokenizer

    def update(self, out: TokenOutput, want_text: bool = True) -> str:
        """Consume one message; return the newly visible text (held back near a stop string).
        ``want_text=False`` (a caller that only needs the final result) defers all decoding to
        the last message: per-token detokenization of a large batch costs more host time than
        the GPU step it waits for."""
        self.output_ids += out.new_ids
        self.output_logprobs += out.output_logprobs
        self.output_top_logprobs += out.output_top_logprobs
        if out.input_logprobs is not None:
            self.input_logprobs, self.input_top_logprobs = out.input_logprobs, out.input_top_logprobs or []
        self.cached_tokens = out.cached_tokens
        self.forced_tokens = out.forced_tokens
        self.produced_at = out.produced_at
        self.finished_reason = reason = out.finished_reason
        new_ids = out.new_ids
        if reason and reason.get("type") == "stop" and isinstance(reason.get("matched"), int):
            new_ids = new_ids[:-1]  # a matched stop token is not part of the text, as in SGLang
        self._undecoded += new_ids
        if not want_text and reason is None:
            return ""
        self.detok.push(self._undecoded)
        self._undecoded = []
        if reason is not None:
            self.detok.flush()  # the end: emit even a trailing incomplete character
        # Replays the core's stop check on the same ids, to learn where a stop string starts.
        self.stop.check(self.output_ids)
        text = self.text
        if reason is None:
            text = text[: self.stop.safe_prefix_len(text)]
        delta, self.sent = text[self.sent :], max(self.sent, len(text))
        return delta

    @property
    def text(self) -> str:
        reason = self.finished_reason
        if reason and reason.get("type") == "stop" and isinstance(reason.get("matched"), str):
            return self.stop.visible_text(self.detok.text)
        return self.detok.text

    def result(self, text: str | None = None) -> dict:
        meta: dict[str, Any] = {
            "id": self.request.rid,
            "prompt_tokens": len(self.request.input_ids),
            "completion_tokens": len(self.output_ids),
            "cached_tokens": self.cached_tokens,
            "finish_reason": self.finished_reason,
            # When the engine handed out the latest token (time.time()): streaming clients on the
            # same host measure how long it took to reach them.
            "produced_at": self.produced_at,
        }
        if self.constrained:  # how much of the output jump-forward appended vs the model sampled
            meta["forced_tokens"] = self.forced_tokens
            meta["sampled_tokens"] = len(self.output_ids) - self.forced_tokens
        if self.request.return_logprob:
            meta.update(self._logprobs())
        return {"text": self.text if text is None else text, "output_ids": list(self.output_ids), "meta_info": meta}

    def _logprobs(self) -> dict[str, Any]:
        req = self.request
        prompt_ids = req.input_ids[req.logprob_start_len :] if req.logprob_start_len >= 0 else []
        known = [lp for lp in self.input_logprobs if lp is not None]
        return {
            "input_token_logprobs": self._triples(self.input_logprobs, prompt_ids),
            "input_top_logprobs": [self._top(t) for t in self.input_top_logprobs],
            "output_token_logprobs": self._triples(self.output_logprobs, self.output_ids),
            "output_top_logprobs": [self._top(t) for t in self.output_top_logprobs],
            "normalized_prompt_logprob": sum(known) / len(known) if known else None,
        }

    def _text(self, token_id: int) -> str | None:
        return self.tokenizer.decode([token_id]) if self.with_text else None

    def _triples(self, logprobs: list, ids: list[int]) -> list:
        return [(lp, tid, self._text(tid)) for lp, tid in zip(logprobs, ids)]

    def _top(self, top: list | None) -> list | None:
        return None if top is None else [(lp, tid, self._text(tid)) for lp, tid in top]


def split_prompts(text: Any, input_ids: Any, text_field: str = "prompt") -> tuple[str, list, bool]:
    """Check a prompt given as text or as token ids, one or a batch (a list of them).

    Returns (the field used: ``text_field`` or ``"input_ids"``, one item per prompt, whether a
    single prompt was given). A ``ValueError`` names the field at fault."""
    if (text is None) == (input_ids is None):
        raise ValueError(f"{text_field}: give exactly one of {text_field} and input_ids")
    if text is not None:
        texts = [text] if isinstance(text, str) else text
        if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
            raise ValueError(f"{text_field}: must be a string or a non-empty list of strings")
        if any(t == "" for t in texts):
            raise ValueError(f"{text_field}: must not be empty")
        for t in texts:
            check_unicode(text_field, t)
        return text_field, texts, isinstance(text, str)
    if not isinstance(input_ids, list) or not input_ids:
        raise ValueError("input_ids: must be a non-empty list of token ids (or of lists of them)")
    single = not isinstance(input_ids[0], list)
    id_lists = [input_ids] if single else input_ids
    if not all(isinstance(ids, list) for ids in id_lists):
        raise ValueError("input_ids: must be a list of token ids or a list of such lists, not a mix")
    return "input_ids", id_lists, single


def check_unicode(field: str, text: str) -> None:
    """Reject a string no UTF-8 can hold (a lone surrogate, which Python strings may carry)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"{field}: not valid Unicode text ({exc.reason} at position {exc.start})") from None


def check_rid(rid: Any) -> None:
    if not isinstance(rid, str) or not rid:
        raise ValueError(f"rid: expected a non-empty string, got {rid!r}")
    check_unicode("rid", rid)


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not minimum <= value <= INT64_MAX:
        raise ValueError(f"{name}: must be an integer in [{minimum}, 2**63 - 1], got {value!r}")


class Engine:
    """A model and its scheduler, running in a background thread or process."""

    def __init__(self, model_path: str | None = None, **settings: Any):
        self.settings = EngineSettings(model_path=model_path, **settings)
        logging.getLogger("sglang_core").setLevel(self.settings.log_level.upper())
        self.plugins = PluginManager(self.settings.plugins)
        self._streams: dict[str, _Stream] = {}
        self._lock = threading.Lock()
        self._stopped = False
        self._grammar_backend = None  # built on the first constrained request (False: none loaded)
        self.core: CoreClient
        if self.settings.engine_in_subprocess:
            self.core = ProcessCoreClient(self.settings, self.plugins, self._deliver, self._on_core_death)
            from sglang_core.tokenizer import load_tokenizer

            self.tokenizer = load_tokenizer(self.core.info.tokenizer_path)
        else:
            self.core = ThreadCoreClient(self.settings, self.plugins, self._deliver)
            self.tokenizer = self.core.core.tokenizer
        self.info: ModelInfo = self.core.info
        self.eos_token_ids = set(self.info.eos_token_ids)
        self._media = MediaInputs(self.plugins, self.info, self.settings)
        self.plugins.hook.on_engine_start(engine=self)

    # ---- public API ----------------------------------------------------------------------

    @property
    def model_path(self) -> str:
        return self.info.model_path

    def generate(self, prompt: str | list[str] | None = None, sampling_params: dict | list[dict] | None = None,
                 input_ids: list[int] | list[list[int]] | None = None, return_logprob: bool = False,
                 logprob_start_len: int = -1, top_logprobs_num: int = 0, return_text_in_logprobs: bool = False,
                 stream: bool = False, rid: str | None = None,
                 image_data: Any = None) -> dict | list[dict] | Iterator[dict]:
        """Generate for one prompt (a dict back), a list (a list back, ``n`` results per prompt),
        or, with ``stream=True``, one prompt as an iterator of ``{"text": delta, ...}`` chunks.

        ``image_data``: the images of a model that takes them, each a data URL, base64 text, bytes,
        a file path or a URL (see ``sglang_core.media_loading``): one or a list for one prompt, a
        list with an entry per prompt for several. The prompt holds the model's image token once
        per image (``image_token``). A video, for a model that takes them, is an entry
        ``{"video": file or list of frames, "num_frames": n}`` (see ``media_loading.load_video``)
        and takes the ``video_token`` once."""
        requests, single = self._build(prompt, input_ids, sampling_params, return_logprob, logprob_start_len,
                                       top_logprobs_num, rid, image_data)
        if stream:
            self._require_single(requests)
            return self._stream_sync(self._submit(requests, None, every_token=True)[0], return_text_in_logprobs)
        streams = self._submit(requests, None)
        results = [self._wait_sync(s, return_text_in_logprobs) for s in streams]
        return results[0] if single else results

    async def async_generate(self, prompt: str | list[str] | None = None,
                             sampling_params: dict | list[dict] | None = None,
                             input_ids: list[int] | list[list[int]] | None = None, return_logprob: bool = False,
                             logprob_start_len: int = -1, top_logprobs_num: int = 0,
                             return_text_in_logprobs: bool = False, stream: bool = False,
                             rid: str | None = None, image_data: Any = None) -> dict | list[dict] | AsyncIterator[dict]:
        """The asyncio twin of ``generate``; with ``stream=True`` returns an async iterator."""
        args = (prompt, input_ids, sampling_params, return_logprob, logprob_start_len, top_logprobs_num, rid,
                image_data)
        # Decoding and preprocessing images takes milliseconds each: off the event loop.
        requests, single = await asyncio.to_thread(self._build, *args) if image_data is not None else self._build(*args)
        loop = asyncio.get_running_loop()
        if stream:
            self._require_single(requests)
            return self._stream_async(self._submit(requests, loop, every_token=True)[0], return_text_in_logprobs)
        streams = self._submit(requests, loop)
        try:
            results = [await self._wait_async(s, return_text_in_logprobs) for s in streams]
        except asyncio.CancelledError:
            for s in streams:
                self.abort(s.request.rid)
            raise
        return results[0] if single else results

    @property
    def image_token(self) -> str | None:
        """The text that stands for one image in a prompt; None for a model that takes no images."""
        return self._media.image_token

    @property
    def video_token(self) -> str | None:
        """The text that stands for one video in a prompt; None for a model that takes no videos."""
        return self._media.video_token

    @property
    def alive(self) -> bool:
        """False once the engine core has died or been shut down."""
        return self.core.alive and not self._stopped

    def abort(self, rid: str) -> None:
        """End a request (and the copies of an ``n > 1`` request) wherever it is."""
        check_rid(rid)
        self.core.abort(rid)

    def select(self, prompt: str, choices: list[str], method: str = "token_length_normalized") -> dict:
        """Pick the continuation of ``prompt`` among ``choices`` by the model's logprobs of each
        choice's tokens after the prompt (one prefill per choice, nothing sampled; the shared
        prompt is computed once thanks to the prefix cache).

        ``method``: one of ``sglang_core.choices.CHOICE_METHODS``, scored by
        ``sglang_core.choices.pick_choice`` (``unconditional_likelihood_normalized`` also scores
        each choice's tokens alone). Returns ``{"choice", "index", "scores", "token_logprobs"}``
        (plus ``"unconditional_logprobs"`` for that method)."""
        check_select_args(prompt, choices, method)
        spans = choice_spans(lambda texts: [self.tokenizer(t)["input_ids"] for t in texts], prompt, choices)
        streams = []
        for span in spans:
            requests, _ = self._build(None, span.ids, {"max_new_tokens": 0}, True, span.start, 0, None)
            streams += self._submit(requests, None)
        with_unconditional = method == "unconditional_likelihood_normalized"
        if with_unconditional:
            for span in spans:
                requests, _ = self._build(None, span.choice_ids, {"max_new_tokens": 0}, True, 0, 0, None)
                streams += self._submit(requests, None)
        logprobs = [[lp for lp, _, _ in self._wait_sync(s, False)["meta_info"]["input_token_logprobs"]]
                    for s in streams]
        conditional, unconditional = logprobs[:len(spans)], logprobs[len(spans):] or None
        decision = pick_choice(method, conditional, unconditional)
        result = {"choice": choices[decision.index], "index": decision.index, "scores": decision.scores,
                  "token_logprobs": conditional}
        if with_unconditional:
            result["unconditional_logprobs"] = unconditional
        return result

    def flush_cache(self) -> bool:
        """Drop the prefix cache (False while requests are in flight)."""
        return self.core.call("flush_cache")

    def memory_report(self) -> dict[str, int]:
        """KV slots and request rows in use, for monitoring and leak checks."""
        return self.core.call("memory_report")

    def memory_reports(self) -> list[dict[str, int] | None]:
        """One report per engine replica: this engine's (None once it has died). A data-parallel
        front (``sglang_core.router.data_parallel``) gives one per replica."""
        return [self.memory_report() if self.alive else None]

    def check_memory(self) -> None:
        """Raise AssertionError unless, with no request in flight, all memory is accounted for."""
        self.core.call("check_memory")

    def stats(self) -> dict[str, int]:
        return self.core.call("stats")

    def shutdown(self) -> None:
        if self._stopped:
            return
        self.plugins.hook.on_engine_shutdown(engine=self)
        self._stopped = True
        self._media.close()
        self.core.shutdown()

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.shutdown()

    # ---- building requests -----------------------------------------------------------------

    def _build(self, prompt, input_ids, sampling_params, return_logprob, logprob_start_len, top_logprobs_num,
               rid, image_data=None) -> tuple[list[GenerateRequest], bool]:
        id_lists, single_input = self._prompt_ids(prompt, input_ids)
        images = images_per_prompt(image_data, len(id_lists), single_input)
        params_list = sampling_params if isinstance(sampling_params, list) else [sampling_params] * len(id_lists)
        if len(params_list) != len(id_lists):
            raise ValueError("sampling_params: a list must have one entry per prompt")
        if not isinstance(return_logprob, bool):
            raise ValueError(f"return_logprob: expected true or false, got {return_logprob!r}")
        _check_int("logprob_start_len", logprob_start_len, -1)
        _check_int("top_logprobs_num", top_logprobs_num, 0)
        if rid is not None:
            check_rid(rid)
        parsed = [raw if isinstance(raw, SamplingParams) else SamplingParams.from_dict(raw) for raw in params_list]
        for params in parsed:
            params.validate(self.info.vocab_size)
        # After the cheap checks: loading images takes milliseconds each. A prompt with an image
        # token but no image is refused here too.
        fields = ["image_data"] if single_input else [f"image_data.{i}" for i in range(len(id_lists))]
        expanded = self._media.expand_all(id_lists, images, fields)
        requests: list[GenerateRequest] = []
        batch_rid = rid or uuid.uuid4().hex
        for i, (params, (ids, media)) in enumerate(zip(parsed, expanded)):
            start, positions = logprob_start_len, None
            if media:
                positions = self._media.positions(ids, media)
                # The start counts the prompt as given: past an image, its placeholders count too.
                start = expanded_position(start, media) if start >= 0 else start
            self._check_ids(ids)
            base = batch_rid if len(id_lists) == 1 else f"{batch_rid}-{i}"
            max_new = min(params.max_new_tokens, self._room_for_output(len(ids)))
            for j in range(params.n):
                copy = dataclasses.replace(params, n=1, max_new_tokens=max_new,
                                           min_new_tokens=min(params.min_new_tokens, max_new),
                                           seed=choice_seed(params.seed, j))
                request = GenerateRequest(
                    rid=base if params.n == 1 else f"{base}-{j}",
                    input_ids=ids,
                    sampling_params=dataclasses.asdict(copy),
                    return_logprob=return_logprob,
                    logprob_start_len=start,
                    top_logprobs_num=top_logprobs_num,
                    media=media,
                    positions=positions,
                )
                check_sendable(request)
                requests.append(request)
            if params.constraint is not None:
                self._check_constraint(*params.constraint)
        return requests, single_input and len(requests) == 1

    def _room_for_output(self, prompt_len: int) -> int:
        """The most tokens a prompt of this length may generate: what is left of the context and
        of the KV pool after it (SGLang clips ``max_new_tokens`` to this rather than refusing)."""
        return min(self.info.context_len, self.info.max_total_tokens) - prompt_len

    def _prompt_ids(self, prompt, input_ids) -> tuple[list[list[int]], bool]:
        field, items, single = split_prompts(prompt, input_ids)
        if field == "prompt":
            items = [self.tokenizer(p)["input_ids"] for p in items]
        return items, single

    def _check_ids(self, ids: list[int]) -> None:
        if not ids:
            raise ValueError("input_ids: must not be empty")
        vocab = self.info.vocab_size
        if any(not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab for t in ids):
            raise ValueError(f"input_ids: every token id must be an integer in [0, {vocab})")
        if len(ids) >= self.info.context_len:
            raise ValueError(f"prompt: {len(ids)} tokens leave no room in the context length {self.info.context_len}")
        if len(ids) + 1 > self.info.max_total_tokens:
            raise ValueError(f"prompt: {len(ids)} tokens exceed the KV cache ({self.info.max_total_tokens} tokens)")

    def _check_constraint(self, kind: str, spec: str) -> None:
        """The grammar backend's cheap checks, here, so a bad constraint is a ValueError (HTTP 400)
        before anything is queued; the engine compiles it later, off its critical path."""
        if self._grammar_backend is None:
            from sglang_core.constrained.compiler import make_grammar_backend

            self._grammar_backend = make_grammar_backend(self.plugins, self.settings.grammar_backend,
                                                         self.tokenizer, self.info.vocab_size) or False
        if not self._grammar_backend:
            raise ValueError(f"{kind}: constrained decoding needs the grammar backend "
                             f"{self.settings.grammar_backend!r}, which no loaded plugin provides")
        self._grammar_backend.validate(kind, spec)

    @staticmethod
    def _require_single(requests: list[GenerateRequest]) -> None:
        if len(requests) != 1:
            raise ValueError("stream: streaming takes a single prompt with n=1")

    def _builder(self, stream: _Stream, with_text: bool) -> OutputBuilder:
        params = SamplingParams(**stream.request.sampling_params)
        return OutputBuilder(self.tokenizer, self.eos_token_ids, stream.request, params, with_text)

    # ---- talking to the core -------------------------------------------------------------

    def _submit(self, requests: list[GenerateRequest], loop: asyncio.AbstractEventLoop | None,
                every_token: bool = False) -> list[_Stream]:
        """Register every request's output stream, then hand them all to the core; a rid already in
        flight (or repeated within the call) rejects the whole call before anything starts."""
        if not self.alive:
            raise RuntimeError("the engine is not running")
        streams = [_Stream(r, loop, every_token) for r in requests]
        with self._lock:
            rids = [r.rid for r in requests]
            clash = next((rid for i, rid in enumerate(rids) if rid in self._streams or rid in rids[:i]), None)
            if clash is not None:
                raise ValueError(f"rid: {clash!r} is already in use by a request in flight")
            self._streams.update(zip(rids, streams))
        sent = 0
        try:
            for request in requests:
                self.core.add(request)
                sent += 1
        except BaseException:
            # Nothing may outlive a failed call: the streams of requests never sent go now; those
            # sent are aborted, and their streams go with the abort's final output, as any abort's.
            with self._lock:
                for rid in rids[sent:]:
                    del self._streams[rid]
            for rid in rids[:sent]:
                self.core.abort(rid)
            raise
        return streams

    def _wait_sync(self, stream: _Stream, with_text: bool) -> dict:
        out = self._builder(stream, with_text)
        while out.finished_reason is None:
            for item in stream.queue.get():
                out.update(item, want_text=False)
        return out.result()

    async def _wait_async(self, stream: _Stream, with_text: bool) -> dict:
        out = self._builder(stream, with_text)
        while out.finished_reason is None:
            for item in await stream.queue.get():
                out.update(item, want_text=False)
        return out.result()

    def _stream_sync(self, stream: _Stream, with_text: bool) -> Iterator[dict]:
        out = self._builder(stream, with_text)
        try:
            while out.finished_reason is None:
                delta = "".join(out.update(item) for item in stream.queue.get())
                yield out.result(delta)
        finally:
            if out.finished_reason is None:
                self.abort(stream.request.rid)

    async def _stream_async(self, stream: _Stream, with_text: bool) -> AsyncIterator[dict]:
        out = self._builder(stream, with_text)
        try:
            while out.finished_reason is None:
                delta = "".join(out.update(item) for item in await stream.queue.get())
                yield out.result(delta)
        finally:
            if out.finished_reason is None:
                self.abort(stream.request.rid)

    def _deliver(self, outputs: list[TokenOutput]) -> None:
        """Called from the core's thread: route each output to its request's stream, waking each
        event loop once per step however many of its requests progressed."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, list[TokenOutput]]]] = {}
        with self._lock:
            for out in outputs:
                stream = self._streams.get(out.rid)
                if stream is None:
                    continue
                if out.finished_reason is not None:
                    del self._streams[out.rid]
                items = stream.take(out)
                if items is None:
                    continue
                if stream.loop is None:
                    stream.queue.put(items)
                else:
                    by_loop.setdefault(stream.loop, []).append((stream.queue, items))
        for loop, deliveries in by_loop.items():
            try:
                loop.call_soon_threadsafe(_put_all, deliveries)
            except RuntimeError:  # that caller's event loop has closed: nobody is waiting
                pass

    def _on_core_death(self) -> None:
        """The engine process died: every in-flight request ends with an error, none hangs."""
        with self._lock:
            rids = list(self._streams)
        reason = {"type": "abort", "message": "the engine process died"}
        self._deliver([TokenOutput(rid=rid, new_ids=[], finished_reason=reason, cached_tokens=0) for rid in rids])

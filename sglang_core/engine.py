"""The engine API: ``Engine(model_path=None, **settings).generate(...)``.

The scheduler runs in a background thread that owns all engine state; callers talk to it only
through an inbox, and each request's progress comes back through its own stream.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import uuid
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable, Iterator

from sglang_core.config import EngineSettings
from sglang_core.model_executor.runner import ModelRunner
from sglang_core.plugins import PluginManager
from sglang_core.request import Req
from sglang_core.sampling.params import SamplingParams
from sglang_core.sampling.sampler import Sampler, make_generator
from sglang_core.sampling.stop import IncrementalDetokenizer, StopChecker
from sglang_core.scheduler.scheduler import Scheduler
from sglang_core.tokenizer import eos_token_ids, load_tokenizer
from sglang_core.weights.loader import resolve_model_source

logger = logging.getLogger(__name__)


@dataclass
class _Event:
    """A request made progress: it has ``num_output`` tokens now, and maybe a finish reason."""

    num_output: int
    finished_reason: dict | None


class _Stream:
    """Delivers one request's events from the engine thread to a sync or async consumer."""

    def __init__(self, req: Req, loop: asyncio.AbstractEventLoop | None):
        self.req = req
        self.loop = loop
        self.queue: queue.Queue | asyncio.Queue = asyncio.Queue() if loop else queue.Queue()

    def push(self, event: _Event) -> None:
        if self.loop is None:
            self.queue.put(event)
        else:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, event)


class _OutputBuilder:
    """Turns a request's tokens into SGLang-style results: text deltas while streaming, and
    the final ``{"text", "output_ids", "meta_info"}``."""

    def __init__(self, engine: "Engine", req: Req, return_text_in_logprobs: bool):
        self.engine, self.req = engine, req
        params = req.sampling_params
        self.detok = IncrementalDetokenizer(engine.tokenizer, params.skip_special_tokens,
                                            params.spaces_between_special_tokens)
        self.stop = StopChecker(engine.tokenizer, params, engine.eos_token_ids)
        self.with_text = return_text_in_logprobs
        self.seen = 0
        self.sent = 0  # characters of visible text already streamed

    def update(self, event: _Event) -> str:
        """Consume new tokens; return the newly visible text (held back near a stop string)."""
        new_ids = self.req.output_ids[self.seen : event.num_output]
        reason = event.finished_reason
        if reason and reason.get("type") == "stop" and isinstance(reason.get("matched"), int):
            new_ids = new_ids[:-1]  # a matched stop token is not part of the text, as in SGLang
        self.detok.push(new_ids)
        if reason is not None:
            self.detok.flush()  # the end: emit even a trailing incomplete character
        self.seen = event.num_output
        # Replays the scheduler's stop check on the same ids, to learn where a stop string starts.
        self.stop.check(self.req.output_ids[: self.seen])
        text = self.visible_text(event.finished_reason)
        if event.finished_reason is None:
            text = text[: self.stop.safe_prefix_len(text)]
        delta, self.sent = text[self.sent :], max(self.sent, len(text))
        return delta

    def visible_text(self, reason: dict | None) -> str:
        text = self.detok.text
        if reason and reason.get("type") == "stop" and isinstance(reason.get("matched"), str):
            return self.stop.visible_text(text)
        return text

    def result(self, reason: dict | None, text: str | None = None) -> dict:
        req = self.req
        meta: dict[str, Any] = {
            "id": req.rid,
            "prompt_tokens": len(req.origin_input_ids),
            "completion_tokens": self.seen,
            "cached_tokens": req.cached_tokens,
            "finish_reason": reason,
        }
        if req.return_logprob:
            meta.update(self._logprobs())
        return {
            "text": self.visible_text(reason) if text is None else text,
            "output_ids": list(req.output_ids[: self.seen]),
            "meta_info": meta,
        }

    def _logprobs(self) -> dict[str, Any]:
        req, n = self.req, self.seen
        start = max(req.logprob_start_len, 0)
        prompt_ids = req.origin_input_ids[start:] if req.logprob_start_len >= 0 else []
        input_lp = req.input_token_logprobs[: len(prompt_ids)]
        known = [lp for lp in input_lp if lp is not None]
        return {
            "input_token_logprobs": self._triples(input_lp, prompt_ids),
            "input_top_logprobs": [self._top(t) for t in req.input_top_logprobs[: len(prompt_ids)]],
            "output_token_logprobs": self._triples(req.output_token_logprobs[:n], req.output_ids[:n]),
            "output_top_logprobs": [self._top(t) for t in req.output_top_logprobs[:n]],
            "normalized_prompt_logprob": sum(known) / len(known) if known else None,
        }

    def _text(self, token_id: int) -> str | None:
        return self.engine.tokenizer.decode([token_id]) if self.with_text else None

    def _triples(self, logprobs: list, ids: list[int]) -> list:
        return [(lp, tid, self._text(tid)) for lp, tid in zip(logprobs, ids)]

    def _top(self, top: list | None) -> list | None:
        return None if top is None else [(lp, tid, self._text(tid)) for lp, tid in top]


class Engine:
    """A model, its scheduler and a background thread that steps them."""

    def __init__(self, model_path: str | None = None, **settings: Any):
        self.settings = EngineSettings(model_path=model_path, **settings)
        logging.getLogger("sglang_core").setLevel(self.settings.log_level.upper())
        self.plugins = PluginManager(self.settings.plugins)
        source = resolve_model_source(self.settings.model_path, self.settings.load_format)
        self.model_path = source.origin
        self.runner = ModelRunner(self.settings, source, self.plugins)
        self.tokenizer = load_tokenizer(self.settings.tokenizer_path or source.folder)
        self.eos_token_ids = eos_token_ids(self.tokenizer, source.folder)
        processors = [entry.load()(vocab_size=self.runner.vocab_size, device=self.runner.device)
                      for entry in self.plugins.registry("logits_processors")]
        self.scheduler = Scheduler(self.runner, self.settings, Sampler(processors), self.tokenizer,
                                   self.eos_token_ids)
        self._inbox: queue.Queue = queue.Queue()
        self._wake = threading.Event()
        self._streams: dict[str, _Stream] = {}
        self._stopped = False
        self._thread = threading.Thread(target=self._loop, name="sglang-core-engine", daemon=True)
        self._thread.start()
        self.plugins.hook.on_engine_start(engine=self)

    # ---- public API ----------------------------------------------------------------------

    @property
    def context_len(self) -> int:
        return self.runner.context_len

    def generate(self, prompt: str | list[str] | None = None, sampling_params: dict | list[dict] | None = None,
                 input_ids: list[int] | list[list[int]] | None = None, return_logprob: bool = False,
                 logprob_start_len: int = -1, top_logprobs_num: int = 0, return_text_in_logprobs: bool = False,
                 stream: bool = False, rid: str | None = None) -> dict | list[dict] | Iterator[dict]:
        """Generate for one prompt (a dict back), a list (a list back, ``n`` results per prompt),
        or, with ``stream=True``, one prompt as an iterator of ``{"text": delta, ...}`` chunks."""
        reqs, single = self._build(prompt, input_ids, sampling_params, return_logprob, logprob_start_len,
                                   top_logprobs_num, rid)
        if stream:
            self._require_single(reqs)
            return self._stream_sync(reqs[0], return_text_in_logprobs)
        streams = [self._submit(req, None) for req in reqs]
        results = [self._wait_sync(s, return_text_in_logprobs) for s in streams]
        return results[0] if single else results

    async def async_generate(self, prompt: str | list[str] | None = None,
                             sampling_params: dict | list[dict] | None = None,
                             input_ids: list[int] | list[list[int]] | None = None, return_logprob: bool = False,
                             logprob_start_len: int = -1, top_logprobs_num: int = 0,
                             return_text_in_logprobs: bool = False, stream: bool = False,
                             rid: str | None = None) -> dict | list[dict] | AsyncIterator[dict]:
        """The asyncio twin of ``generate``; with ``stream=True`` returns an async iterator."""
        reqs, single = self._build(prompt, input_ids, sampling_params, return_logprob, logprob_start_len,
                                   top_logprobs_num, rid)
        loop = asyncio.get_running_loop()
        if stream:
            self._require_single(reqs)
            return self._stream_async(self._submit(reqs[0], loop), return_text_in_logprobs)
        streams = [self._submit(req, loop) for req in reqs]
        try:
            results = [await self._wait_async(s, return_text_in_logprobs) for s in streams]
        except asyncio.CancelledError:
            for s in streams:
                self.abort(s.req.rid)
            raise
        return results[0] if single else results

    def abort(self, rid: str) -> None:
        self._inbox.put(("abort", rid))
        self._wake.set()

    def flush_cache(self) -> bool:
        """Drop the prefix cache (False while requests are in flight)."""
        return self._call(self.scheduler.flush_cache)

    def memory_report(self) -> dict[str, int]:
        """KV slots and request rows in use, for monitoring and leak checks."""
        return self._call(self.scheduler.memory_report)

    def check_memory(self) -> None:
        """Raise AssertionError unless, with no request in flight, all memory is accounted for."""
        self._call(self.scheduler.check_memory)

    def stats(self) -> dict[str, int]:
        return self._call(lambda: {"forward_steps": self.scheduler.forward_steps,
                                   "retractions": self.scheduler.retractions})

    def shutdown(self) -> None:
        if self._stopped:
            return
        self.plugins.hook.on_engine_shutdown(engine=self)
        self._stopped = True
        self._wake.set()
        self._thread.join(timeout=30)

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.shutdown()

    # ---- building requests -----------------------------------------------------------------

    def _build(self, prompt, input_ids, sampling_params, return_logprob, logprob_start_len, top_logprobs_num,
               rid) -> tuple[list[Req], bool]:
        if (prompt is None) == (input_ids is None):
            raise ValueError("prompt: give exactly one of prompt and input_ids")
        if prompt is not None:
            single_input = isinstance(prompt, str)
            prompts = [prompt] if single_input else list(prompt)
            if not all(isinstance(p, str) for p in prompts):
                raise ValueError("prompt: must be a string or a list of strings")
            if any(p == "" for p in prompts):
                raise ValueError("prompt: must not be empty")
            id_lists = [self.tokenizer(p)["input_ids"] for p in prompts]
        else:
            if not isinstance(input_ids, list) or not input_ids:
                raise ValueError("input_ids: must be a non-empty list of token ids (or of lists of them)")
            single_input = not isinstance(input_ids[0], list)
            id_lists = [input_ids] if single_input else input_ids
            if not all(isinstance(x, list) for x in id_lists):
                raise ValueError("input_ids: must be a list of token ids or a list of such lists")
        if not id_lists:
            raise ValueError("prompt: the batch is empty")
        params_list = sampling_params if isinstance(sampling_params, list) else [sampling_params] * len(id_lists)
        if len(params_list) != len(id_lists):
            raise ValueError("sampling_params: a list must have one entry per prompt")
        if not isinstance(logprob_start_len, int) or isinstance(logprob_start_len, bool) or logprob_start_len < -1:
            raise ValueError("logprob_start_len: must be an integer >= -1")
        if not isinstance(top_logprobs_num, int) or isinstance(top_logprobs_num, bool) or top_logprobs_num < 0:
            raise ValueError("top_logprobs_num: must be a non-negative integer")
        reqs: list[Req] = []
        batch_rid = rid or uuid.uuid4().hex
        for i, (ids, raw) in enumerate(zip(id_lists, params_list)):
            params = raw if isinstance(raw, SamplingParams) else SamplingParams.from_dict(raw)
            params.validate(self.runner.vocab_size)
            self._check_ids(ids)
            params.max_new_tokens = min(params.max_new_tokens, self.context_len - len(ids))
            base = batch_rid if len(id_lists) == 1 else f"{batch_rid}-{i}"
            for j in range(params.n):
                seed = None if params.seed is None else params.seed + j
                reqs.append(Req(
                    rid=base if params.n == 1 else f"{base}-{j}",
                    origin_input_ids=ids,
                    sampling_params=params,
                    return_logprob=return_logprob,
                    logprob_start_len=logprob_start_len,
                    top_logprobs_num=top_logprobs_num,
                    generator=make_generator(seed, self.runner.device),
                ))
        return reqs, single_input and len(reqs) == 1

    def _check_ids(self, ids: list[int]) -> None:
        if not ids:
            raise ValueError("input_ids: must not be empty")
        vocab = self.runner.vocab_size
        if any(not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab for t in ids):
            raise ValueError(f"input_ids: every token id must be an integer in [0, {vocab})")
        if len(ids) >= self.context_len:
            raise ValueError(f"prompt: {len(ids)} tokens leave no room in the context length {self.context_len}")
        if len(ids) + 1 > self.runner.max_total_tokens:
            raise ValueError(f"prompt: {len(ids)} tokens exceed the KV cache ({self.runner.max_total_tokens} tokens)")

    @staticmethod
    def _require_single(reqs: list[Req]) -> None:
        if len(reqs) != 1:
            raise ValueError("stream: streaming takes a single prompt with n=1")

    # ---- talking to the engine thread ----------------------------------------------------

    def _submit(self, req: Req, loop: asyncio.AbstractEventLoop | None) -> _Stream:
        if self._stopped:
            raise RuntimeError("the engine has been shut down")
        stream = _Stream(req, loop)
        self._inbox.put(("add", stream))
        self._wake.set()
        return stream

    def _call(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` on the engine thread (which owns all engine state) and return its result."""
        future: Future = Future()
        self._inbox.put(("call", (fn, future)))
        self._wake.set()
        return future.result()

    def _wait_sync(self, stream: _Stream, with_text: bool) -> dict:
        out = _OutputBuilder(self, stream.req, with_text)
        while True:
            event = stream.queue.get()
            out.update(event)
            if event.finished_reason is not None:
                return out.result(event.finished_reason)

    async def _wait_async(self, stream: _Stream, with_text: bool) -> dict:
        out = _OutputBuilder(self, stream.req, with_text)
        while True:
            event = await stream.queue.get()
            out.update(event)
            if event.finished_reason is not None:
                return out.result(event.finished_reason)

    def _stream_sync(self, req: Req, with_text: bool) -> Iterator[dict]:
        stream = self._submit(req, None)
        out = _OutputBuilder(self, req, with_text)
        try:
            while True:
                event = stream.queue.get()
                yield out.result(event.finished_reason, out.update(event))
                if event.finished_reason is not None:
                    return
        finally:
            if not req.finished:
                self.abort(req.rid)

    async def _stream_async(self, stream: _Stream, with_text: bool) -> AsyncIterator[dict]:
        out = _OutputBuilder(self, stream.req, with_text)
        try:
            while True:
                event = await stream.queue.get()
                yield out.result(event.finished_reason, out.update(event))
                if event.finished_reason is not None:
                    return
        finally:
            if not stream.req.finished:
                self.abort(stream.req.rid)

    # ---- the engine thread -----------------------------------------------------------------

    def _loop(self) -> None:
        while not self._stopped:
            if not self.scheduler.has_work() and self._inbox.empty():
                self._wake.wait(timeout=0.5)
            self._wake.clear()
            self._drain_inbox()
            if not self.scheduler.has_work():
                continue
            try:
                touched = self.scheduler.step()
            except Exception as exc:  # fail the requests, keep serving
                logger.exception("engine step failed")
                touched = self.scheduler.fail_all(f"internal error: {type(exc).__name__}: {exc}")
            for req in touched:
                self._publish(req)
        for req in self.scheduler.fail_all("the engine shut down"):
            self._publish(req)

    def _drain_inbox(self) -> None:
        while True:
            try:
                kind, item = self._inbox.get_nowait()
            except queue.Empty:
                return
            if kind == "add":
                self._streams[item.req.rid] = item
                self.scheduler.add_request(item.req)
            elif kind == "abort":
                for rid in [r for r in self._streams if r == item or r.startswith(f"{item}-")]:
                    req = self.scheduler.abort(rid)
                    if req is not None:
                        self._publish(req)
            else:
                fn, future = item
                try:
                    future.set_result(fn())
                except Exception as exc:
                    future.set_exception(exc)

    def _publish(self, req: Req) -> None:
        stream = self._streams.get(req.rid)
        if stream is None:
            return
        stream.push(_Event(len(req.output_ids), req.finished_reason))
        if req.finished:
            del self._streams[req.rid]

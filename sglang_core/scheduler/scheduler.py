"""Continuous batching: the step loop and the requests' queues, tying the scheduler's parts.

Each step runs one forward pass: an overlapped decode's next step (``overlap``), else a prefill
of the requests ``admission`` picks, else a decode of every running request. Memory is
``request_memory``'s job, running a batch and applying its tokens ``batch_runner``'s. The
pools and prefix cache own memory (they are changed only through their methods); the model
runner runs. Every way a request ends goes through ``_finish``, which gives back all of its
memory.
"""

from __future__ import annotations

import time
from concurrent import futures
from concurrent.futures import Future

import torch

from sglang_core.config import EngineSettings
from sglang_core.constrained.compiler import GrammarCompiler
from sglang_core.constrained.grammar import DeferredGrammarState
from sglang_core.model_executor.runner import ModelRunner
from sglang_core.request import Req
from sglang_core.sampling.sampler import Sampler
from sglang_core.scheduler.admission import Admission
from sglang_core.scheduler.batch_runner import BatchRunner, Chunk
from sglang_core.scheduler.length_regimes import length_regimes
from sglang_core.scheduler.overlap import OverlappedDecode
from sglang_core.scheduler.request_memory import RequestMemory
from sglang_core.scheduler.step_budget import StepBudget


class Scheduler:
    def __init__(self, runner: ModelRunner, settings: EngineSettings, sampler: Sampler, tokenizer,
                 eos_token_ids: set[int], grammars: GrammarCompiler | None = None):
        self.settings = settings
        self.grammars = grammars
        self.memory = RequestMemory(runner.req_pool, runner.kv_pool, radix_cache=not settings.disable_radix_cache)
        self.batches = BatchRunner(runner, settings, sampler, tokenizer, eos_token_ids, self.memory, self._finish)
        # A model whose KV depends on its sequence's length (LongRoPE), else None: no cost per step.
        self.regimes = length_regimes(runner.model)
        self.admission = Admission(settings, self.memory, self.regimes)
        # Decodes-first steps under a token budget (--max-step-tokens / --target-step-ms / -ratio), else None.
        budgeted = any(v is not None for v in (settings.max_step_tokens, settings.target_step_ms,
                                                settings.target_step_ratio))
        self.step_budget = StepBudget(settings) if budgeted else None
        graphs = runner.cuda_graphs if not settings.disable_overlap_schedule else None
        self.overlap = OverlappedDecode(self.batches, self.memory, graphs.max_bs if graphs is not None else 0)
        self.waiting: list[Req] = []
        self.running: list[Req] = []
        self.chunked: Req | None = None  # the one request part-way through a chunked prefill
        self.extending: list[Req] = []  # the requests of the extend step now running
        # Set when waiting requests could not be admitted; cleared by anything that may change
        # that (an arrival, a finish). While set, waiting requests do not stop overlapped decode.
        self._admission_blocked = False
        self.finished_in_step: list[Req] = []  # so a step that fails part-way loses no finished request

    # The counters the engine reports (``stats``), each kept by the part that counts it.
    forward_steps = property(lambda self: self.batches.forward_steps)
    cascade_decode_rows = property(lambda self: self.batches.cascade_decode_rows)
    images_encoded = property(lambda self: self.batches.images_encoded)
    retractions = property(lambda self: self.admission.retractions)
    mixed_decode_tokens = property(lambda self: self.admission.mixed_decode_tokens)
    overlapped_steps = property(lambda self: self.overlap.steps)

    @property
    def overlap_max_bs(self) -> int:
        """The largest batch decoded overlapped (0: never); tests switch it on on the CPU."""
        return self.overlap.max_bs

    @overlap_max_bs.setter
    def overlap_max_bs(self, value: int) -> None:
        self.overlap.max_bs = value

    # ---- requests in and out -------------------------------------------------------------

    def add_request(self, req: Req) -> None:
        """Queue a validated request (prompt fits the context and the KV pool)."""
        self.batches.track(req)
        self.overlap.track(req)
        constraint = req.sampling_params.constraint
        if constraint is not None:  # compiled off this thread; the request waits until it is ready
            if self.grammars is None:
                req.grammar_future = Future()
                req.grammar_future.set_exception(ValueError(f"{constraint[0]}: no grammar backend is loaded"))
            else:
                req.grammar_future = self.grammars.get(*constraint)
        self.waiting.append(req)
        self._admission_blocked = False

    def abort(self, rid: str) -> Req | None:
        """End a request wherever it is; returns it (finished) or None if unknown."""
        for req in self._all_requests():
            if req.rid == rid:
                self._finish(req, {"type": "abort", "message": "aborted"})
                return req
        return None

    def fail_all(self, message: str) -> list[Req]:
        """End every request after an internal error, caching none of their KV."""
        self.overlap.in_flight = None
        reqs = list(self._all_requests())
        self.extending = []
        for req in reqs:
            self._finish(req, {"type": "abort", "message": message}, cache=False)
        return reqs

    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self.chunked or self.overlap.in_flight)

    def _all_requests(self) -> list[Req]:
        reqs = self.waiting + self.running + ([self.chunked] if self.chunked else [])
        queued = set(map(id, reqs))
        return reqs + [r for r in self.extending if id(r) not in queued and not r.finished]

    def _finish(self, req: Req, reason: dict, cache: bool = True) -> None:
        req.finished_reason = reason
        self.finished_in_step.append(req)
        self._admission_blocked = False
        for queue in (self.waiting, self.running):
            if req in queue:
                queue.remove(req)
        if self.chunked is req:
            self.chunked = None
        self.memory.release(req, cache)
        self.batches.forget(req.rid)
        self.overlap.forget(req.rid)

    # ---- one step --------------------------------------------------------------------------

    @torch.inference_mode()
    def step(self) -> list[Req]:
        """Run one forward pass; return the requests that got a token or finished."""
        self.finished_in_step = []
        return self._resolve_grammars() + self._step()

    def _resolve_grammars(self) -> list[Req]:
        """Start the walkers of waiting requests whose grammar has compiled; fail those whose
        grammar could not be compiled (returned, finished)."""
        failed = []
        for req in [r for r in self.waiting if r.awaiting_grammar]:
            if not req.grammar_future.done():
                if time.monotonic() - req.arrival_time > self.settings.grammar_compile_timeout_s:
                    kind = req.sampling_params.constraint[0]
                    self._finish(req, {"type": "abort", "message": f"{kind}: compiling took longer than "
                                       f"{self.settings.grammar_compile_timeout_s:g} s", "status_code": 400},
                                 cache=False)
                    failed.append(req)
                continue
            try:
                req.grammar = req.grammar_future.result().new_state()
                if req.sampling_params.constraint_after_ids:
                    req.grammar = DeferredGrammarState(req.grammar, req.sampling_params.constraint_after_ids)
            except Exception as exc:  # the backend's error names the field; it ends this request only
                # status_code 400: the request's own constraint is at fault (SGLang's abort field).
                self._finish(req, {"type": "abort", "message": str(exc), "status_code": 400}, cache=False)
                failed.append(req)
                continue
            self._admission_blocked = False
        return failed

    def _step(self) -> list[Req]:
        if self.overlap.in_flight is not None:
            nothing_to_admit = (not self.waiting or self._admission_blocked) and not self.chunked
            if self.regimes is not None and self.regimes.crossing(self.running):
                nothing_to_admit = False  # it is retracted and prefilled again first
            return self._decoded(self.overlap.advance(self.running, nothing_to_admit))
        if self.regimes is not None and self.admission.retract_to_recompute(self.running, self.waiting):
            self._admission_blocked = False
        jumped = [r for r in self.running if r.fill_len - r.kv_len > 1]
        if jumped and self.step_budget is None and (chunks := self.admission.grow_running(jumped)):
            return self._run_extend(chunks)
        if self.step_budget is None:
            chunks, self.chunked = self.admission.schedule_extend(self.waiting, self.running, self.chunked)
            if chunks:
                if self.settings.enable_mixed_chunk:
                    chunks += self.admission.riding_decodes(self.running)
                return self._run_extend(chunks)
        elif (chunks := self._schedule_budgeted()):
            return self._run_budgeted(chunks)
        self._admission_blocked = bool(self.waiting)
        # A jump-forward the budget left part-way has no next input token to decode from.
        if self.running and not jumped and self.overlap.can_launch_ahead(self.running):
            self.overlap.start(self.running)
            return []
        if self.running:
            return self._decoded(self._run_decode())
        compiling = [r.grammar_future for r in self.waiting if r.awaiting_grammar]
        if compiling:  # nothing else to do: wait a little for a grammar rather than spin
            futures.wait(compiling, timeout=0.01, return_when=futures.FIRST_COMPLETED)
        return []

    def _run_extend(self, chunks: list[Chunk]) -> list[Req]:
        present = set(map(id, self.running))  # jump-forward and mixed steps extend running requests
        # Admission took these off the queue; while their step runs they are in no queue, and an
        # error in it must still find them (fail_all) to answer their callers and free their KV.
        self.extending = [chunk.req for chunk in chunks]
        finals, prefilled = self.batches.run_extend(chunks, present)
        self.extending = []
        self.running += [req for req in finals if not req.finished and id(req) not in present]
        for req in prefilled:
            self._finish(req, {"type": "length", "length": 0})
        return finals + prefilled

    def _schedule_budgeted(self) -> list[Chunk]:
        """A step under the token budget: every running decode, then jump-forward tokens, then
        prefill in what is left. Decodes that fill the budget get a plain decode step; the rest
        waits for one to finish."""
        decoding = [r for r in self.running if r.fill_len - r.kv_len == 1]
        jumped = [r for r in self.running if r.fill_len - r.kv_len > 1]
        queued = sum(r.fill_len - r.kv_len for r in self.waiting) + (
            self.chunked.fill_len - self.chunked.kv_len if self.chunked else 0)
        room = self.step_budget.tokens(len(decoding), queued) - len(decoding)
        if room <= 0:
            return []
        chunks = self.admission.grow_running(jumped, room)
        room -= sum(c.end - c.start for c in chunks)
        if room > 0:
            prefill, self.chunked = self.admission.schedule_extend(self.waiting, self.running, self.chunked, room)
            chunks += prefill
        # ``decoding`` is taken before the jumps grow: one split to a last token decodes next step.
        return chunks + self.admission.riding_decodes(decoding) if chunks else []

    def _run_budgeted(self, chunks: list[Chunk]) -> list[Req]:
        """Run a budgeted step; with a latency target, time it for the budget's cost model."""
        if not self.step_budget.timed:
            return self._run_extend(chunks)
        start = time.perf_counter()
        reqs = self._run_extend(chunks)
        device = self.batches.runner.device
        if device.type == "cuda":  # a step that samples nothing returns before the device has run it
            torch.cuda.synchronize(device)
        self.step_budget.record(sum(c.end - c.start for c in chunks), time.perf_counter() - start)
        return reqs

    def _decoded(self, reqs: list[Req]) -> list[Req]:
        """Note a plain decode step's end for a budget that follows decode step times."""
        if self.step_budget is not None:
            self.step_budget.decoded(time.perf_counter())
        return reqs

    def _run_decode(self) -> list[Req]:
        too_big = self.admission.make_room_for_decode(self.running, self.waiting)
        if too_big is not None:
            self._finish(too_big, {"type": "abort", "message": "the KV cache cannot hold this request"})
        reqs = [r for r in self.running if r.fill_len - r.kv_len == 1]  # not those awaiting a jump
        if not reqs:
            return []
        logits = self.batches.decode(reqs, [req.fill_id(req.fill_len - 1) for req in reqs])
        self.batches.append_sampled(reqs, logits)
        return reqs

    # ---- accounting ------------------------------------------------------------------------

    def flush_cache(self) -> bool:
        """Drop the prefix cache; only when no request holds memory."""
        if self.has_work():
            return False
        self.memory.flush()
        return True

    def memory_report(self) -> dict[str, int]:
        return {
            **self.memory.report(),
            "waiting": len(self.waiting),
            "running": len(self.running) + (1 if self.chunked else 0),
        }

    def check_memory(self) -> None:
        """When idle: every slot is either free or owned by the cache, exactly once."""
        assert not self.has_work(), "check_memory runs only when idle"
        self.memory.check_all_returned()

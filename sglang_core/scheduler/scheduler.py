"""Continuous batching: decides each step's batch and applies its sampled tokens.

The scheduler decides; the pools and prefix cache own memory (it only calls their methods); the
model runner runs. Every way a request ends goes through ``_finish``, which gives back all of its
memory in ``_release``.

Overlapped decode (CUDA graphs only): while the running batch stays the same, decode step N+1 is
launched with step N's sampled ids still on the GPU, and only then are N's ids read back and
applied on the host. The host's bookkeeping runs while the GPU computes, instead of between
steps. A request that N finishes gets one wasted token from N+1, dropped when N+1 is read.
Where sampling depends on N's tokens on the host (a grammar's mask, penalties), only N+1's
forward pass is launched ahead; it is sampled once N's tokens are applied, still while the GPU
runs N+1's forward. A request that N's tokens end or jump forward samples nothing from N+1.
The schedule's logic is device-agnostic (on the CPU it gains nothing, the forward pass having
finished when it returns, but runs the same code, which is how CI checks it).
"""

from __future__ import annotations

import math
import time
from concurrent import futures
from concurrent.futures import Future
from dataclasses import dataclass
from types import SimpleNamespace

import torch

from sglang_core.config import EngineSettings
from sglang_core.constrained.compiler import GrammarCompiler
from sglang_core.mem.prefix_cache import NoPrefixCache, RadixCache
from sglang_core.model_executor.forward_batch import ForwardMode
from sglang_core.model_executor.runner import ModelRunner, StepInput
from sglang_core.request import Req
from sglang_core.sampling.logits_processor import SamplingBatch, to_device
from sglang_core.sampling.sampler import SampleResult, Sampler, token_logprobs
from sglang_core.sampling.stop import StopChecker
from sglang_core.scheduler.policy import order_waiting


# A waiting request that would share at least this many more tokens with a prompt being prefilled
# than with the cache waits for that prompt to be cached.
IN_BATCH_SHARE_MIN = 32
# Cascade decode groups requests sharing at least this many cached tokens: below it, reading the
# prefix per request costs less than the extra kernel.
CASCADE_MIN_SHARED = 32
# The in-batch prefix tree lives on the host and holds no real slots.
_HOST_POOL = SimpleNamespace(device=torch.device("cpu"))


def _placeholder_slots(n: int) -> torch.Tensor:
    return torch.zeros(n, dtype=torch.int64)


@dataclass
class _Chunk:
    """One request's share of an extend step: its tokens ``fill_ids[start:end]``."""

    req: Req
    start: int
    end: int


@dataclass
class _InFlight:
    """A decode step launched but not yet read back. Until it is sampled (at launch, or after
    the previous step's tokens are applied) it holds its logits and no ids."""

    reqs: list[Req]
    logits: torch.Tensor | None = None  # [B, V], until sampled
    next_ids: torch.Tensor | None = None  # [B] sampled ids, on the device
    host_ids: torch.Tensor | None = None  # [B] pinned host copy, valid once ``ready`` has fired
    ready: torch.cuda.Event | None = None  # CUDA only: elsewhere the copy is done on return


class Scheduler:
    def __init__(self, runner: ModelRunner, settings: EngineSettings, sampler: Sampler, tokenizer,
                 eos_token_ids: set[int], grammars: GrammarCompiler | None = None):
        self.runner = runner
        self.settings = settings
        self.sampler = sampler
        self.tokenizer = tokenizer
        self.eos_token_ids = eos_token_ids
        self.grammars = grammars
        self.req_pool = runner.req_pool
        self.kv_pool = runner.kv_pool
        self.cache = (NoPrefixCache if settings.disable_radix_cache else RadixCache)(self.kv_pool)
        self.chunk_size = settings.chunked_prefill_size if settings.chunked_prefill_size > 0 else None
        self.waiting: list[Req] = []
        self.running: list[Req] = []
        self.chunked: Req | None = None  # the one request part-way through a chunked prefill
        self._stop: dict[str, StopChecker] = {}
        self.forward_steps = 0
        self.retractions = 0
        self.mixed_decode_tokens = 0  # decode tokens computed inside prefill steps (--enable-mixed-chunk)
        self.cascade_decode_rows = 0  # decode rows that read a shared prefix per group (--enable-cascade-decode)
        # The largest running batch whose decode may be launched ahead: the CUDA graphs' (the
        # launch must not wait for the host), 0 when the schedule is off.
        self.overlap_max_bs = (runner.cuda_graphs.max_bs if runner.cuda_graphs is not None
                               and not settings.disable_overlap_schedule else 0)
        self._in_flight: _InFlight | None = None
        # rid -> how its decode overlaps the previous step: absent when it cannot (logprobs are
        # read back per step), True when it is sampled at launch (sampling reads no token history),
        # False when it is sampled after the previous step's tokens are applied.
        self._samples_ahead: dict[str, bool] = {}
        self.overlapped_steps = 0  # decode steps launched while the previous one was in flight
        # Set when waiting requests could not be admitted; cleared by anything that may change
        # that (an arrival, a finish). While set, waiting requests do not stop overlapped decode.
        self._admission_blocked = False
        self.finished_in_step: list[Req] = []  # so a step that fails part-way loses no finished request

    # ---- requests in and out -------------------------------------------------------------

    def add_request(self, req: Req) -> None:
        """Queue a validated request (prompt fits the context and the KV pool)."""
        self._stop[req.rid] = StopChecker(self.tokenizer, req.sampling_params, self.eos_token_ids)
        if not req.return_logprob:
            self._samples_ahead[req.rid] = not any(p.wants(req.sampling_params) for p in self.sampler.processors)
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
        self._in_flight = None
        reqs = list(self._all_requests())
        for req in reqs:
            self._finish(req, {"type": "abort", "message": message}, cache=False)
        return reqs

    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self.chunked or self._in_flight)

    def _all_requests(self) -> list[Req]:
        return self.waiting + self.running + ([self.chunked] if self.chunked else [])

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
                                       f"{self.settings.grammar_compile_timeout_s:g} s"}, cache=False)
                    failed.append(req)
                continue
            try:
                req.grammar = req.grammar_future.result().new_state()
            except Exception as exc:  # the backend's error names the field; it ends this request only
                self._finish(req, {"type": "abort", "message": str(exc)}, cache=False)
                failed.append(req)
                continue
            self._admission_blocked = False
        return failed

    def _step(self) -> list[Req]:
        if self._in_flight is not None:
            return self._step_overlapped()
        jumped = [r for r in self.running if r.fill_len - r.kv_len > 1]
        if jumped and (done := self._run_jumped(jumped)):
            return done
        chunks = self._schedule_extend()
        if chunks:
            return self._run_extend(chunks + self._riding_decodes() if self.settings.enable_mixed_chunk else chunks)
        self._admission_blocked = bool(self.waiting)
        if self.running and self._can_launch_ahead():
            self._in_flight = self._launch_decode(None)
            return []
        if self.running:
            return self._run_decode()
        compiling = [r.grammar_future for r in self.waiting if r.awaiting_grammar]
        if compiling:  # nothing else to do: wait a little for a grammar rather than spin
            futures.wait(compiling, timeout=0.01, return_when=futures.FIRST_COMPLETED)
        return []

    def _step_overlapped(self) -> list[Req]:
        """Launch the next decode from the in-flight one's ids (when nothing else must run
        first), then read the in-flight step back and apply it."""
        done, self._in_flight = self._in_flight, None
        members = set(map(id, done.reqs))
        if ((not self.waiting or self._admission_blocked) and not self.chunked and self.running
                and all(id(r) in members for r in self.running) and self._can_launch_ahead()):
            self._in_flight = self._launch_decode(done)
            self.overlapped_steps += 1
        if done.ready is not None:
            done.ready.synchronize()
        live = [(i, req) for i, req in enumerate(done.reqs) if not req.finished]
        next_ids = done.host_ids.tolist()
        self._append_tokens([req for _, req in live], [next_ids[i] for i, _ in live])
        if self._in_flight is not None and self._in_flight.next_ids is None:
            self._sample_deferred(self._in_flight)
        return [req for _, req in live]

    def _sample_deferred(self, flight: _InFlight) -> None:
        """Sample a step launched before its input tokens were applied on the host, now that they
        are. Rows whose request has since ended or jumped forward sample nothing: the step's KV
        write of their input token stands, and a jumped request extends from there."""
        live = [i for i, req in enumerate(flight.reqs) if not req.finished and req.fill_len == req.kv_len]
        if not live:
            self._in_flight = None
            return
        if len(live) < len(flight.reqs):
            flight.logits = flight.logits[to_device(torch.tensor(live, dtype=torch.int64), flight.logits.device)]
            flight.reqs = [flight.reqs[i] for i in live]
        self._sample_in_flight(flight)

    def _can_launch_ahead(self) -> bool:
        """A decode may run without its ids on the host: graphs, memory without retraction, no
        request that wants logprobs (they are read back every step)."""
        return (len(self.running) <= self.overlap_max_bs and self._available() >= len(self.running)
                and all(r.rid in self._samples_ahead for r in self.running))

    def _launch_decode(self, previous: _InFlight | None) -> _InFlight:
        """Run one decode step of ``running`` up to its sampled ids, without reading them back.
        Input ids come from ``previous`` (on the device) or, without one, from the host. With a
        previous step whose tokens sampling needs, only the forward pass runs here."""
        reqs = list(self.running)
        if previous is None:
            input_ids: list[int] | torch.Tensor = [req.fill_id(req.fill_len - 1) for req in reqs]
        else:
            row = {id(req): i for i, req in enumerate(previous.reqs)}
            index = torch.tensor([row[id(req)] for req in reqs], dtype=torch.int64)
            input_ids = previous.next_ids[to_device(index, previous.next_ids.device)]
        slots = self._append_slots(reqs)
        chunks = [_Chunk(req, req.kv_len - 1, req.kv_len) for req in reqs]
        logits = self._forward(ForwardMode.DECODE, input_ids, [req.kv_len - 1 for req in reqs], chunks,
                               list(range(len(reqs))), slots)
        flight = _InFlight(reqs, logits)
        if previous is None or all(self._samples_ahead[req.rid] for req in reqs):
            self._sample_in_flight(flight)
        return flight

    def _sample_in_flight(self, flight: _InFlight) -> None:
        """Sample on the device and start copying the ids to the host (``ready`` fires when done)."""
        batch = SamplingBatch.build(flight.reqs, self.runner.vocab_size, flight.logits.device, self.eos_token_ids)
        flight.next_ids = self.sampler(flight.logits, batch).next_ids
        flight.logits = None
        on_gpu = flight.next_ids.is_cuda
        flight.host_ids = torch.empty(flight.next_ids.shape, dtype=flight.next_ids.dtype, pin_memory=on_gpu)
        flight.host_ids.copy_(flight.next_ids, non_blocking=on_gpu)
        if on_gpu:
            flight.ready = torch.cuda.Event()
            flight.ready.record()

    def _schedule_extend(self) -> list[_Chunk]:
        """Pick this step's prefill work: the chunked request's next chunk, then waiting requests
        in policy order while the token budget, request rows and KV memory last."""
        budget = min(self.chunk_size or math.inf, self.settings.max_prefill_tokens)
        chunks: list[_Chunk] = []
        # Prompts being prefilled now: a waiting request that shares a long prefix with one of
        # them waits a step and reuses it from the cache instead of computing it again.
        in_batch = type(self.cache)(_HOST_POOL)  # no prefix cache: nothing to wait for
        if self.chunked is not None and self.waiting:  # with nobody waiting nobody can share it
            in_batch.insert(self.chunked.fill_ids, _placeholder_slots(self.chunked.fill_len))
        if self.chunked is not None:
            req = self.chunked
            n = int(min(req.fill_len - req.kv_len, budget))
            if not self._grow(req, n):
                return []  # decode steps will finish or retract requests and free memory
            chunks.append(_Chunk(req, req.kv_len - n, req.kv_len))
            budget -= n
            if req.kv_len == req.fill_len:
                self.chunked = None
        reserved = sum(self._decode_reserve(r) for r in self.running)
        queue = order_waiting([r for r in self.waiting if not r.awaiting_grammar], self.settings.schedule_policy,
                              lambda r: len(self.cache.match_prefix(self._prefix_key(r))[0]),
                              self.settings.schedule_aging_s)
        for req in queue:
            if budget <= 0 or len(self.running) + len(chunks) >= self.settings.max_running_requests:
                break
            if self.req_pool.available_size() == 0:
                break
            key = self._prefix_key(req)
            prefix, handle = self.cache.match_prefix(key)
            if len(in_batch.match_prefix(key)[0]) - len(prefix) >= IN_BATCH_SHARE_MIN:
                continue
            self.cache.lock(handle)
            extend = req.fill_len - len(prefix)
            if self.chunk_size:
                n = int(min(extend, budget))
            else:  # unchunked: a long prompt may exceed the budget only when it runs alone
                n = extend if (extend <= budget or not chunks) else 0
            partial = n < extend
            fits = extend + self._decode_reserve(req) <= self._available() - reserved
            if n == 0 or not fits or (partial and self.chunked is not None):
                self.cache.unlock(handle)
                break
            self._admit(req, prefix, handle)
            if not self._grow(req, n):
                self._release(req, cache=False)
                break
            self.waiting.remove(req)
            in_batch.insert(key, _placeholder_slots(len(key)))
            chunks.append(_Chunk(req, req.kv_len - n, req.kv_len))
            budget -= n
            reserved += self._decode_reserve(req)
            if partial:
                self.chunked = req
        return chunks

    def _run_extend(self, chunks: list[_Chunk]) -> list[Req]:
        input_ids: list[int] = []
        positions: list[int] = []
        logit_index: list[int] = []
        prompt_rows: list[tuple[Req, int, int]] = []  # (req, first logit row, row count)
        finals: list[Req] = []
        final_rows: list[int] = []
        prefilled: list[Req] = []
        for chunk in chunks:
            req, a, b = chunk.req, chunk.start, chunk.end
            offset = len(input_ids)
            input_ids += req.fill_ids[a:b]
            positions += range(a, b)
            first, last = self._prompt_logprob_span(req, a, b)  # prompt tokens [first, last)
            if last > first:
                prompt_rows.append((req, len(logit_index), last - first))
                logit_index += [offset + (p - 1 - a) for p in range(first, last)]
            if b == req.fill_len and req.sampling_params.max_new_tokens == 0:
                prefilled.append(req)  # prefill only: the prompt is cached, nothing is sampled
            elif b == req.fill_len:  # the whole prompt is in: sample the next token
                finals.append(req)
                final_rows.append(len(logit_index))
                logit_index.append(offset + b - a - 1)
        logits = self._forward(ForwardMode.EXTEND, input_ids, positions, chunks, logit_index)
        present = set(map(id, self.running))  # jump-forward and mixed steps extend running requests
        for req in finals:
            if id(req) not in present:
                self._cache_prompt(req)
        for req, row, count in prompt_rows:
            self._record_prompt_logprobs(req, logits[row : row + count])
        self._sample_and_append(finals, logits[final_rows])
        self.running += [req for req in finals if not req.finished and id(req) not in present]
        for req in prefilled:
            self._finish(req, {"type": "length", "length": 0})
        return finals + prefilled

    def _riding_decodes(self) -> list[_Chunk]:
        """Mixed steps: each running request's next token as a one-token extend in the prefill
        step, so a long prompt does not stall every decode behind it. Requests the memory cannot
        grow now simply wait for the next decode step."""
        chunks = []
        for req in self.running:
            if req.fill_len - req.kv_len == 1 and self._grow(req, 1):
                chunks.append(_Chunk(req, req.kv_len - 1, req.kv_len))
        self.mixed_decode_tokens += len(chunks)
        return chunks

    def _run_jumped(self, reqs: list[Req]) -> list[Req]:
        """Extend requests that jump-forward gave several new tokens: their forced tokens go
        through the model in one pass (the cached prefix is reused) and the next is sampled."""
        chunks = []
        for req in reqs:
            n = req.fill_len - req.kv_len
            if self._grow(req, n):  # short of memory: it waits, and decode steps free some
                chunks.append(_Chunk(req, req.kv_len - n, req.kv_len))
        return self._run_extend(chunks) if chunks else []

    def _run_decode(self) -> list[Req]:
        self._make_room_for_decode()
        reqs = [r for r in self.running if r.fill_len - r.kv_len == 1]  # not those awaiting a jump
        if not reqs:
            return []
        slots = self._append_slots(reqs)
        input_ids = [req.fill_id(req.kv_len - 1) for req in reqs]
        positions = [req.kv_len - 1 for req in reqs]
        chunks = [_Chunk(req, req.kv_len - 1, req.kv_len) for req in reqs]
        logits = self._forward(ForwardMode.DECODE, input_ids, positions, chunks, list(range(len(reqs))), slots)
        self._sample_and_append(reqs, logits)
        return reqs

    # ---- helpers ---------------------------------------------------------------------------

    def _append_slots(self, reqs: list[Req]) -> torch.Tensor:
        """One more KV slot per request, written into the request rows with one scatter."""
        slots = self._alloc(len(reqs))
        assert slots is not None, "the caller checked that a slot is free for every request"
        device = self.req_pool.req_to_token.device
        rows = torch.tensor([req.req_pool_idx for req in reqs], dtype=torch.int64)
        columns = torch.tensor([req.kv_len for req in reqs], dtype=torch.int64)
        self.req_pool.req_to_token[rows.to(device, non_blocking=True), columns.to(device, non_blocking=True)] = slots
        for req in reqs:
            req.kv_len += 1
        return slots

    def _forward(self, mode: ForwardMode, input_ids: list[int] | torch.Tensor, positions: list[int], chunks: list[_Chunk],
                 logit_index: list[int], out_cache_loc: torch.Tensor | None = None) -> torch.Tensor:
        if out_cache_loc is None:
            table = self.req_pool.req_to_token
            out_cache_loc = torch.cat([table[c.req.req_pool_idx, c.start : c.end] for c in chunks])
        shared = ()
        if mode is ForwardMode.DECODE and self.settings.enable_cascade_decode:
            shared = self.cache.shared_prefixes([c.req.cache_handle for c in chunks], CASCADE_MIN_SHARED)
            self.cascade_decode_rows += sum(len(rows) for _, rows in shared)
        step = StepInput(
            mode=mode,
            input_ids=input_ids,
            positions=positions,
            out_cache_loc=out_cache_loc,
            req_pool_indices=[c.req.req_pool_idx for c in chunks],
            seq_lens=[c.end for c in chunks],
            prefix_lens=[c.start for c in chunks],
            logit_index=logit_index,
            shared_prefixes=shared,
        )
        self.forward_steps += 1
        return self.runner.forward(step)

    def _sample_and_append(self, reqs: list[Req], logits: torch.Tensor) -> None:
        if not reqs:
            return
        batch = SamplingBatch.build(reqs, self.runner.vocab_size, logits.device, self.eos_token_ids)
        result = self.sampler(logits, batch)
        self._append_tokens(reqs, result.next_ids.tolist(), result)

    def _append_tokens(self, reqs: list[Req], next_ids: list[int], result: SampleResult | None = None) -> None:
        """Give each request its sampled token (and logprobs), then finish those that stop."""
        for i, req in enumerate(reqs):
            req.output_ids.append(next_ids[i])
            if req.grammar is not None:
                try:
                    req.grammar.advance(next_ids[i])
                except Exception as exc:  # a grammar backend's failure ends its own request only
                    self._finish(req, {"type": "abort", "message": f"grammar backend error: {exc}"})
                    continue
            if req.return_logprob:
                req.output_token_logprobs.append(float(result.logprobs[i]))
                req.output_top_logprobs.append(result.top_logprobs[i])
            reason = self._stop[req.rid].check(req.output_ids)
            if reason is None and req.grammar is not None:
                reason = self._jump_forward(req)
            if reason is None and req.fill_len >= self.runner.context_len:
                reason = {"type": "length", "length": len(req.output_ids)}
            if reason is not None:
                self._finish(req, reason)

    def _jump_forward(self, req: Req) -> dict | None:
        """Append the text the request's grammar forces from here (no forward pass per token: the
        next step extends it in one); return a finish reason if that completes the request."""
        if req.grammar.is_finished():
            return {"type": "stop", "matched": None}  # the constraint is complete: only EOS could follow
        if self.settings.disable_jump_forward or req.return_logprob:  # logprobs need a forward per token
            return None
        room = min(req.sampling_params.max_new_tokens - len(req.output_ids),
                   self.runner.context_len - req.fill_len)
        forced = req.grammar.forced_tokens(room) if room > 0 else []
        if not forced:
            return None
        req.output_ids += forced
        req.forced_tokens += len(forced)
        reason = self._stop[req.rid].check(req.output_ids)
        if reason is None and req.grammar.is_finished():
            reason = {"type": "stop", "matched": None}
        return reason

    def _prompt_logprob_span(self, req: Req, a: int, b: int) -> tuple[int, int]:
        """Prompt tokens whose logprobs this chunk ``[a, b)`` can give (token p needs hidden p-1)."""
        if not req.return_logprob or req.logprob_start_len < 0:
            return 0, 0
        prompt_len = len(req.origin_input_ids)
        need_from = req.logprob_start_len + len(req.input_token_logprobs)
        if need_from == 0:  # the first token has no logprob
            req.input_token_logprobs.append(None)
            req.input_top_logprobs.append(None)
            need_from = 1
        first, last = max(need_from, a + 1), min(b, prompt_len - 1) + 1
        return (first, last) if need_from < prompt_len else (0, 0)

    def _record_prompt_logprobs(self, req: Req, logits: torch.Tensor) -> None:
        start = req.logprob_start_len + len(req.input_token_logprobs)
        targets = torch.tensor(req.origin_input_ids[start : start + logits.shape[0]], device=logits.device)
        values, top_vals, top_ids = token_logprobs(logits, targets, req.top_logprobs_num)
        for i in range(logits.shape[0]):
            req.input_token_logprobs.append(float(values[i]))
            req.input_top_logprobs.append(list(zip(top_vals[i].tolist(), top_ids[i].tolist())))

    def _prefix_key(self, req: Req) -> list[int]:
        """Tokens that may come from the cache: never the last (its logits are needed), and none
        from which prompt logprobs are still wanted."""
        cap = req.fill_len - 1
        if req.return_logprob and req.logprob_start_len >= 0:
            need_from = req.logprob_start_len + len(req.input_token_logprobs)
            if need_from < len(req.origin_input_ids):
                cap = min(cap, max(need_from - 1, 0))
        return req.fill_ids[:cap]

    def _decode_reserve(self, req: Req) -> int:
        left = req.sampling_params.max_new_tokens - len(req.output_ids)
        return int(max(left, 0) * self.settings.new_token_ratio)

    def _available(self) -> int:
        return self.kv_pool.available_size() + self.cache.evictable_size()

    def _alloc(self, n: int) -> torch.Tensor | None:
        short = n - self.kv_pool.available_size()
        if short > 0:
            self.cache.evict(short)
        return self.kv_pool.alloc(n)

    def _admit(self, req: Req, prefix: torch.Tensor, handle) -> None:
        row = self.req_pool.alloc()
        assert row is not None, "admission checked for a free request row"
        req.req_pool_idx = row
        req.prefix_len = req.kv_len = len(prefix)
        req.cache_handle = handle
        self.req_pool.req_to_token[row, : len(prefix)] = prefix
        if req.times_retracted == 0:
            req.cached_tokens = len(prefix)

    def _grow(self, req: Req, n: int) -> bool:
        """Give the request ``n`` more KV slots at the end of its row (evicting cache if needed)."""
        slots = self._alloc(n)
        if slots is None:
            return False
        self.req_pool.req_to_token[req.req_pool_idx, req.kv_len : req.kv_len + n] = slots
        req.kv_len += n
        return True

    def _make_room_for_decode(self) -> None:
        """Retract the newest requests until every running one can take one more token."""
        while self.running and self._available() < len(self.running):
            victim = max(self.running, key=lambda r: r.arrival_time)
            if len(self.running) == 1:
                self._finish(victim, {"type": "abort", "message": "the KV cache cannot hold this request"})
                return
            self.running.remove(victim)
            self._release(victim, cache=False)
            victim.times_retracted += 1
            self.retractions += 1
            self.waiting.insert(0, victim)

    def _finish(self, req: Req, reason: dict, cache: bool = True) -> None:
        req.finished_reason = reason
        self.finished_in_step.append(req)
        self._admission_blocked = False
        for queue in (self.waiting, self.running):
            if req in queue:
                queue.remove(req)
        if self.chunked is req:
            self.chunked = None
        self._release(req, cache)
        self._stop.pop(req.rid, None)
        self._samples_ahead.pop(req.rid, None)

    def _cache_prompt(self, req: Req) -> None:
        """Put a just-prefilled prompt into the radix tree now rather than when the request ends,
        so requests admitted while it decodes (the rest of a batch sharing a system prompt) reuse
        it. The request then holds the tree's slots for it under a lock, like a matched prefix."""
        if self.settings.disable_radix_cache or req.kv_len <= req.prefix_len:
            return
        row, n = req.req_pool_idx, req.kv_len
        slots = self.req_pool.req_to_token[row, :n].clone()
        already = self.cache.insert(req.fill_ids[:n], slots)
        cached, handle = self.cache.match_prefix(req.fill_ids[:n])
        self.cache.lock(handle)
        self.cache.unlock(req.cache_handle)
        # Tokens another request cached meanwhile: ours are duplicates; use the tree's.
        self.kv_pool.free(slots[req.prefix_len : already])
        self.req_pool.req_to_token[row, :n] = cached
        req.cache_handle, req.prefix_len = handle, n

    def _release(self, req: Req, cache: bool) -> None:
        """Give back every KV slot and the request row; cache the computed prefix if asked."""
        if req.req_pool_idx is None:
            return
        slots = self.req_pool.req_to_token[req.req_pool_idx, : req.kv_len].clone()
        # An in-flight decode may hold a slot for a token not yet read back: freed, not cached.
        known = min(req.kv_len, req.fill_len)
        if cache and known > 0:
            already = self.cache.insert(req.fill_ids[:known], slots[:known])
            self.kv_pool.free(slots[req.prefix_len : already])
            self.kv_pool.free(slots[known:])
        else:
            self.kv_pool.free(slots[req.prefix_len :])
        if req.cache_handle is not None:
            self.cache.unlock(req.cache_handle)
        self.req_pool.free(req.req_pool_idx)
        req.req_pool_idx, req.cache_handle, req.prefix_len, req.kv_len = None, None, 0, 0

    # ---- accounting ------------------------------------------------------------------------

    def flush_cache(self) -> bool:
        """Drop the prefix cache; only when no request holds memory."""
        if self.has_work():
            return False
        self.cache.reset()
        self.kv_pool.clear()
        self.req_pool.clear()
        return True

    def memory_report(self) -> dict[str, int]:
        return {
            "kv_pool_size": self.kv_pool.size,
            "kv_free": self.kv_pool.available_size(),
            "kv_cached": self.cache.total_size(),
            "kv_cache_locked": self.cache.protected_size(),
            "request_rows": self.req_pool.size,
            "request_rows_free": self.req_pool.available_size(),
            "waiting": len(self.waiting),
            "running": len(self.running) + (1 if self.chunked else 0),
        }

    def check_memory(self) -> None:
        """When idle: every slot is either free or owned by the cache, exactly once."""
        assert not self.has_work(), "check_memory runs only when idle"
        owned = torch.cat((self.kv_pool.free_slots(), self.cache.all_slots().to(self.kv_pool.device)))
        expected = torch.arange(1, self.kv_pool.size + 1, device=owned.device)
        assert owned.numel() == self.kv_pool.size and torch.equal(owned.sort().values, expected), "KV slots leaked"
        assert self.cache.protected_size() == 0, "a finished request still locks the prefix cache"
        assert self.req_pool.available_size() == self.req_pool.size, "request rows leaked"

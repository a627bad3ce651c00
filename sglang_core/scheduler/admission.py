"""Admission: which requests get KV memory and a place in the next step, and who gives it back.

Waiting requests join an extend batch in policy order (``policy.order_waiting``) while the
prefill token budget, request rows and KV memory last, keeping a decode reserve for every
running request's remaining output; a prompt longer than the chunk size is prefilled one chunk
per step. Running requests with tokens not yet in the KV (jump-forward, mixed steps) grow when
memory allows. Before a decode step that memory cannot hold, the newest requests are retracted;
so is a request whose next step takes it into another length regime (``length_regimes``), to be
prefilled again in that regime. A request matches and caches its tokens in its regime's namespace.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import torch

from sglang_core.config import EngineSettings
from sglang_core.request import Req
from sglang_core.scheduler.batch_runner import Chunk
from sglang_core.scheduler.length_regimes import LengthRegimes
from sglang_core.scheduler.policy import order_waiting
from sglang_core.scheduler.request_memory import RequestMemory

# A waiting request that would share at least this many more tokens with a prompt being prefilled
# than with the cache waits for that prompt to be cached.
IN_BATCH_SHARE_MIN = 32
# The in-batch prefix tree lives on the host and holds no real slots.
_HOST_POOL = SimpleNamespace(device=torch.device("cpu"))


def _placeholder_slots(n: int) -> torch.Tensor:
    return torch.zeros(n, dtype=torch.int64)


class Admission:
    def __init__(self, settings: EngineSettings, memory: RequestMemory, regimes: LengthRegimes | None):
        self.settings = settings
        self.memory = memory
        self.regimes = regimes
        self.chunk_size = settings.chunked_prefill_size if settings.chunked_prefill_size > 0 else None
        self.retractions = 0
        self.mixed_decode_tokens = 0  # decode tokens computed inside prefill steps (--enable-mixed-chunk)

    def schedule_extend(self, waiting: list[Req], running: list[Req], chunked: Req | None,
                        step_tokens: int | None = None) -> tuple[list[Chunk], Req | None]:
        """Pick this step's prefill work: the chunked request's next chunk, then waiting requests
        in policy order while the token budget, request rows and KV memory last. Admitted
        requests leave ``waiting``. ``step_tokens`` (> 0): the prefill share of a step token
        budget, a further bound on the budget. Returns the chunks and the request part-way
        through a chunked prefill after this step (``chunked`` or its successor, or None)."""
        cache = self.memory.cache
        budget = min(self.chunk_size or math.inf, self.settings.max_prefill_tokens, step_tokens or math.inf)
        chunks: list[Chunk] = []
        # Prompts being prefilled now: a waiting request that shares a long prefix with one of
        # them waits a step and reuses it from the cache instead of computing it again.
        in_batch = type(cache)(_HOST_POOL)  # no prefix cache: nothing to wait for
        if chunked is not None and waiting:  # with nobody waiting nobody can share it
            in_batch.insert(chunked.key_ids, _placeholder_slots(chunked.fill_len), chunked.kv_regime)
        if chunked is not None:
            req = chunked
            n = int(min(req.fill_len - req.kv_len, budget))
            if not self.memory.grow(req, n):
                return [], chunked  # decode steps will finish or retract requests and free memory
            chunks.append(Chunk(req, req.kv_len - n, req.kv_len))
            budget -= n
            if req.kv_len == req.fill_len:
                chunked = None
        reserved = sum(self._decode_reserve(r) for r in running)
        queue = order_waiting([r for r in waiting if not r.awaiting_grammar], self.settings.schedule_policy,
                              lambda r: len(cache.match_prefix(self._prefix_key(r), self._regime(r))[0]),
                              self.settings.schedule_aging_s)
        for req in queue:
            if budget <= 0 or len(running) + len(chunks) >= self.settings.max_running_requests:
                break
            if self.memory.req_pool.available_size() == 0:
                break
            key, regime = self._prefix_key(req), self._regime(req)
            prefix, handle = cache.match_prefix(key, regime)
            if len(in_batch.match_prefix(key, regime)[0]) - len(prefix) >= IN_BATCH_SHARE_MIN:
                continue
            cache.lock(handle)
            extend = req.fill_len - len(prefix)
            if self.chunk_size:
                n = int(min(extend, budget))
            else:  # unchunked: a long prompt may exceed the budget only when it runs alone
                n = extend if (extend <= budget or not chunks) else 0
            partial = n < extend
            fits = extend + self._decode_reserve(req) <= self.memory.available() - reserved
            if n == 0 or not fits or (partial and chunked is not None):
                cache.unlock(handle)
                break
            self.memory.admit(req, prefix, handle, regime)
            if not self.memory.grow(req, n):
                self.memory.release(req, cache=False)
                break
            waiting.remove(req)
            in_batch.insert(key, _placeholder_slots(len(key)), regime)
            chunks.append(Chunk(req, req.kv_len - n, req.kv_len))
            budget -= n
            reserved += self._decode_reserve(req)
            if partial:
                chunked = req
        return chunks, chunked

    def grow_running(self, reqs: list[Req], budget: int | None = None) -> list[Chunk]:
        """Chunks of the running requests' tokens not yet in the KV (jump-forward gave several,
        a mixed step's decode one), for those whose memory can grow now; the rest wait, and
        decode steps free memory. ``budget``: the most tokens in all; a request's tokens past it
        wait for a later step, as a chunked prompt's do (they are in its output already, and it
        samples only once all are in the KV)."""
        chunks = []
        left = math.inf if budget is None else budget
        for req in reqs:
            if left <= 0:
                break
            n = int(min(req.fill_len - req.kv_len, left))
            if self.memory.grow(req, n):
                chunks.append(Chunk(req, req.kv_len - n, req.kv_len))
                left -= n
        return chunks

    def riding_decodes(self, running: list[Req]) -> list[Chunk]:
        """Mixed steps: each running request's next token as a one-token extend in the prefill
        step, so a long prompt does not stall every decode behind it. Requests the memory cannot
        grow now simply wait for the next decode step."""
        chunks = self.grow_running([r for r in running if r.fill_len - r.kv_len == 1])
        self.mixed_decode_tokens += len(chunks)
        return chunks

    def make_room_for_decode(self, running: list[Req], waiting: list[Req]) -> Req | None:
        """Retract the newest requests until every running one can take one more token: each
        gives back its memory and goes to the front of ``waiting``, keeping its output. Returns
        the request that cannot fit even alone (for the caller to end), else None."""
        while running and self.memory.available() < len(running):
            victim = max(running, key=lambda r: r.arrival_time)
            if len(running) == 1:
                return victim
            self._retract(victim, running, waiting, cache=False)
            self.retractions += 1
        return None

    def retract_to_recompute(self, running: list[Req], waiting: list[Req]) -> bool:
        """Retract each running request whose next step takes it into another length regime
        (only with ``regimes``): its KV goes into the prefix cache under its own regime, and it
        goes to the front of ``waiting``, keeping its output, to be prefilled again in the new
        regime (which matches none of the old one's tokens). Returns whether any was."""
        crossing = self.regimes.crossing(running)
        for req in crossing:
            self._retract(req, running, waiting, cache=True)
        return bool(crossing)

    def _retract(self, req: Req, running: list[Req], waiting: list[Req], cache: bool) -> None:
        running.remove(req)
        self.memory.release(req, cache)
        req.times_retracted += 1
        waiting.insert(0, req)

    def _regime(self, req: Req) -> int:
        """The length regime a request admitted now computes its KV in: its whole length's."""
        return 0 if self.regimes is None else self.regimes.of(req.fill_len)

    def _prefix_key(self, req: Req) -> list[int]:
        """Tokens that may come from the cache: never the last (its logits are needed), and none
        from which prompt logprobs are still wanted."""
        cap = req.fill_len - 1
        if req.return_logprob and req.logprob_start_len >= 0:
            need_from = req.logprob_start_len + len(req.input_token_logprobs)
            if need_from < len(req.origin_input_ids):
                cap = min(cap, max(need_from - 1, 0))
        return req.key_ids[:cap]

    def _decode_reserve(self, req: Req) -> int:
        left = req.sampling_params.max_new_tokens - len(req.output_ids)
        return int(max(left, 0) * self.settings.new_token_ratio)

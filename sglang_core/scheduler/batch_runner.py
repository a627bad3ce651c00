"""Running a chosen batch: the model's forward pass over it, sampling, and what each sampled
token does to its request (grammar, logprobs, stop checks, jump-forward).

It moves no request between queues: a request that a token ends goes to the scheduler's
``finish``, the one way a request ends.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

import torch

from sglang_core.config import EngineSettings
from sglang_core.messages import MediaItem
from sglang_core.model_executor.forward_batch import ForwardMode
from sglang_core.model_executor.runner import ModelRunner, StepInput
from sglang_core.request import Req
from sglang_core.sampling.logits_processor import SamplingBatch
from sglang_core.sampling.sampler import SampleResult, Sampler, token_logprobs
from sglang_core.sampling.stop import StopChecker
from sglang_core.scheduler.media_embeds import encode_step_media, step_input_embeds
from sglang_core.scheduler.media_positions import step_positions
from sglang_core.scheduler.request_memory import RequestMemory

# Cascade decode groups requests sharing at least this many cached tokens: below it, reading the
# prefix per request costs less than the extra kernel.
CASCADE_MIN_SHARED = 32

logger = logging.getLogger(__name__)


@dataclass
class Chunk:
    """One request's share of a forward step: its tokens ``fill_ids[start:end]``."""

    req: Req
    start: int
    end: int


class BatchRunner:
    def __init__(self, runner: ModelRunner, settings: EngineSettings, sampler: Sampler, tokenizer,
                 eos_token_ids: set[int], memory: RequestMemory, finish: Callable[..., None]):
        self.runner = runner
        self.settings = settings
        self.sampler = sampler
        self.tokenizer = tokenizer
        self.eos_token_ids = eos_token_ids
        self.memory = memory
        self._finish = finish
        self._stop: dict[str, StopChecker] = {}
        self.forward_steps = 0
        self.cascade_decode_rows = 0  # decode rows that read a shared prefix per group (--enable-cascade-decode)
        self.images_encoded = 0  # images the model's encoder has run on

    def track(self, req: Req) -> None:
        self._stop[req.rid] = StopChecker(self.tokenizer, req.sampling_params, self.eos_token_ids)

    def forget(self, rid: str) -> None:
        self._stop.pop(rid, None)

    def run_extend(self, chunks: list[Chunk], running: set[int]) -> tuple[list[Req], list[Req]]:
        """Extend each request by its chunk; sample a token for each whose prompt is now all in.
        ``running``: ids of the requests already running (jump-forward and mixed steps extend
        them too). Returns the requests sampled (and those ended by their images failing to encode)
        and those wholly prefilled that sample nothing."""
        # Once, before failed requests drop out (their images must be tried); if every request with
        # media failed, step_input_embeds finds no image left and gives None.
        with_media = any(c.req.media for c in chunks)
        failed = self._encode_media(chunks) if with_media else []
        ended = set(map(id, failed))
        chunks = [c for c in chunks if id(c.req) not in ended]
        if not chunks:
            return failed, []
        input_ids: list[int] = []
        logit_index: list[int] = []
        prompt_rows: list[tuple[Req, int, int]] = []  # (req, first logit row, row count)
        finals: list[Req] = []
        final_rows: list[int] = []
        prefilled: list[Req] = []
        for chunk in chunks:
            req, a, b = chunk.req, chunk.start, chunk.end
            offset = len(input_ids)
            input_ids += req.fill_ids[a:b]
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
        spans = [(c.req, c.start, c.end) for c in chunks]
        embeds = step_input_embeds(spans) if with_media else None
        if any(c.req.position_table is not None for c in chunks):
            positions: list[int] | torch.Tensor = step_positions(spans)
        else:
            positions = [p for c in chunks for p in range(c.start, c.end)]
        logits = self.forward(ForwardMode.EXTEND, input_ids, positions, chunks, logit_index, input_embeds=embeds)
        for req in finals:
            if id(req) not in running:
                self.memory.cache_prompt(req)
        for req, row, count in prompt_rows:
            self._record_prompt_logprobs(req, logits[row : row + count])
        if finals:
            self.append_sampled(finals, logits[final_rows])
        return failed + finals, prefilled

    def _encode_media(self, chunks: list[Chunk]) -> list[Req]:
        """Encode the step's new images; end each request whose images fail (its slots were
        never written: none is cached) and return those."""
        failed = encode_step_media([(c.req, c.start, c.end) for c in chunks], self._encode)
        for req, exc in failed:
            logger.warning("request %s: the model could not encode its media", req.rid, exc_info=exc)
            # status_code 400: the request's own images failed (encoded alone, if a batch failed).
            self._finish(req, {"type": "abort", "status_code": 400,
                               "message": f"the model could not encode this request's media: {type(exc).__name__}: {exc}"},
                         cache=False)
        return [req for req, _ in failed]

    def _encode(self, items: list[MediaItem]) -> list[torch.Tensor]:
        self.images_encoded += len(items)
        return self.runner.embed_media(items)

    def decode(self, reqs: list[Req], input_ids: list[int] | torch.Tensor) -> torch.Tensor:
        """One decode step's forward pass: each request's next input token gets a KV slot."""
        slots = self.memory.append_slots(reqs)
        chunks = [Chunk(req, req.kv_len - 1, req.kv_len) for req in reqs]
        # position_delta: a model's media-derived positions shift the tokens after the prompt (M-RoPE).
        return self.forward(ForwardMode.DECODE, input_ids, [req.kv_len - 1 + req.position_delta for req in reqs],
                            chunks, list(range(len(reqs))), slots)

    def forward(self, mode: ForwardMode, input_ids: list[int] | torch.Tensor, positions: list[int] | torch.Tensor,
                chunks: list[Chunk], logit_index: list[int], out_cache_loc: torch.Tensor | None = None,
                input_embeds: tuple[list[int], torch.Tensor] | None = None) -> torch.Tensor:
        if out_cache_loc is None:
            out_cache_loc = torch.cat([self.memory.token_slots(c.req, c.start, c.end) for c in chunks])
        shared = ()
        if mode is ForwardMode.DECODE and self.settings.enable_cascade_decode:
            shared = self.memory.cache.shared_prefixes([c.req.cache_handle for c in chunks], CASCADE_MIN_SHARED)
            self.cascade_decode_rows += sum(len(rows) for _, rows in shared)
        step = StepInput(
            mode=mode,
            input_ids=input_ids,
            positions=positions,
            out_cache_loc=out_cache_loc,
            req_pool_indices=[c.req.req_pool_idx for c in chunks],
            seq_lens=[c.end for c in chunks],
            prefix_lens=[c.start for c in chunks],
            # An overlapped decode runs before its input token is on the host: fill_len lags by one.
            fill_lens=[max(c.end, c.req.fill_len) for c in chunks],
            logit_index=logit_index,
            shared_prefixes=shared,
            input_embeds=input_embeds,
        )
        self.forward_steps += 1
        return self.runner.forward(step)

    def sample(self, reqs: list[Req], logits: torch.Tensor) -> SampleResult:
        batch = SamplingBatch.build(reqs, self.runner.vocab_size, logits.device, self.eos_token_ids)
        return self.sampler(logits, batch)

    def append_sampled(self, reqs: list[Req], logits: torch.Tensor) -> None:
        result = self.sample(reqs, logits)
        self.append_tokens(reqs, result.next_ids.tolist(), result)

    def append_tokens(self, reqs: list[Req], next_ids: list[int], result: SampleResult | None = None) -> None:
        """Give each request its sampled token (and logprobs), then finish those that stop."""
        for i, req in enumerate(reqs):
            req.output_ids.append(next_ids[i])
            if req.grammar is not None:
                try:
                    req.grammar.advance(next_ids[i])
                except Exception as exc:  # a grammar backend's failure ends its own request only
                    # The sampled token broke the constraint: the mask left no token that can spell
                    # its next bytes (a constraint this vocabulary cannot follow), so the request's
                    # constraint is at fault: status_code 400, as an uncompilable one.
                    kind = req.sampling_params.constraint[0]
                    self._finish(req, {"type": "abort", "status_code": 400,
                                       "message": f"{kind}: this vocabulary cannot follow the constraint ({exc})"})
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

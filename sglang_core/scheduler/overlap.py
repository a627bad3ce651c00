"""Overlapped decode (CUDA graphs only): the state of a decode step launched but not yet read back.

While the running batch stays the same, decode step N+1 is launched with step N's sampled ids
still on the GPU, and only then are N's ids read back and applied on the host. The host's
bookkeeping runs while the GPU computes, instead of between steps. A request that N finishes
gets one wasted token from N+1, dropped when N+1 is read. Where sampling depends on N's tokens
on the host (a grammar's mask, penalties), only N+1's forward pass is launched ahead; it is
sampled once N's tokens are applied, still while the GPU runs N+1's forward. A request that N's
tokens end or jump forward samples nothing from N+1.
The logic is device-agnostic (on the CPU it gains nothing, the forward pass having finished
when it returns, but runs the same code, which is how CI checks it).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sglang_core.request import Req
from sglang_core.sampling.logits_processor import to_device
from sglang_core.scheduler.batch_runner import BatchRunner
from sglang_core.scheduler.request_memory import RequestMemory


@dataclass
class InFlight:
    """A decode step launched but not yet read back. Until it is sampled (at launch, or after
    the previous step's tokens are applied) it holds its logits and no ids."""

    reqs: list[Req]
    logits: torch.Tensor | None = None  # [B, V], until sampled
    next_ids: torch.Tensor | None = None  # [B] sampled ids, on the device
    host_ids: torch.Tensor | None = None  # [B] pinned host copy, valid once ``ready`` has fired
    ready: torch.cuda.Event | None = None  # CUDA only: elsewhere the copy is done on return


class OverlappedDecode:
    def __init__(self, batches: BatchRunner, memory: RequestMemory, max_bs: int):
        self.batches = batches
        self.memory = memory
        # The largest running batch whose decode may be launched ahead: the CUDA graphs' (the
        # launch must not wait for the host), 0 when the schedule is off.
        self.max_bs = max_bs
        self.in_flight: InFlight | None = None
        # rid -> how its decode overlaps the previous step: absent when it cannot (logprobs are
        # read back per step), True when it is sampled at launch (sampling reads no token history),
        # False when it is sampled after the previous step's tokens are applied.
        self._samples_ahead: dict[str, bool] = {}
        self.steps = 0  # decode steps launched while the previous one was in flight

    def track(self, req: Req) -> None:
        if not req.return_logprob:
            self._samples_ahead[req.rid] = not any(p.wants(req.sampling_params) for p in self.batches.sampler.processors)

    def forget(self, rid: str) -> None:
        self._samples_ahead.pop(rid, None)

    def can_launch_ahead(self, running: list[Req]) -> bool:
        """A decode may run without its ids on the host: graphs, memory without retraction, no
        request that wants logprobs (they are read back every step)."""
        return (len(running) <= self.max_bs and self.memory.available() >= len(running)
                and all(r.rid in self._samples_ahead for r in running))

    def start(self, running: list[Req]) -> None:
        """Launch a decode of ``running`` from the ids on the host; it is read back next step."""
        self.in_flight = self._launch_decode(running, None)

    def advance(self, running: list[Req], nothing_to_admit: bool) -> list[Req]:
        """Launch the next decode from the in-flight one's ids (when nothing else must run first:
        ``nothing_to_admit``, and the batch is the same), then read the in-flight step back and
        apply it. Returns the requests that got a token."""
        done, self.in_flight = self.in_flight, None
        members = set(map(id, done.reqs))
        if (nothing_to_admit and running and all(id(r) in members for r in running)
                and self.can_launch_ahead(running)):
            self.in_flight = self._launch_decode(running, done)
            self.steps += 1
        if done.ready is not None:
            done.ready.synchronize()
        live = [(i, req) for i, req in enumerate(done.reqs) if not req.finished]
        next_ids = done.host_ids.tolist()
        self.batches.append_tokens([req for _, req in live], [next_ids[i] for i, _ in live])
        if self.in_flight is not None and self.in_flight.next_ids is None:
            self._sample_deferred(self.in_flight)
        return [req for _, req in live]

    def _launch_decode(self, running: list[Req], previous: InFlight | None) -> InFlight:
        """Run one decode step of ``running`` up to its sampled ids, without reading them back.
        Input ids come from ``previous`` (on the device) or, without one, from the host. With a
        previous step whose tokens sampling needs, only the forward pass runs here."""
        reqs = list(running)
        if previous is None:
            input_ids: list[int] | torch.Tensor = [req.fill_id(req.fill_len - 1) for req in reqs]
        else:
            row = {id(req): i for i, req in enumerate(previous.reqs)}
            index = torch.tensor([row[id(req)] for req in reqs], dtype=torch.int64)
            input_ids = previous.next_ids[to_device(index, previous.next_ids.device)]
        flight = InFlight(reqs, self.batches.decode(reqs, input_ids))
        if previous is None or all(self._samples_ahead[req.rid] for req in reqs):
            self._sample(flight)
        return flight

    def _sample_deferred(self, flight: InFlight) -> None:
        """Sample a step launched before its input tokens were applied on the host, now that they
        are. Rows whose request has since ended or jumped forward sample nothing: the step's KV
        write of their input token stands, and a jumped request extends from there."""
        live = [i for i, req in enumerate(flight.reqs) if not req.finished and req.fill_len == req.kv_len]
        if not live:
            self.in_flight = None
            return
        if len(live) < len(flight.reqs):
            flight.logits = flight.logits[to_device(torch.tensor(live, dtype=torch.int64), flight.logits.device)]
            flight.reqs = [flight.reqs[i] for i in live]
        self._sample(flight)

    def _sample(self, flight: InFlight) -> None:
        """Sample on the device and start copying the ids to the host (``ready`` fires when done)."""
        flight.next_ids = self.batches.sample(flight.reqs, flight.logits).next_ids
        flight.logits = None
        on_gpu = flight.next_ids.is_cuda
        flight.host_ids = torch.empty(flight.next_ids.shape, dtype=flight.next_ids.dtype, pin_memory=on_gpu)
        flight.host_ids.copy_(flight.next_ids, non_blocking=on_gpu)
        if on_gpu:
            flight.ready = torch.cuda.Event()
            flight.ready.record()

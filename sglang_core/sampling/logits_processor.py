"""The batched logits-processor interface and the per-step batch view processors read."""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Iterable

import numpy as np
import torch

from sglang_core.sampling.params import SamplingParams

if TYPE_CHECKING:
    from sglang_core.request import Req


class LogitsProcessor(abc.ABC):
    """Built once per engine (``cls(vocab_size=..., device=...)``); called each step on the rows that want it."""

    def __init__(self, vocab_size: int, device: torch.device | str = "cpu"):
        self.vocab_size = vocab_size
        self.device = torch.device(device)

    def wants(self, params: SamplingParams) -> bool:
        """Whether a request with these parameters needs this processor (default: every request)."""
        return True

    @abc.abstractmethod
    def __call__(self, logits: torch.Tensor, batch: SamplingBatch, rows: torch.Tensor) -> None:
        """Modify logits[rows] in place (logits is [B, V] float32; rows is an int64 index tensor on
        the logits' device). Read nothing back from the device here (``rows.tolist()``, ``.item()``):
        on a GPU that waits for the forward pass in flight; ``batch.host_rows(self)`` lists the
        rows on the host."""


def to_device(host: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """Copy a host tensor to ``device`` without waiting for the device. A plain ``.to("cuda")``
    synchronises the stream, which would stall the overlapped schedule behind the forward pass
    in flight; from pinned memory the copy is queued like a kernel."""
    if torch.device(device).type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)


def _padded(seqs: list[list[int]], pad: int, device: torch.device) -> torch.Tensor:
    out = np.full((len(seqs), max(map(len, seqs), default=0)), pad, dtype=np.int64)
    for i, seq in enumerate(seqs):
        out[i, : len(seq)] = seq
    return to_device(torch.from_numpy(out), device)


@dataclass(eq=False)
class SamplingBatch:
    """One decode step's requests, with their sampling parameters as row tensors.

    ``vocab_size`` is the width of the logits. ``eos_token_ids`` are the model's end-of-sequence
    ids (``min_new_tokens`` masks them). Token-id tensors are padded with ``vocab_size``, an id
    no real token has, so a scatter into ``vocab_size + 1`` columns can drop the padding.
    Every tensor is built on first use: a greedy batch with no processors builds none.
    """

    reqs: list[Req]
    vocab_size: int
    device: torch.device
    eos_token_ids: frozenset[int]
    _host_rows: dict[int, list[int]] = field(default_factory=dict, repr=False)  # id(processor) -> rows

    @classmethod
    def build(
        cls,
        reqs: list[Req],
        vocab_size: int,
        device: torch.device | str,
        eos_token_ids: Iterable[int] = (),
    ) -> SamplingBatch:
        return cls(list(reqs), vocab_size, torch.device(device), frozenset(eos_token_ids))

    def _column(self, values: list, dtype: torch.dtype) -> torch.Tensor:
        return to_device(torch.tensor(values, dtype=dtype), self.device)

    @cached_property
    def temperatures(self) -> torch.Tensor:
        """[B] float32 (``SamplingParams.validate`` keeps them within float32)."""
        return self._column([p.temperature for p in self.params], torch.float32)

    @cached_property
    def top_p(self) -> torch.Tensor:
        """[B] float32 (``SamplingParams.validate`` keeps them above float32's zero)."""
        return self._column([p.top_p for p in self.params], torch.float32)

    @cached_property
    def top_k(self) -> torch.Tensor:
        """[B] int64; -1 (off) becomes vocab_size."""
        v = self.vocab_size
        return self._column([v if p.top_k == -1 else min(p.top_k, v) for p in self.params], torch.int64)

    @cached_property
    def min_p(self) -> torch.Tensor:
        """[B] float32."""
        return self._column([p.min_p for p in self.params], torch.float32)

    @cached_property
    def greedy(self) -> torch.Tensor:
        """[B] bool."""
        return self._column([p.is_greedy for p in self.params], torch.bool)

    @cached_property
    def output_lens(self) -> torch.Tensor:
        """[B] int64: tokens generated so far."""
        return self._column([len(r.output_ids) for r in self.reqs], torch.int64)

    @property
    def params(self) -> list[SamplingParams]:
        return [r.sampling_params for r in self.reqs]

    def host_rows(self, processor: LogitsProcessor) -> list[int]:
        """The rows ``processor`` is called on, from the host (listed once per batch)."""
        rows = self._host_rows.get(id(processor))
        if rows is None:
            rows = self._host_rows[id(processor)] = [i for i, p in enumerate(self.params) if processor.wants(p)]
        return rows

    def banned_for_min_tokens(self, row: int) -> frozenset[int]:
        """The tokens ``min_new_tokens`` still forbids to row ``row`` (EOS and its stop tokens), or none."""
        req = self.reqs[row]
        if len(req.output_ids) >= req.sampling_params.min_new_tokens:
            return frozenset()
        banned = {t for t in self.eos_token_ids.union(req.sampling_params.stop_token_ids or ()) if t < self.vocab_size}
        # Forbidding every token would leave nothing to draw (a NaN row); every token ends the output anyway.
        return frozenset(banned) if len(banned) < self.vocab_size else frozenset()

    def param_values(self, rows: list[int], name: str) -> torch.Tensor:
        """``sampling_params.<name>`` of the given rows (host indices), as a float32 [R] tensor."""
        return self._column([getattr(self.reqs[i].sampling_params, name) for i in rows], torch.float32)

    @cached_property
    def output_ids(self) -> torch.Tensor:
        """[B, max output len] int64, padded with ``vocab_size``."""
        return _padded([r.output_ids for r in self.reqs], self.vocab_size, self.device)

    @cached_property
    def prompt_ids(self) -> torch.Tensor:
        """[B, max prompt len] int64, padded with ``vocab_size``."""
        return _padded([r.origin_input_ids for r in self.reqs], self.vocab_size, self.device)

    def _counts(self, ids: torch.Tensor) -> torch.Tensor:
        counts = torch.zeros(ids.shape[0], self.vocab_size + 1, dtype=torch.float32, device=self.device)
        counts.scatter_add_(1, ids, torch.ones(ids.shape, dtype=torch.float32, device=self.device))
        return counts[:, : self.vocab_size]

    def output_counts(self, rows: torch.Tensor) -> torch.Tensor:
        """[R, V] float32: how often each token occurs in each row's output so far."""
        return self._counts(self.output_ids[rows])

    def seen_mask(self, rows: torch.Tensor) -> torch.Tensor:
        """[R, V] bool: tokens that occur in each row's prompt or output."""
        return self._counts(torch.cat([self.prompt_ids[rows], self.output_ids[rows]], dim=1)) > 0

"""The core's own logits processors: penalties, logit bias and min_new_tokens (and the grammar
mask of constrained decoding, ``sglang_core/constrained/mask.py``).

They register through ``register_logits_processors`` exactly as a plugin's processors do.
"""

from __future__ import annotations

import torch

from sglang_core.constrained.mask import GrammarMask
from sglang_core.hookspecs import Register, hookimpl
from sglang_core.sampling.logits_processor import LogitsProcessor, SamplingBatch, to_device
from sglang_core.sampling.params import SamplingParams


class RepetitionPenalty(LogitsProcessor):
    """HF/vLLM definition: every token seen in the prompt or output has logit/r if positive, else logit*r."""

    def wants(self, params: SamplingParams) -> bool:
        return params.repetition_penalty != 1.0

    def __call__(self, logits: torch.Tensor, batch: SamplingBatch, rows: torch.Tensor) -> None:
        sub = logits[rows]
        r = batch.param_values(batch.host_rows(self), "repetition_penalty")[:, None]
        logits[rows] = torch.where(batch.seen_mask(rows), torch.where(sub > 0, sub / r, sub * r), sub)


class FrequencyPresencePenalty(LogitsProcessor):
    """OpenAI definition over output tokens: logit -= frequency * count + presence * (count > 0)."""

    def wants(self, params: SamplingParams) -> bool:
        return params.frequency_penalty != 0.0 or params.presence_penalty != 0.0

    def __call__(self, logits: torch.Tensor, batch: SamplingBatch, rows: torch.Tensor) -> None:
        counts = batch.output_counts(rows)
        host_rows = batch.host_rows(self)
        frequency = batch.param_values(host_rows, "frequency_penalty")[:, None]
        presence = batch.param_values(host_rows, "presence_penalty")[:, None]
        logits[rows] -= frequency * counts + presence * (counts > 0)


def _index(pairs: list[tuple[int, int]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(row, token) pairs -> the two index tensors of an ``index_put_``."""
    index = to_device(torch.tensor(pairs, dtype=torch.int64).reshape(-1, 2), device)
    return index[:, 0], index[:, 1]


class LogitBias(LogitsProcessor):
    """logit[token] += bias."""

    def wants(self, params: SamplingParams) -> bool:
        return bool(params.logit_bias)

    def __call__(self, logits: torch.Tensor, batch: SamplingBatch, rows: torch.Tensor) -> None:
        pairs, biases = [], []
        for i in batch.host_rows(self):
            for token, bias in batch.reqs[i].sampling_params.logit_bias.items():
                pairs.append((i, token))
                biases.append(bias)
        values = to_device(torch.tensor(biases, dtype=logits.dtype), logits.device)
        logits.index_put_(_index(pairs, logits.device), values, accumulate=True)


class MinNewTokens(LogitsProcessor):
    """Forbid EOS and ``stop_token_ids`` until ``min_new_tokens`` tokens have been generated."""

    def wants(self, params: SamplingParams) -> bool:
        return params.min_new_tokens > 0

    def __call__(self, logits: torch.Tensor, batch: SamplingBatch, rows: torch.Tensor) -> None:
        pairs = []
        for i in batch.host_rows(self):
            pairs.extend((i, t) for t in batch.banned_for_min_tokens(i))
        if pairs:
            logits.index_put_(_index(pairs, logits.device), logits.new_full((), float("-inf")))


@hookimpl
def register_logits_processors(register: Register) -> None:
    register("repetition_penalty", RepetitionPenalty)
    register("frequency_presence_penalty", FrequencyPresencePenalty)
    register("logit_bias", LogitBias)
    register("min_new_tokens", MinNewTokens)
    # Last: constraints apply to what the other processors left.
    register("grammar_mask", GrammarMask)

"""From logits to next tokens: processors, temperature, top-k / top-p / min-p, seeded sampling, logprobs."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sglang_core.sampling.logits_processor import LogitsProcessor, SamplingBatch, to_device


@dataclass
class SampleResult:
    next_ids: torch.Tensor  # [B] int64
    # Only when some request has return_logprob: log_softmax of the raw logits at next_ids ...
    logprobs: torch.Tensor | None = None  # [B] float32
    # ... and per row the top req.top_logprobs_num (logprob, token id) pairs ([] where not asked).
    top_logprobs: list[list[tuple[float, int]]] | None = None


def make_generator(seed: int | None, device: torch.device | str) -> torch.Generator | None:
    """A generator seeded with ``seed`` (any int, taken mod 2**64), or None for the default RNG."""
    if seed is None:
        return None
    generator = torch.Generator(device=device)
    generator.manual_seed(seed % 2**64)
    return generator


def token_logprobs(
    logits: torch.Tensor, token_ids: torch.Tensor, top_k: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Log-softmax of ``logits`` [N, V] at ``token_ids`` [N], plus the top_k logprobs [N, k] and their ids [N, k]."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    chosen = logprobs.gather(1, token_ids.long()[:, None]).squeeze(1)
    top_values, top_ids = logprobs.topk(min(top_k, logprobs.shape[1]), dim=-1)
    return chosen, top_values, top_ids


def _filter(probs: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Zero out what top_k, then top_p (over the top-k renormalised mass), then min_p reject.

    The result is left unnormalised: the exponential race in ``Sampler._draw`` is scale-free.
    """
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    ranks = torch.arange(probs.shape[1], device=probs.device)
    keep = ranks[None, :] < top_k[:, None]
    sorted_probs = sorted_probs * keep
    # Keep a token while the kept mass before it is below top_p of the top-k mass; top_p == 1
    # keeps everything (a float cumsum may reach the total early and drop tiny tails).
    cumulative = sorted_probs.cumsum(dim=-1)
    before = cumulative - sorted_probs
    keep &= (before < top_p[:, None] * cumulative[:, -1:]) | (top_p[:, None] >= 1)
    # min_p is relative to the most likely token, so it needs no renormalisation.
    keep &= sorted_probs >= min_p[:, None] * sorted_probs[:, :1]
    return probs * torch.zeros_like(keep).scatter_(1, order, keep)


class Sampler:
    """Turns one step's logits into next tokens for a ``SamplingBatch``."""

    def __init__(self, processors: list[LogitsProcessor]):
        self.processors = list(processors)

    def __call__(self, logits: torch.Tensor, batch: SamplingBatch) -> SampleResult:
        """Sample one token per row. ``logits`` [B, V] may be modified in place."""
        logits = logits.float()
        want_logprobs = any(r.return_logprob for r in batch.reqs)
        # SGLang reports logprobs of the model's distribution, before any processing.
        raw = logits.clone() if want_logprobs else None

        params = batch.params
        for processor in self.processors:
            rows = batch.host_rows(processor)
            if rows:
                processor(logits, batch, to_device(torch.tensor(rows, dtype=torch.int64), logits.device))

        next_ids = logits.argmax(dim=-1)
        # Rows chosen on the host: a device-side nonzero() would wait for the GPU every step.
        sampled = [i for i, p in enumerate(params) if not p.is_greedy]
        if sampled:
            rows = to_device(torch.tensor(sampled, dtype=torch.int64), logits.device)
            next_ids[rows] = self._draw(logits[rows], batch, rows, sampled)

        if raw is None:
            return SampleResult(next_ids)
        num_top = max(r.top_logprobs_num for r in batch.reqs if r.return_logprob)
        chosen, top_values, top_ids = token_logprobs(raw, next_ids, num_top)
        top_values, top_ids = top_values.tolist(), top_ids.tolist()
        top_logprobs = [
            list(zip(top_values[i][: r.top_logprobs_num], top_ids[i][: r.top_logprobs_num])) if r.return_logprob else []
            for i, r in enumerate(batch.reqs)
        ]
        return SampleResult(next_ids, chosen, top_logprobs)

    @staticmethod
    def _draw(logits: torch.Tensor, batch: SamplingBatch, rows: torch.Tensor, row_list: list[int]) -> torch.Tensor:
        # No inf or NaN arises here from the request's values: ``SamplingParams.validate`` keeps
        # the penalties, biases and temperature where the processed logits stay finite (or -inf
        # where masked) and the temperature finite, and every row keeps a finite logit (see
        # ``GrammarMask``), so the softmax has a finite maximum to subtract.
        probs = torch.softmax(logits / batch.temperatures[rows, None], dim=-1)
        vocab = probs.shape[1]
        params = [batch.reqs[i].sampling_params for i in row_list]  # decided on the host: no GPU sync
        if any(0 < p.top_k < vocab or p.top_p < 1 or p.min_p > 0 for p in params):
            probs = _filter(probs, batch.top_k[rows], batch.top_p[rows], batch.min_p[rows])
        # Exponential race: argmax(p / Exp(1)) picks token i with probability p_i / sum(p). Each
        # seeded row draws its noise from its own generator, so its tokens don't depend on the
        # rest of the batch; the other rows share torch's default RNG.
        noise = torch.empty_like(probs).exponential_()
        for j, i in enumerate(row_list):
            req = batch.reqs[i]
            if req.generator is None and req.sampling_params.seed is not None:
                req.generator = make_generator(req.sampling_params.seed, probs.device)
            if req.generator is not None:
                noise[j].exponential_(generator=req.generator)
        # A zero draw would make 0/0 = NaN, which argmax would pick, for a filtered-out token.
        noise.clamp_(min=torch.finfo(noise.dtype).tiny)
        return (probs / noise).argmax(dim=-1)

"""The token mask of constrained requests, as a logits processor: each request's grammar
writes its allowed tokens as a bitmask on the host (native code, no per-token Python), the
masks of the batch go to the device in one copy and are applied there in one operation.
Nothing here waits for the device, so the masks are built while the GPU runs the forward pass
(see the overlapped schedule in ``sglang_core/scheduler/overlap.py``)."""

from __future__ import annotations

import numpy as np
import torch

from sglang_core.sampling.logits_processor import LogitsProcessor, SamplingBatch
from sglang_core.sampling.params import SamplingParams


class GrammarMask(LogitsProcessor):
    def wants(self, params: SamplingParams) -> bool:
        return params.constraint is not None

    def __call__(self, logits: torch.Tensor, batch: SamplingBatch, rows: torch.Tensor) -> None:
        vocab = logits.shape[1]
        row_list = batch.host_rows(self)
        words = torch.zeros((len(row_list), -(-vocab // 32)), dtype=torch.int32,
                            pin_memory=logits.device.type == "cuda")
        masks = words.numpy().view(np.uint32)
        for j, i in enumerate(row_list):
            batch.reqs[i].grammar.fill_bitmask(words[j])
        # A row left with no finite logit would be NaN after the softmax, and a masked token could
        # win. So a grammar that allows nothing (cannot happen with a sound backend), or only
        # tokens min_new_tokens still forbids (a finished regex before the minimum: the constraint
        # wins), ends with EOS; decided here on the host, so the GPU is never waited for.
        eos = min(batch.eos_token_ids, default=None)
        banned = [batch.banned_for_min_tokens(i) for i in row_list]
        stuck = [j for j in range(len(row_list)) if eos is not None and not _allows_any(masks[j], banned[j])]
        if stuck:
            masks[stuck] = 0
            masks[stuck, eos // 32] = np.uint32(1 << (eos % 32))
        if logits.device.type == "cpu":  # numpy's bit unpacking is a single C loop
            allowed = torch.from_numpy(np.unpackbits(masks.view(np.uint8), axis=1, bitorder="little")[:, :vocab]
                                       .view(np.bool_))
        else:  # one copy to the device, unpacked there
            shifts = torch.arange(32, dtype=torch.int32, device=logits.device)
            allowed = (((words.to(logits.device, non_blocking=True)[:, :, None] >> shifts) & 1).bool()
                       .view(len(row_list), -1)[:, :vocab])
        if len(row_list) == logits.shape[0] and row_list == list(range(len(row_list))):
            logits.masked_fill_(~allowed, float("-inf"))  # every row constrained: in place
        else:
            logits[rows] = logits[rows].masked_fill(~allowed, float("-inf"))
        reopened = [j for j in stuck if eos in banned[j]]
        if reopened:  # min_new_tokens made EOS -inf
            logits[rows[reopened], eos] = 0.0


def _allows_any(mask: np.ndarray, banned: frozenset[int]) -> bool:
    """Whether the bitmask row ``mask`` allows a token outside ``banned`` (token ids in the vocabulary)."""
    if banned:
        mask = mask.copy()
        for token in banned:
            mask[token // 32] &= ~np.uint32(1 << (token % 32))
    return bool(mask.any())

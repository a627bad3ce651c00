"""The token mask of constrained requests, as a logits processor: each request's grammar
writes its allowed tokens as a bitmask on the host (native code, no per-token Python), the
masks of the batch go to the device in one copy and are applied there in one operation."""

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
        words = -(-vocab // 32)
        row_list = rows.tolist()
        masks = torch.zeros(len(row_list), words, dtype=torch.int32)
        for j, i in enumerate(row_list):
            batch.reqs[i].grammar.fill_bitmask(masks[j])
        if logits.device.type == "cpu":  # numpy's bit unpacking is a single C loop
            bits = np.unpackbits(masks.numpy().view(np.uint8), axis=1, bitorder="little")[:, :vocab]
            allowed = torch.from_numpy(bits.view(np.bool_))
        else:  # one copy to the device, unpacked there
            shifts = torch.arange(32, dtype=torch.int32, device=logits.device)
            allowed = ((masks.to(logits.device)[:, :, None] >> shifts) & 1).bool().view(len(row_list), -1)[:, :vocab]
        # A grammar that allows nothing (cannot happen with a sound backend) ends with EOS, not NaN.
        stuck = ~allowed.any(dim=1)
        if bool(stuck.any()) and batch.eos_token_ids:
            allowed[stuck, min(batch.eos_token_ids)] = True
        logits[rows] = logits[rows].masked_fill(~allowed, float("-inf"))

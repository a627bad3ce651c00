"""The flat KV-slot list FlashInfer reads (its "page indices", pages of one token here), gathered on
the device from the request-to-token table so that planning a batch never waits for the GPU."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 512


@triton.jit
def _gather_kernel(req_to_token, row_stride, rows, indptr, seq_lens, out, BLOCK: tl.constexpr):
    i = tl.program_id(0)
    row = tl.load(rows + i).to(tl.int64)
    start = tl.load(indptr + i)
    n = tl.load(seq_lens + i)
    for offset in range(0, n, BLOCK):
        idx = offset + tl.arange(0, BLOCK)
        mask = idx < n
        slots = tl.load(req_to_token + row * row_stride + idx, mask=mask)
        tl.store(out + start + idx, slots.to(tl.int32), mask=mask)


def gather_kv_indices(req_to_token: torch.Tensor, rows: torch.Tensor, indptr: torch.Tensor,
                      seq_lens: torch.Tensor, out: torch.Tensor) -> None:
    """``out[indptr[i]:indptr[i] + seq_lens[i]] = req_to_token[rows[i], :seq_lens[i]]`` (as int32)
    for every request i; ``indptr`` is the running sum of ``seq_lens``, on the device."""
    _gather_kernel[(rows.shape[0],)](req_to_token, req_to_token.stride(0), rows, indptr, seq_lens, out, BLOCK=BLOCK)

"""One forward step's batch, from rank 0 of a tensor-parallel group to the other ranks, as tensors.

Two broadcasts a step, never pickle: a header of ``HEADER_LEN`` int64 (what comes, the forward
mode, the sizes of every field), then one int64 payload holding the fields back to back; a step
with images' embeddings (rank 0's vision encoder made them) has a third, their float rows as
they are. The payload is built and received on the runner's device, so on CUDA it travels over
NCCL without a host copy of the token ids (an overlapped decode's ids are still on the device).

The other ranks run no scheduler: their ``req_to_token`` learns each step's rows from the payload
(the first ``seq_lens[i]`` slots of each request's row), so their attention reads the KV slots
rank 0's scheduler chose, including slots the prefix cache re-pointed since the last step.
Sampling tensors are not sent: only rank 0 samples (see ``tp_ranks``).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from sglang_core.layers.parallel import TPGroup
from sglang_core.mem.kv_pool import row_prefixes
from sglang_core.model_executor.forward_batch import ForwardMode
from sglang_core.model_executor.runner import StepInput

STOP, STEP = 0, 1
MODES = (ForwardMode.EXTEND, ForwardMode.DECODE)
EMBED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# kind, mode, tokens, requests, logit rows, shared-prefix groups, their rows, slots, payload length,
# embedded rows, embedding width, embedding dtype (an index into EMBED_DTYPES)
HEADER_LEN = 12


class StepChannel:
    """Rank 0 ``send``s each step (``stop`` at the end); every other rank ``receive``s them in order."""

    def __init__(self, tp: TPGroup, req_to_token: torch.Tensor):
        self.tp = tp
        self.req_to_token = req_to_token
        self.device = req_to_token.device

    def send(self, step: StepInput) -> None:
        groups = step.shared_prefixes
        shared_rows = [row for _, rows in groups for row in rows]
        embed_rows, embeds = step.input_embeds or ([], torch.empty(0, 0))
        host = torch.tensor(step.positions + step.req_pool_indices + step.seq_lens + step.prefix_lens + step.fill_lens
                            + step.logit_index + [length for length, _ in groups] + [len(rows) for _, rows in groups]
                            + shared_rows + list(embed_rows), dtype=torch.int64)
        rows = torch.tensor(step.req_pool_indices, dtype=torch.int64, device=self.device)
        lengths = torch.tensor(step.seq_lens, dtype=torch.int64, device=self.device)
        slots = self.req_to_token[row_prefixes(rows, lengths, sum(step.seq_lens))]
        ids = torch.as_tensor(step.input_ids, dtype=torch.int64).to(self.device)
        payload = torch.cat([ids, step.out_cache_loc.to(self.device, torch.int64), host.to(self.device), slots])
        header = [STEP, MODES.index(step.mode), len(step.positions), len(step.seq_lens), len(step.logit_index),
                  len(groups), len(shared_rows), slots.numel(), payload.numel(), len(embed_rows), embeds.shape[1],
                  EMBED_DTYPES.index(embeds.dtype)]
        self._broadcast(torch.tensor(header, dtype=torch.int64, device=self.device))
        self._broadcast(payload)
        if embed_rows:
            self._broadcast(embeds.to(self.device).contiguous())

    def stop(self) -> None:
        self._broadcast(torch.zeros(HEADER_LEN, dtype=torch.int64, device=self.device))

    def receive(self) -> StepInput | None:
        """The next step (its rows written into ``req_to_token``), or None once rank 0 stops."""
        header = torch.empty(HEADER_LEN, dtype=torch.int64, device=self.device)
        self._broadcast(header)
        kind, mode, tokens, requests, logits, groups, shared_rows, slot_count, length, embedded, width, dtype = (
            header.tolist())
        if kind == STOP:
            return None
        payload = torch.empty(length, dtype=torch.int64, device=self.device)
        self._broadcast(payload)
        ids, out_cache_loc, host, slots = payload.split([tokens, tokens, length - 2 * tokens - slot_count, slot_count])
        fields = host.tolist()
        sizes = [tokens, requests, requests, requests, requests, logits, groups, groups, shared_rows, embedded]
        positions, rows, seq_lens, prefix_lens, fill_lens, logit_index, group_lens, group_sizes, members, embed_rows = (
            _cut(fields, sizes))
        input_embeds = None
        if embedded:
            input_embeds = (embed_rows, torch.empty(embedded, width, dtype=EMBED_DTYPES[dtype], device=self.device))
            self._broadcast(input_embeds[1])
        lengths = torch.tensor(seq_lens, dtype=torch.int64, device=self.device)
        index = row_prefixes(torch.tensor(rows, dtype=torch.int64, device=self.device), lengths, slot_count)
        self.req_to_token[index] = slots
        shared = tuple((size, tuple(group)) for size, group in zip(group_lens, _cut(members, group_sizes)))
        return StepInput(mode=MODES[mode], input_ids=ids, positions=positions, out_cache_loc=out_cache_loc,
                         req_pool_indices=rows, seq_lens=seq_lens, prefix_lens=prefix_lens, fill_lens=fill_lens,
                         logit_index=logit_index, shared_prefixes=shared, input_embeds=input_embeds)

    def _broadcast(self, x: torch.Tensor) -> None:
        dist.broadcast(x, group_src=0, group=self.tp.group)


def _cut(values: list[int], sizes: list[int]) -> list[list[int]]:
    """``values`` cut into consecutive pieces of ``sizes``."""
    pieces, start = [], 0
    for size in sizes:
        pieces.append(values[start : start + size])
        start += size
    return pieces

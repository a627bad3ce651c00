"""One forward step's batch, from rank 0 of a tensor-parallel group to the other ranks, as tensors.

Two broadcasts a step, never pickle: a header of ``HEADER_LEN`` int64 (what comes, the forward
mode, the sizes of every field), then one int64 payload holding the fields back to back; a step
with images' embeddings (rank 0's vision encoder made them) has a third, their float rows as
they are. The payload is built and received on the runner's device, so on CUDA it travels over
NCCL without a host copy of the token ids (an overlapped decode's ids are still on the device).
Positions are one per token, or for a model that derives them from media (M-RoPE) a prefill
step's [components, tokens], sent row after row (the header says how many rows); a decode step's
stay one per token (index plus the request's delta), so its payload does not grow with them.

The other ranks run no scheduler: their copy of ``req_to_token`` follows rank 0's from the steps,
so their attention reads the KV slots rank 0's scheduler chose. A step's new tokens already come
with their slots (``out_cache_loc``, columns ``prefix_lens[i]..seq_lens[i]`` of each row), so a
decode step sends nothing more: its payload grows with the batch, never with the context. Only
entries the ranks do not hold yet are sent besides: a row new to its request from column 0 (its
cached prefix), and a row the prefix cache re-pointed from the first re-pointed column
(``ReqToTokenPool.rewritten``). A finished request's row needs no word to the ranks: whoever
gets the row next is new to it, and is sent in full.
Sampling tensors are not sent: only rank 0 samples (see ``tp_ranks``).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from sglang_core.layers.parallel import TPGroup
from sglang_core.mem.kv_pool import ReqToTokenPool, row_prefixes
from sglang_core.model_executor.forward_batch import ForwardMode
from sglang_core.model_executor.runner import StepInput

STOP, STEP = 0, 1
MODES = (ForwardMode.EXTEND, ForwardMode.DECODE)
EMBED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# kind, mode, tokens, requests, logit rows, shared-prefix groups, their rows, slots, payload length,
# embedded rows, embedding width, embedding dtype (an index into EMBED_DTYPES), position components
# (0: one position per token)
HEADER_LEN = 13


class StepChannel:
    """Rank 0 ``send``s each step (``stop`` at the end); every other rank ``receive``s them in order."""

    def __init__(self, tp: TPGroup, req_pool: ReqToTokenPool):
        self.tp = tp
        self.req_pool = req_pool
        req_pool.track_rewrites()
        self.req_to_token = req_pool.req_to_token
        self.device = self.req_to_token.device
        # On rank 0: row -> how many leading entries the other ranks hold as rank 0 does.
        self.mirrored: dict[int, int] = {}

    def send(self, step: StepInput) -> None:
        groups = step.shared_prefixes
        shared_rows = [row for _, rows in groups for row in rows]
        embed_rows, embeds = step.input_embeds or ([], torch.empty(0, 0))
        # Each row's entries before its new tokens that the ranks lack: [resend_from, prefix_len).
        resend_from = []
        for row, prefix_len in zip(step.req_pool_indices, step.prefix_lens):
            known = self.mirrored.get(row, 0)
            if row in self.req_pool.rewritten:
                known = min(known, self.req_pool.rewritten.pop(row))
            resend_from.append(min(known, prefix_len))
        positions = torch.as_tensor(step.positions, dtype=torch.int64)
        components = positions.shape[0] if positions.dim() == 2 else 0
        fields = torch.tensor(step.req_pool_indices + step.seq_lens + step.prefix_lens + step.fill_lens
                              + step.logit_index + [length for length, _ in groups] + [len(rows) for _, rows in groups]
                              + shared_rows + list(embed_rows) + resend_from, dtype=torch.int64)
        host = torch.cat([positions.flatten().cpu(), fields])
        slots = self.req_to_token[_spans(step.req_pool_indices, resend_from, step.prefix_lens, self.device)]
        self.mirrored.update(zip(step.req_pool_indices, step.seq_lens))
        ids = torch.as_tensor(step.input_ids, dtype=torch.int64).to(self.device)
        payload = torch.cat([ids, step.out_cache_loc.to(self.device, torch.int64), host.to(self.device), slots])
        header = [STEP, MODES.index(step.mode), positions.shape[-1], len(step.seq_lens), len(step.logit_index),
                  len(groups), len(shared_rows), slots.numel(), payload.numel(), len(embed_rows), embeds.shape[1],
                  EMBED_DTYPES.index(embeds.dtype), components]
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
        (kind, mode, tokens, requests, logits, groups, shared_rows, slot_count, length, embedded, width, dtype,
         components) = header.tolist()
        if kind == STOP:
            return None
        payload = torch.empty(length, dtype=torch.int64, device=self.device)
        self._broadcast(payload)
        position_count = tokens * max(components, 1)
        ids, out_cache_loc, positions, host, slots = payload.split(
            [tokens, tokens, position_count, length - 2 * tokens - position_count - slot_count, slot_count])
        sizes = [requests, requests, requests, requests, logits, groups, groups, shared_rows, embedded, requests]
        (rows, seq_lens, prefix_lens, fill_lens, logit_index, group_lens, group_sizes, members, embed_rows,
         resend_from) = _cut(host.tolist(), sizes)
        positions = positions.view(components, tokens) if components else positions.tolist()
        input_embeds = None
        if embedded:
            input_embeds = (embed_rows, torch.empty(embedded, width, dtype=EMBED_DTYPES[dtype], device=self.device))
            self._broadcast(input_embeds[1])
        self.req_to_token[_spans(rows, resend_from, prefix_lens, self.device)] = slots
        self.req_to_token[_spans(rows, prefix_lens, seq_lens, self.device)] = out_cache_loc
        shared = tuple((size, tuple(group)) for size, group in zip(group_lens, _cut(members, group_sizes)))
        return StepInput(mode=MODES[mode], input_ids=ids, positions=positions, out_cache_loc=out_cache_loc,
                         req_pool_indices=rows, seq_lens=seq_lens, prefix_lens=prefix_lens, fill_lens=fill_lens,
                         logit_index=logit_index, shared_prefixes=shared, input_embeds=input_embeds)

    def _broadcast(self, x: torch.Tensor) -> None:
        dist.broadcast(x, group_src=0, group=self.tp.group)


def _spans(rows: list[int], starts: list[int], ends: list[int],
           device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(row, column) indices of columns ``starts[i]..ends[i]`` of each row ``rows[i]``, row after row."""
    lengths = torch.tensor([end - start for start, end in zip(starts, ends)], dtype=torch.int64, device=device)
    total = sum(ends) - sum(starts)
    row_index, columns = row_prefixes(torch.tensor(rows, dtype=torch.int64, device=device), lengths, total)
    offsets = torch.tensor(starts, dtype=torch.int64, device=device).repeat_interleave(lengths, output_size=total)
    return row_index, columns + offsets


def _cut(values: list[int], sizes: list[int]) -> list[list[int]]:
    """``values`` cut into consecutive pieces of ``sizes``."""
    pieces, start = [], 0
    for size in sizes:
        pieces.append(values[start : start + size])
        start += size
    return pieces

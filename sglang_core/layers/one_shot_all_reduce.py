"""A one-shot all-reduce for small messages on CUDA, over PyTorch's symmetric memory.

Every rank of the group allocates one buffer that the other ranks map too (``symm_mem.empty``,
then ``rendezvous``, once per group). An all-reduce of ``x`` is then one kernel
(``torch.ops.symm_mem.one_shot_all_reduce_copy_out``, present in torch 2.11 and 2.13): each rank
copies ``x`` into its buffer, the ranks meet at a barrier of flags in memory, each reads every
peer's copy over NVLink, adds them up and writes the sum back into ``x``, and a second barrier
keeps any rank from overwriting its buffer while a peer still reads it. One launch and one round
trip between the GPUs, where NCCL's ring passes a message through 2 (N - 1) steps: for the small
messages of a decode step latency, not bandwidth, is the cost. Its device pointers never change,
so a CUDA graph captures it like any kernel. No multicast (``multimem``) operation is used.

Opt-in (``--enable-custom-all-reduce``) until ``benchmarks/allreduce.py`` has measured it against
NCCL on the GPUs. ``TPGroup.all_reduce`` sends a message here when ``takes`` it, else to NCCL.
"""

from __future__ import annotations

import logging
import os
from dataclasses import replace
from typing import Any

import torch

from sglang_core.config import EngineSettings
from sglang_core.layers.parallel import TPGroup

logger = logging.getLogger(__name__)

# Messages up to this size go one-shot, larger ones to NCCL. One-shot makes every rank read all
# N - 1 peers' whole messages where NCCL's ring moves 2 (N - 1) / N of one, so once bandwidth
# counts (above ~1 MB on NVLink) the ring wins; below it both are latency-bound and one kernel
# with one barrier beats the ring's steps. Decode steps' messages (batch x hidden x 2 bytes: 8 KiB a
# token at hidden 4096) stay below it up to batch 64. A first guess until benchmarks/allreduce.py
# puts the crossover on the GPUs; it is also the symmetric buffer's size.
ONE_SHOT_MAX_BYTES = 512 * 1024
# The kernel's widest vector: a message of whole 16-byte vectors starting on one is read and written
# alike in ``x`` and in the buffer (the op refuses copies whose alignments differ).
ALIGNMENT_BYTES = 16
# The dtypes torch's one-shot kernel is compiled for.
DTYPES = (torch.bfloat16, torch.float32)


def _one_shot_all_reduce(staging: torch.Tensor, x: torch.Tensor, group_name: str) -> None:
    """Sum ``x`` over the group into ``x``, staging it in ``staging`` (a view of the symmetric buffer)."""
    torch.ops.symm_mem.one_shot_all_reduce_copy_out(staging, x, "sum", group_name, x)


class OneShotAllReduce:
    """One group's symmetric buffer (``buffer``: bytes) and the all-reduce through it."""

    def __init__(self, buffer: torch.Tensor, group_name: str):
        self.buffer = buffer
        self.group_name = group_name

    @classmethod
    def allocate(cls, group: Any, device: torch.device, max_bytes: int = ONE_SHOT_MAX_BYTES) -> "OneShotAllReduce":
        """Allocate the buffer and map it on every rank of ``group``: a collective, every rank calls it."""
        # The one-shot kernel reads peers' buffers through plain peer mappings; without this the
        # rendezvous would also create an NVLink multicast object on NVSwitch machines.
        os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
        import torch.distributed._symmetric_memory as symm_mem

        buffer = symm_mem.empty(max_bytes, dtype=torch.uint8, device=device)
        symm_mem.rendezvous(buffer, group.group_name)
        return cls(buffer, group.group_name)

    def takes(self, x: torch.Tensor) -> bool:
        """Whether ``x`` goes one-shot: on this buffer's device, a dtype the kernel has, contiguous,
        whole 16-byte vectors from its start, and no larger than the buffer."""
        nbytes = x.numel() * x.element_size()
        return (x.device == self.buffer.device and x.dtype in DTYPES and x.is_contiguous()
                and 0 < nbytes <= self.buffer.numel() and nbytes % ALIGNMENT_BYTES == 0
                and x.storage_offset() * x.element_size() % ALIGNMENT_BYTES == 0)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Sum ``x`` over the group, in place (``x`` must be one that ``takes`` accepts)."""
        staging = self.buffer[: x.numel() * x.element_size()].view(x.dtype).view(x.shape)
        _one_shot_all_reduce(staging, x, self.group_name)
        return x


def _group_obstacle(device: torch.device, settings: EngineSettings) -> str | None:
    """What keeps the whole group from a one-shot all-reduce, if anything."""
    if device.type != "cuda":
        return "the group reduces over gloo on the CPU"
    if settings.nnodes > 1:
        return f"the group spans {settings.nnodes} machines and peer-mapped memory stays on one"
    return None


def _local_obstacle(tp: TPGroup, device: torch.device) -> str | None:
    """What keeps this rank from a one-shot all-reduce, if anything (old torch, no peer access)."""
    try:
        import torch.distributed._symmetric_memory  # noqa: F401  (registers the symm_mem ops)
    except ImportError as exc:
        return f"torch {torch.__version__} has no symmetric memory ({exc})"
    if not hasattr(torch.ops.symm_mem, "one_shot_all_reduce_copy_out"):
        return f"torch {torch.__version__} has no symm_mem.one_shot_all_reduce_copy_out"
    # One node: rank r runs on device r (tp_ranks), so the peers are the group's other devices.
    blind = [peer for peer in range(tp.size)
             if peer != device.index and not torch.cuda.can_device_access_peer(device.index, peer)]
    return f"device {device.index} cannot map the memory of devices {blind} (no P2P)" if blind else None


def with_one_shot(tp: TPGroup, device: torch.device, settings: EngineSettings) -> TPGroup:
    """``tp`` with a one-shot all-reduce for small messages where the settings ask for one and every
    rank can have it, else ``tp`` as it is (every message over NCCL or gloo), saying why once.
    A collective on CUDA: every rank calls it, before any CUDA graph is captured."""
    if not settings.enable_custom_all_reduce or tp.size == 1:
        return tp
    # Alike on every rank (the same settings): each rank decides alone, rank 0 says why.
    shared_obstacle = _group_obstacle(device, settings)
    if shared_obstacle:
        if tp.rank == 0:
            logger.warning("enable_custom_all_reduce: %s; no one-shot all-reduce", shared_obstacle)
        return tp
    device = torch.device("cuda", torch.cuda.current_device() if device.index is None else device.index)
    obstacle = _local_obstacle(tp, device)
    if obstacle:
        logger.warning("enable_custom_all_reduce: rank %d: %s; every all-reduce goes to NCCL", tp.rank, obstacle)
    # Every rank goes one-shot or none does: a rank reducing over NCCL while its peers wait in the
    # one-shot kernel's barrier would hang them all.
    if tp.agree_min(int(obstacle is None), device) == 0:
        return tp
    try:
        one_shot: OneShotAllReduce | None = OneShotAllReduce.allocate(tp.group, device)
    except RuntimeError as exc:
        logger.warning("enable_custom_all_reduce: rank %d: symmetric memory failed (%s); every all-reduce "
                       "goes to NCCL", tp.rank, exc)
        one_shot = None
    if tp.agree_min(int(one_shot is not None), device) == 0:
        return tp
    return replace(tp, one_shot=one_shot)

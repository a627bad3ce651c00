"""KV memory at token granularity.

Two pools, each owning one kind of memory and nothing else:

* ``ReqToTokenPool`` hands out request rows. Row ``r`` of ``req_to_token`` lists, in order,
  the KV slot of every token request ``r`` has cached so far.
* ``TokenKVPool`` hands out token slots and holds per-layer K and V buffers indexed by slot.

Slot 0 is never handed out: it is the padding target, so a padded gather or a padded write
lands somewhere harmless.
"""

from __future__ import annotations

import torch

from sglang_core.kernels import use_fused


class ReqToTokenPool:
    """Request rows: ``req_to_token[row, i]`` is the KV slot of the row's i-th token."""

    def __init__(self, max_requests: int, max_context_len: int, device: torch.device | str):
        self.size = max_requests
        self.max_context_len = max_context_len
        self.req_to_token = torch.zeros((max_requests, max_context_len), dtype=torch.int64, device=device)
        self._free_rows = list(range(max_requests))

    def available_size(self) -> int:
        return len(self._free_rows)

    def alloc(self) -> int | None:
        return self._free_rows.pop() if self._free_rows else None

    def free(self, row: int) -> None:
        self._free_rows.append(row)

    def clear(self) -> None:
        self._free_rows = list(range(self.size))


class TokenKVPool:
    """Token slots 1..size and the K/V buffers they index, one pair of buffers per layer."""

    def __init__(
        self,
        size: int,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ):
        self.size = size
        self.num_layers = num_layers
        self.dtype = dtype
        self.device = torch.device(device)
        shape = (size + 1, num_kv_heads, head_dim)
        self.k_buffers = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v_buffers = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self._free = torch.arange(1, size + 1, dtype=torch.int64, device=device)

    @staticmethod
    def bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        return 2 * num_layers * num_kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()

    def available_size(self) -> int:
        return int(self._free.numel())

    def alloc(self, n: int) -> torch.Tensor | None:
        """Return ``n`` free slots, or None (taking nothing) when fewer are free."""
        if n > self._free.numel():
            return None
        slots, self._free = self._free[:n], self._free[n:]
        return slots

    def free(self, slots: torch.Tensor) -> None:
        if slots.numel():
            self._free = torch.cat((self._free, slots.to(self._free.device, torch.int64)))

    def clear(self) -> None:
        self._free = torch.arange(1, self.size + 1, dtype=torch.int64, device=self.device)

    def free_slots(self) -> torch.Tensor:
        """The free slots (a copy), for invariant checks."""
        return self._free.clone()

    def store(self, layer_id: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write the K/V ([T, kv_heads, head_dim]) of T tokens into their slots."""
        if use_fused(k):
            from sglang_core.kernels.fused import store_kv

            store_kv(k, v, self.k_buffers[layer_id], self.v_buffers[layer_id], slots)
            return
        self.k_buffers[layer_id][slots] = k.to(self.dtype)
        self.v_buffers[layer_id][slots] = v.to(self.dtype)

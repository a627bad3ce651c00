"""KV memory at token granularity.

Two pools, each owning one kind of memory and nothing else:

* ``ReqToTokenPool`` hands out request rows. Row ``r`` of ``req_to_token`` lists, in order,
  the KV slot of every token request ``r`` has cached so far.
* ``TokenKVPool`` hands out token slots and holds each layer's KV buffers indexed by slot, shaped
  by the layer's ``AttentionLayerSpec`` (the model declares them; see ``layers/attention_spec.py``).

Slot 0 is never handed out: it is the padding target, so a padded gather or a padded write
lands somewhere harmless.
"""

from __future__ import annotations

from typing import Sequence

import torch

from sglang_core.kernels import use_fused
from sglang_core.layers.attention_spec import AttentionLayerSpec, KVLayout


class ReqToTokenPool:
    """Request rows: ``req_to_token[row, i]`` is the KV slot of the row's i-th token."""

    def __init__(self, max_requests: int, max_context_len: int, device: torch.device | str):
        self.size = max_requests
        self.max_context_len = max_context_len
        self.req_to_token = torch.zeros((max_requests, max_context_len), dtype=torch.int64, device=device)
        self._free_rows = list(range(max_requests))
        # Rows whose entries were replaced, not only extended, since a copy of the table last
        # read them: row -> first replaced column (0: a new occupant). Tensor parallelism's step
        # channel re-sends these from there to the other ranks' copies; None (kept by no one)
        # until it calls ``track_rewrites``.
        self.rewritten: dict[int, int] | None = None

    def available_size(self) -> int:
        return len(self._free_rows)

    def track_rewrites(self) -> None:
        """Keep ``rewritten`` from now on."""
        self.rewritten = {}

    def alloc(self) -> int | None:
        if not self._free_rows:
            return None
        row = self._free_rows.pop()
        if self.rewritten is not None:
            self.rewritten[row] = 0
        return row

    def rewrite(self, row: int, start: int, slots: torch.Tensor) -> None:
        """Replace the row's entries from column ``start`` on with ``slots``."""
        if len(slots):
            self.req_to_token[row, start : start + len(slots)] = slots
            if self.rewritten is not None:
                self.rewritten[row] = min(self.rewritten.get(row, start), start)

    def free(self, row: int) -> None:
        self._free_rows.append(row)

    def clear(self) -> None:
        self._free_rows = list(range(self.size))


def row_prefixes(rows: torch.Tensor, lengths: torch.Tensor, total: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(row, column) indices of the first ``lengths[i]`` entries of each row ``rows[i]`` of
    ``req_to_token``, row after row: where every token of a batch's sequences has its KV slot.
    ``total`` is ``sum(lengths)``, given from the host so nothing waits for the device."""
    request = torch.repeat_interleave(torch.arange(rows.shape[0], device=rows.device), lengths, output_size=total)
    starts = torch.cumsum(lengths, 0) - lengths
    return rows[request], torch.arange(total, device=rows.device) - starts[request]


class TokenKVPool:
    """Token slots 1..size and, per layer, the buffers they index, shaped by the layer's spec:
    K ``[size + 1, kv_heads, head_dim]`` and V ``[size + 1, kv_heads, v_head_dim]``, or for a
    latent layout one ``[size + 1, 1, head_dim]`` buffer whose first ``v_head_dim`` columns are
    read as V. Backends reach the buffers through ``k_buffer``/``v_buffer`` only."""

    def __init__(self, size: int, layers: Sequence[AttentionLayerSpec], dtype: torch.dtype,
                 device: torch.device | str):
        self.size = size
        self.layers = tuple(layers)
        self.dtype = dtype
        self.device = torch.device(device)
        self._k: list[torch.Tensor] = []
        self._v: list[torch.Tensor] = []
        for spec in self.layers:
            k = torch.zeros((size + 1, spec.num_kv_heads, spec.head_dim), dtype=dtype, device=device)
            self._k.append(k)
            if spec.kv_layout is KVLayout.LATENT:
                self._v.append(k[..., :spec.v_head_dim])
            else:
                self._v.append(torch.zeros((size + 1, spec.num_kv_heads, spec.v_head_dim), dtype=dtype, device=device))
        self._free = torch.arange(1, size + 1, dtype=torch.int64, device=device)

    @staticmethod
    def bytes_per_token(layers: Sequence[AttentionLayerSpec], dtype: torch.dtype) -> int:
        values = sum(spec.kv_values_per_token for spec in layers)
        return values * torch.empty((), dtype=dtype).element_size()

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def k_buffer(self, layer_id: int) -> torch.Tensor:
        """Keys of every slot, [size + 1, kv_heads, head_dim] (a latent layout: the latents)."""
        return self._k[layer_id]

    def v_buffer(self, layer_id: int) -> torch.Tensor:
        """Values of every slot, [size + 1, kv_heads, v_head_dim]; for a latent layout a view of
        the latents (so not contiguous: read its strides)."""
        return self._v[layer_id]

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

    def store(self, layer_id: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor | None) -> None:
        """Write the K ([T, kv_heads, head_dim]) and V ([T, kv_heads, v_head_dim]) of T tokens
        into their slots; a latent layout takes the latents as ``k`` and no ``v``."""
        k_buffer = self._k[layer_id]
        if self.layers[layer_id].kv_layout is KVLayout.LATENT:
            if v is not None:
                raise ValueError(f"layer {layer_id} keeps latents: store them as k, with v=None")
            k_buffer[slots] = k.to(self.dtype)
            return
        v_buffer = self._v[layer_id]
        if use_fused(k) and k.shape == v.shape:
            from sglang_core.kernels.fused import store_kv

            store_kv(k, v, k_buffer, v_buffer, slots)
            return
        k_buffer[slots] = k.to(self.dtype)
        v_buffer[slots] = v.to(self.dtype)

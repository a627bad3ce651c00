"""KV-slot ownership: which request, the prefix cache or the free pool holds each KV slot.

Every slot is free in the pool, owned by the prefix cache, or owned by exactly one live
request: its row of ``req_to_token`` from ``prefix_len`` to ``kv_len``. The row's first
``prefix_len`` slots are the cache's, borrowed under the lock ``cache_handle``. Requests get
and give back memory only through ``RequestMemory``, which in turn changes the pools and the
cache only through their own methods.
"""

from __future__ import annotations

from typing import Any

import torch

from sglang_core.mem.kv_pool import ReqToTokenPool, TokenKVPool
from sglang_core.mem.prefix_cache import NoPrefixCache, RadixCache
from sglang_core.request import Req


class RequestMemory:
    def __init__(self, req_pool: ReqToTokenPool, kv_pool: TokenKVPool, radix_cache: bool):
        self.req_pool = req_pool
        self.kv_pool = kv_pool
        self.radix_cache = radix_cache
        self.cache = (RadixCache if radix_cache else NoPrefixCache)(kv_pool)

    def available(self) -> int:
        """Slots a request could get now: free ones and those eviction would free."""
        return self.kv_pool.available_size() + self.cache.evictable_size()

    def _alloc(self, n: int) -> torch.Tensor | None:
        short = n - self.kv_pool.available_size()
        if short > 0:
            self.cache.evict(short)
        return self.kv_pool.alloc(n)

    def admit(self, req: Req, prefix: torch.Tensor, handle: Any, regime: int = 0) -> None:
        """Give the request a row holding its cached ``prefix``, matched in ``regime``'s namespace
        and locked as ``handle``; its KV is computed in ``regime`` (``length_regimes``)."""
        row = self.req_pool.alloc()
        assert row is not None, "admission checked for a free request row"
        req.req_pool_idx = row
        req.kv_regime = regime
        req.prefix_len = req.kv_len = len(prefix)
        req.cache_handle = handle
        self.req_pool.req_to_token[row, : len(prefix)] = prefix
        if req.times_retracted == 0:
            req.cached_tokens = len(prefix)

    def grow(self, req: Req, n: int) -> bool:
        """Give the request ``n`` more KV slots at the end of its row (evicting cache if needed)."""
        slots = self._alloc(n)
        if slots is None:
            return False
        self.req_pool.req_to_token[req.req_pool_idx, req.kv_len : req.kv_len + n] = slots
        req.kv_len += n
        return True

    def append_slots(self, reqs: list[Req]) -> torch.Tensor:
        """One more KV slot per request, written into the request rows with one scatter."""
        slots = self._alloc(len(reqs))
        assert slots is not None, "the caller checked that a slot is free for every request"
        device = self.req_pool.req_to_token.device
        rows = torch.tensor([req.req_pool_idx for req in reqs], dtype=torch.int64)
        columns = torch.tensor([req.kv_len for req in reqs], dtype=torch.int64)
        self.req_pool.req_to_token[rows.to(device, non_blocking=True), columns.to(device, non_blocking=True)] = slots
        for req in reqs:
            req.kv_len += 1
        return slots

    def token_slots(self, req: Req, start: int, end: int) -> torch.Tensor:
        """The KV slots of the request's tokens ``[start, end)``."""
        return self.req_pool.req_to_token[req.req_pool_idx, start:end]

    def cache_prompt(self, req: Req) -> None:
        """Put a just-prefilled prompt into the radix tree now rather than when the request ends,
        so requests admitted while it decodes (the rest of a batch sharing a system prompt) reuse
        it. The request then holds the tree's slots for it under a lock, like a matched prefix."""
        if not self.radix_cache or req.kv_len <= req.prefix_len:
            return
        row, n = req.req_pool_idx, req.kv_len
        slots = self.req_pool.req_to_token[row, :n].clone()
        key = req.key_ids[:n]
        already = self.cache.insert(key, slots, req.kv_regime)
        cached, handle = self.cache.match_prefix(key, req.kv_regime)
        self.cache.lock(handle)
        self.cache.unlock(req.cache_handle)
        # Tokens another request cached meanwhile: ours are duplicates; use the tree's. (Before
        # prefix_len the row holds the tree's slots already, locked since admission; from
        # ``already`` on, the tree took ours.)
        self.kv_pool.free(slots[req.prefix_len : already])
        self.req_pool.rewrite(row, req.prefix_len, cached[req.prefix_len : already])
        req.cache_handle, req.prefix_len = handle, n

    def release(self, req: Req, cache: bool) -> None:
        """Give back every KV slot and the request row; cache the computed prefix if asked."""
        if req.req_pool_idx is None:
            return
        slots = self.req_pool.req_to_token[req.req_pool_idx, : req.kv_len].clone()
        # An in-flight decode may hold a slot for a token not yet read back: freed, not cached.
        known = min(req.kv_len, req.fill_len)
        if cache and known > 0:
            already = self.cache.insert(req.key_ids[:known], slots[:known], req.kv_regime)
            self.kv_pool.free(slots[req.prefix_len : already])
            self.kv_pool.free(slots[known:])
        else:
            self.kv_pool.free(slots[req.prefix_len :])
        if req.cache_handle is not None:
            self.cache.unlock(req.cache_handle)
        self.req_pool.free(req.req_pool_idx)
        req.req_pool_idx, req.cache_handle, req.prefix_len, req.kv_len = None, None, 0, 0

    def flush(self) -> None:
        """Drop the prefix cache and take every slot and row back; only when no request holds memory."""
        self.cache.reset()
        self.kv_pool.clear()
        self.req_pool.clear()

    def report(self) -> dict[str, int]:
        return {
            "kv_pool_size": self.kv_pool.size,
            "kv_free": self.kv_pool.available_size(),
            "kv_cached": self.cache.total_size(),
            "kv_cache_locked": self.cache.protected_size(),
            "request_rows": self.req_pool.size,
            "request_rows_free": self.req_pool.available_size(),
        }

    def check_all_returned(self) -> None:
        """With no request live: every slot is either free or owned by the cache, exactly once."""
        owned = torch.cat((self.kv_pool.free_slots(), self.cache.all_slots().to(self.kv_pool.device)))
        expected = torch.arange(1, self.kv_pool.size + 1, device=owned.device)
        assert owned.numel() == self.kv_pool.size and torch.equal(owned.sort().values, expected), "KV slots leaked"
        assert self.cache.protected_size() == 0, "a finished request still locks the prefix cache"
        assert self.req_pool.available_size() == self.req_pool.size, "request rows leaked"

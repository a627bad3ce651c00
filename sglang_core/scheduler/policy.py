"""The order in which waiting requests are considered for admission."""

from __future__ import annotations

import time
from typing import Callable

from sglang_core.request import Req

# Matching every waiting prompt against the cache each step costs O(queue * prompt); past this
# queue length longest-prefix-match falls back to arrival order, as a long queue is all backlog.
LPM_MAX_QUEUE = 128


def order_waiting(waiting: list[Req], policy: str, prefix_len: Callable[[Req], int], aging_s: float,
                  now: float | None = None) -> list[Req]:
    """Requests waiting longer than ``aging_s`` first (arrival order), then the policy's order.

    ``lpm`` puts the longest cached prefix first, so requests sharing a prefix run together while
    it is still cached; aging bounds how long a cache-cold request can be passed over.
    """
    now = time.monotonic() if now is None else now
    aged = sorted((r for r in waiting if now - r.arrival_time >= aging_s), key=lambda r: r.arrival_time)
    rest = sorted((r for r in waiting if now - r.arrival_time < aging_s), key=lambda r: r.arrival_time)
    if policy == "lpm" and len(waiting) <= LPM_MAX_QUEUE:
        rest.sort(key=prefix_len, reverse=True)  # stable: ties stay in arrival order
    return aged + rest

"""Routing policies: which replica takes a request. Built in: ``round_robin``,
``shortest_queue`` and ``cache_aware``; a plugin adds one with the ``register_router_policies``
hook (this module registers the built-in ones through the same hook)."""

from __future__ import annotations

import dataclasses
import itertools
from typing import Hashable, Sequence

from sglang_core.hookspecs import Register, hookimpl
from sglang_core.router.options import RouterOptions
from sglang_core.router.tree import ApproxRadixTree


@dataclasses.dataclass
class ReplicaLoad:
    """What one replica has in flight, as the router counts it."""

    requests: int = 0
    tokens: int = 0  # routing-key length (prompt tokens, or characters) of those requests


class RoutingPolicy:
    """Picks a replica for a request. Built as ``cls(replicas, options)``; ``choose`` is called
    from one thread at a time."""

    def __init__(self, replicas: int, options: RouterOptions):
        self.replicas = replicas
        self.options = options

    def choose(self, key: Sequence[Hashable], loads: Sequence[ReplicaLoad], live: Sequence[int]) -> int:
        """The replica (one of ``live``, never empty) for a request whose prompt is ``key``."""
        raise NotImplementedError

    def forget(self, replica: int) -> None:
        """``replica``'s prefix cache was flushed, or it died: drop what the policy knows of it."""


def least_loaded(loads: Sequence[ReplicaLoad], live: Sequence[int]) -> int:
    """Fewest requests in flight, then fewest tokens, then the lowest index."""
    return min(live, key=lambda r: (loads[r].requests, loads[r].tokens, r))


class RoundRobin(RoutingPolicy):
    def __init__(self, replicas: int, options: RouterOptions):
        super().__init__(replicas, options)
        self._turns = itertools.cycle(range(replicas))

    def choose(self, key, loads, live):
        while True:
            replica = next(self._turns)
            if replica in live:
                return replica


class ShortestQueue(RoutingPolicy):
    def choose(self, key, loads, live):
        return least_loaded(loads, live)


class CacheAware(RoutingPolicy):
    """The replica holding the longest prefix of the prompt (per an ``ApproxRadixTree`` of what
    each was sent), unless the load is imbalanced or no replica holds enough of the prompt: then
    the shortest queue (ties: the replica holding the least, so new prefixes spread out)."""

    def __init__(self, replicas: int, options: RouterOptions):
        super().__init__(replicas, options)
        self.tree = ApproxRadixTree(options.router_max_tree_tokens)

    def choose(self, key, loads, live):
        replica = self._pick(key, loads, live)
        self.tree.insert(key, replica)
        return replica

    def forget(self, replica: int) -> None:
        self.tree.remove_tenant(replica)

    def imbalanced(self, loads: Sequence[ReplicaLoad], live: Sequence[int]) -> bool:
        busiest = max(loads[r].requests for r in live)
        idlest = min(loads[r].requests for r in live)
        return (busiest - idlest > self.options.router_balance_abs
                and busiest > idlest * self.options.router_balance_rel)

    def _pick(self, key, loads, live) -> int:
        if self.imbalanced(loads, live):
            return least_loaded(loads, live)
        matches = self.tree.match(key)
        best = max(matches.get(r, 0) for r in live)
        if best > 0 and best >= self.options.router_cache_threshold * len(key):
            return least_loaded(loads, [r for r in live if matches.get(r, 0) == best])
        return min(live, key=lambda r: (loads[r].requests, self.tree.size(r), r))


@hookimpl
def register_router_policies(register: Register) -> None:
    register("round_robin", RoundRobin)
    register("shortest_queue", ShortestQueue)
    register("cache_aware", CacheAware)

"""The router: a policy plus what it decides from (each replica's load, which replicas live)."""

from __future__ import annotations

import contextlib
import threading
from typing import Hashable, Iterator, Sequence

from sglang_core.plugins import PluginManager
from sglang_core.router.options import RouterOptions
from sglang_core.router.policies import ReplicaLoad, RoutingPolicy


class NoReplica(RuntimeError):
    """Every replica is dead: nothing can take the request."""


class Router:
    def __init__(self, replicas: int, options: RouterOptions, plugins: PluginManager):
        if replicas < 1:
            raise ValueError(f"dp_size: must be at least 1, got {replicas}")
        policies = plugins.registry("router_policies")
        if options.router_policy not in policies:
            raise ValueError(f"router_policy: no policy named {options.router_policy!r}; "
                             f"registered: {', '.join(sorted(policies.names()))}")
        policy_cls = policies.get(options.router_policy).load()
        self.policy: RoutingPolicy = policy_cls(replicas, options)
        self.loads = [ReplicaLoad() for _ in range(replicas)]
        self.live = [True] * replicas
        self._lock = threading.Lock()  # routing runs on event loops and worker threads alike

    @contextlib.contextmanager
    def routed(self, key: Sequence[Hashable]) -> Iterator[int]:
        """Pick a live replica for a request whose prompt is ``key``; it counts as in flight on
        that replica until the block ends."""
        with self._lock:
            live = [r for r, up in enumerate(self.live) if up]
            if not live:
                raise NoReplica("no replica is running")
            replica = self.policy.choose(key, self.loads, live)
            load = self.loads[replica]
            load.requests += 1
            load.tokens += len(key)
        try:
            yield replica
        finally:
            with self._lock:
                load.requests -= 1
                load.tokens -= len(key)

    def mark_dead(self, replica: int) -> None:
        with self._lock:
            self.live[replica] = False
            self.policy.forget(replica)

    def mark_live(self, replica: int) -> None:
        """A replica answers again (a standalone router's worker came back), its cache empty."""
        with self._lock:
            self.live[replica] = True

    def forget_cache(self, replica: int) -> None:
        with self._lock:
            self.policy.forget(replica)

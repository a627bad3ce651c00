"""The prefix cache: KV slots of token sequences seen before, shared across requests.

``RadixCache`` is RadixAttention's cache: a radix tree over token ids whose nodes hold the KV
slots of their tokens. A request matches its prompt against the tree, locks the match so
it cannot be evicted while in use, and when done inserts its tokens so later requests with
the same prefix skip recomputing them. Unlocked leaves are evicted least recently used
first when the KV pool runs short.

Each key lives in a namespace (default 0): keys of different namespaces never match, for
tokens whose KV depends on more than the tokens before them. A model with length regimes keys
its tokens by the regime that computed them (``scheduler/length_regimes.py``); each namespace is
a tree of its own, and eviction is least recently used across all of them.

``NoPrefixCache`` is the same interface with caching switched off.

Slot ownership, which the engine's leak check relies on: every slot of the KV pool is
either free in the pool, owned by the cache (``all_slots()``), or held by exactly one
request. Slots returned by ``match_prefix`` stay owned by the cache; the request only
borrows them while it holds the lock.
"""

from __future__ import annotations

import abc
import heapq
from typing import Any, Hashable, Protocol

import torch


class _SlotPool(Protocol):
    device: torch.device

    def free(self, slots: torch.Tensor) -> None: ...


class PrefixCache(abc.ABC):
    """What the scheduler needs from a prefix cache."""

    @abc.abstractmethod
    def match_prefix(self, key: list[int], namespace: Hashable = 0) -> tuple[torch.Tensor, Any]:
        """The KV slots (int64, 1-D, on the pool's device) of the longest prefix of ``key``
        cached in ``namespace``, and a handle for that match to pass to ``lock``/``unlock``.

        Counts as an access of the matched tokens for LRU eviction. The handle is only
        valid until the next eviction unless it is locked, so lock it straight away.
        """

    @abc.abstractmethod
    def lock(self, handle: Any) -> None:
        """Protect the matched prefix behind ``handle`` from eviction (reference counted)."""

    @abc.abstractmethod
    def unlock(self, handle: Any) -> None:
        """Undo one ``lock(handle)``; raises RuntimeError if ``handle`` is not locked."""

    @abc.abstractmethod
    def insert(self, key: list[int], slots: torch.Tensor, namespace: Hashable = 0) -> int:
        """Cache ``key`` in ``namespace``, its KV living in ``slots`` (one slot per token).

        Returns ``n``, the number of leading tokens of ``key`` already cached in ``namespace``.
        Ownership contract, for a caller that earlier matched ``p`` tokens of ``key``
        (so ``slots[:p]`` are the cache's own slots, and ``p <= n`` while it holds the lock):

        * ``slots[n:]`` now belong to the cache; the caller must not free them.
        * ``slots[p:n]`` are the caller's duplicates of already-cached tokens; the caller
          must free them back to the pool itself.

        A fully cached ``key`` returns ``len(key)`` and takes nothing. The cache copies the
        slot tensor, so the caller may reuse the memory it came from (e.g. a request row).
        Counts as an access of all of ``key`` for LRU eviction.
        """

    @abc.abstractmethod
    def evict(self, num_tokens: int) -> int:
        """Free at least ``num_tokens`` slots back to the pool if that many are evictable,
        least recently used unlocked leaves first. Returns the number of slots freed."""

    @abc.abstractmethod
    def evictable_size(self) -> int:
        """Cached tokens not protected by any lock."""

    @abc.abstractmethod
    def protected_size(self) -> int:
        """Cached tokens protected by at least one lock."""

    def total_size(self) -> int:
        """All cached tokens, i.e. the number of slots the cache owns."""
        return self.evictable_size() + self.protected_size()

    @abc.abstractmethod
    def reset(self) -> None:
        """Forget everything. Slots are NOT freed to the pool: the caller clears the pool."""

    @abc.abstractmethod
    def all_slots(self) -> torch.Tensor:
        """Every slot the cache owns (for leak checks)."""

    def shared_prefixes(self, handles: list[Any], min_length: int) -> tuple[tuple[int, tuple[int, ...]], ...]:
        """Group locked handles by the longest cached prefix they share with another one:
        ``(length, indices into handles)`` for groups of two or more sharing ``min_length``
        tokens or more (the requests holding them hold the same slots for those tokens)."""
        return ()


def _common_length(a: list[int], b: list[int]) -> int:
    """Length of the common prefix of ``a`` and ``b`` (``b`` no longer than ``a``; their first
    tokens are equal). Slice comparisons run in C: a shared system prompt of thousands of tokens
    is matched for every waiting request at every admission, so a per-token loop would cost ms."""
    n = len(b)
    if a[:n] == b:
        return n
    lo, hi = 1, n  # a[:lo] == b[:lo]; the first difference lies in [lo, hi)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if a[lo:mid] == b[lo:mid]:
            lo = mid
        else:
            hi = mid
    return lo


class _Node:
    """A radix tree node: a run of tokens, their KV slots, and bookkeeping."""

    __slots__ = ("children", "key", "value", "parent", "lock_ref", "last_access")

    def __init__(self, key: list[int], value: torch.Tensor, parent: _Node | None, last_access: int):
        self.children: dict[int, _Node] = {}  # keyed by the child's first token
        self.key = key
        self.value = value
        self.parent = parent
        self.lock_ref = 0
        self.last_access = last_access


class RadixCache(PrefixCache):
    """Radix tree prefix cache with reference-counted locks and LRU leaf eviction.

    Handles are tree nodes; each namespace has its root (``roots``), made when first used. Every
    operation splits nodes where a key ends or diverges inside them, so all tokens of one node
    always share one lock count and one access time.
    """

    def __init__(self, pool: _SlotPool):
        self.pool = pool
        self.device = torch.device(pool.device)
        # Access times come from a counter, not a clock, so eviction order is deterministic.
        self._clock = 0
        self.reset()

    def reset(self) -> None:
        self.roots: dict[Hashable, _Node] = {}
        self._evictable = 0
        self._protected = 0

    def _root(self, namespace: Hashable) -> _Node:
        root = self.roots.get(namespace)
        if root is None:
            empty = torch.empty(0, dtype=torch.int64, device=self.device)
            root = self.roots[namespace] = _Node([], empty, None, self._clock)
            root.lock_ref = 1  # a root holds no tokens and is never evicted
        return root

    # -- queries -----------------------------------------------------------------------

    def evictable_size(self) -> int:
        return self._evictable

    def protected_size(self) -> int:
        return self._protected

    def all_slots(self) -> torch.Tensor:
        values = [node.value for node in self._nodes()]
        if not values:
            return torch.empty(0, dtype=torch.int64, device=self.device)
        return torch.cat(values)

    # -- match / insert ----------------------------------------------------------------

    def match_prefix(self, key: list[int], namespace: Hashable = 0) -> tuple[torch.Tensor, Any]:
        node, _, values = self._walk(self._root(namespace), key, self._tick())
        if not values:
            return torch.empty(0, dtype=torch.int64, device=self.device), node
        return torch.cat(values), node

    def insert(self, key: list[int], slots: torch.Tensor, namespace: Hashable = 0) -> int:
        if len(key) != slots.numel():
            raise ValueError(f"insert: {len(key)} tokens but {slots.numel()} slots")
        now = self._tick()
        node, matched, _ = self._walk(self._root(namespace), key, now)
        if matched < len(key):
            value = slots[matched:].to(device=self.device, dtype=torch.int64, copy=True)
            leaf = _Node(list(key[matched:]), value, node, now)
            node.children[key[matched]] = leaf
            self._evictable += len(leaf.key)
        return matched

    def shared_prefixes(self, handles: list[Any], min_length: int) -> tuple[tuple[int, tuple[int, ...]], ...]:
        paths = []  # per handle: (node, tokens from the root to its end), root side first
        holders: dict[int, int] = {}  # node -> how many handles pass through it
        for handle in handles:
            chain = []
            node = handle
            while node is not None and node.parent is not None:
                chain.append(node)
                node = node.parent
            depth, path = 0, []
            for node in reversed(chain):
                depth += len(node.key)
                path.append((node, depth))
                holders[id(node)] = holders.get(id(node), 0) + 1
            paths.append(path)
        groups: dict[int, tuple[int, list[int]]] = {}
        for i, path in enumerate(paths):
            # The deepest node another handle also passes through, if it is long enough.
            shared = [(node, depth) for node, depth in path if holders[id(node)] > 1 and depth >= min_length]
            if shared:
                node, depth = shared[-1]
                groups.setdefault(id(node), (depth, []))[1].append(i)
        return tuple((depth, tuple(members)) for depth, members in groups.values() if len(members) > 1)

    def _tick(self) -> int:
        self._clock += 1
        return self._clock

    def _walk(self, root: _Node, key: list[int], now: int) -> tuple[_Node, int, list[torch.Tensor]]:
        """Follow ``key`` down from ``root``, splitting the last node if ``key`` ends or
        diverges inside it, stamping every node passed with ``now``.

        Returns the deepest node reached, the number of tokens matched, and the matched
        nodes' slot tensors in order.
        """
        node = root
        node.last_access = now
        matched = 0
        values: list[torch.Tensor] = []
        while matched < len(key):
            child = node.children.get(key[matched])
            if child is None:
                break
            limit = min(len(child.key), len(key) - matched)
            common = _common_length(child.key, key[matched:matched + limit])
            if common < len(child.key):
                child = self._split(child, common)
            child.last_access = now
            values.append(child.value)
            node = child
            matched += common
        return node, matched, values

    def _split(self, node: _Node, at: int) -> _Node:
        """Cut ``node`` after its first ``at`` tokens; return the new upper node.

        The upper node inherits lock count and access time: every lock and access that
        passed through ``node`` passed through all of its tokens. Sizes are unchanged.
        """
        upper = _Node(node.key[:at], node.value[:at], node.parent, node.last_access)
        upper.lock_ref = node.lock_ref
        upper.children[node.key[at]] = node
        node.parent.children[node.key[0]] = upper
        node.key = node.key[at:]
        node.value = node.value[at:]
        node.parent = upper
        return upper

    # -- locking -----------------------------------------------------------------------

    def lock(self, handle: Any) -> None:
        node: _Node = handle
        # A handle evicted before being locked is detached; locking it would corrupt counts.
        assert node.parent is None or node.parent.children.get(node.key[0]) is node, "stale handle"
        while node.parent is not None:
            if node.lock_ref == 0:
                self._evictable -= len(node.key)
                self._protected += len(node.key)
            node.lock_ref += 1
            node = node.parent

    def unlock(self, handle: Any) -> None:
        node: _Node = handle
        # Ancestors' counts are >= the handle's, so checking the handle alone is enough,
        # and nothing is modified before the error.
        if node.parent is not None and node.lock_ref <= 0:
            raise RuntimeError("unlock of a prefix-cache node that is not locked")
        while node.parent is not None:
            node.lock_ref -= 1
            if node.lock_ref == 0:
                self._protected -= len(node.key)
                self._evictable += len(node.key)
            node = node.parent

    # -- eviction ----------------------------------------------------------------------

    def evict(self, num_tokens: int) -> int:
        # Eviction is rare next to matching, so leaves are collected here rather than
        # tracked on every tree change. The sequence number breaks ties in the heap.
        heap = [
            (node.last_access, seq, node)
            for seq, node in enumerate(self._nodes())
            if not node.children and node.lock_ref == 0
        ]
        heapq.heapify(heap)
        seq = len(heap)
        freed = 0
        evicted: list[torch.Tensor] = []
        while freed < num_tokens and heap:
            _, _, node = heapq.heappop(heap)
            parent = node.parent
            del parent.children[node.key[0]]
            evicted.append(node.value)
            freed += len(node.key)
            self._evictable -= len(node.key)
            # A parent's access time is never older than its children's, so pushing it now
            # keeps the pop order LRU.
            if parent.parent is not None and not parent.children and parent.lock_ref == 0:
                heapq.heappush(heap, (parent.last_access, seq, parent))
                seq += 1
        if evicted:
            self.pool.free(torch.cat(evicted))
        return freed

    # -- checks ------------------------------------------------------------------------

    def _nodes(self) -> list[_Node]:
        """Every node except the roots."""
        out: list[_Node] = []
        stack = [child for root in self.roots.values() for child in root.children.values()]
        while stack:
            node = stack.pop()
            out.append(node)
            stack.extend(node.children.values())
        return out

    def check_integrity(self) -> None:
        """Recompute the size counters and structural invariants from the tree; raise
        AssertionError on any mismatch."""
        for root in self.roots.values():
            assert root.lock_ref >= 1 and not root.key, "roots must stay locked and empty"
        evictable = protected = 0
        for node in self._nodes():
            parent = node.parent
            assert node.key, "non-root node with no tokens"
            assert len(node.key) == node.value.numel(), "key and slots differ in length"
            assert parent is not None and parent.children.get(node.key[0]) is node, "bad parent link"
            assert node.lock_ref >= 0, "negative lock count"
            assert parent.parent is None or parent.lock_ref >= node.lock_ref, "child locked more than parent"
            assert node.last_access <= parent.last_access or parent.parent is None, "child newer than parent"
            for first, child in node.children.items():
                assert child.key[0] == first, "child stored under the wrong token"
            if node.lock_ref:
                protected += len(node.key)
            else:
                evictable += len(node.key)
        assert evictable == self._evictable, f"evictable {self._evictable} != recomputed {evictable}"
        assert protected == self._protected, f"protected {self._protected} != recomputed {protected}"


class NoPrefixCache(PrefixCache):
    """The prefix cache switched off: nothing is ever cached."""

    def __init__(self, pool: _SlotPool):
        self.device = torch.device(pool.device)

    def match_prefix(self, key: list[int], namespace: Hashable = 0) -> tuple[torch.Tensor, Any]:
        return torch.empty(0, dtype=torch.int64, device=self.device), None

    def lock(self, handle: Any) -> None:
        pass

    def unlock(self, handle: Any) -> None:
        pass

    def insert(self, key: list[int], slots: torch.Tensor, namespace: Hashable = 0) -> int:
        # Claiming everything is already cached makes the caller free all its slots.
        return len(key)

    def evict(self, num_tokens: int) -> int:
        return 0

    def evictable_size(self) -> int:
        return 0

    def protected_size(self) -> int:
        return 0

    def reset(self) -> None:
        pass

    def all_slots(self) -> torch.Tensor:
        return torch.empty(0, dtype=torch.int64, device=self.device)

"""An approximate picture of what each replica's prefix cache holds: one radix tree of the
sequences (token ids, or characters for the standalone router) each replica was sent.

Every node records which replicas ("tenants") hold its edge and when each last did (a tick of
the tree's clock, bumped per insert). A tenant on a node is on all of its ancestors, so one walk
down the tree gives every tenant's longest match. Each tenant holds at most ``max_tokens``
elements: past that, its least recently used leaves are trimmed, element by element from the
end, so the tree never grows beyond ``tenants x max_tokens`` elements whatever the load.

It is approximate because the replicas evict on their own (memory pressure, ``/flush_cache``)
and the router cannot see that; a stale entry costs only a less useful routing decision.
"""

from __future__ import annotations

import heapq
import itertools
from typing import Hashable, Sequence


class _Node:
    __slots__ = ("key", "parent", "children", "tenants")

    def __init__(self, key: tuple, parent: _Node | None):
        self.key = key  # the edge's elements, from the parent to this node
        self.parent = parent
        self.children: dict[Hashable, _Node] = {}
        self.tenants: dict[int, int] = {}  # tenant -> tick of its last insert through this node

    def is_leaf_of(self, tenant: int) -> bool:
        return not any(tenant in child.tenants for child in self.children.values())


def _common_length(a: tuple, b: Sequence, start: int) -> int:
    n = min(len(a), len(b) - start)
    i = 0
    while i < n and a[i] == b[start + i]:
        i += 1
    return i


class ApproxRadixTree:
    def __init__(self, max_tokens: int):
        if max_tokens <= 0:
            raise ValueError(f"router_max_tree_tokens: must be positive, got {max_tokens}")
        self.max_tokens = max_tokens
        self._root = _Node((), None)
        self._tick = 0
        self._sizes: dict[int, int] = {}  # tenant -> elements it holds
        # Per tenant, candidate leaves by age: (tick, order, node). Entries go stale when a node is
        # touched again or split; they are checked when popped, and the heap is rebuilt from the
        # tree when stale ones pile up, so it stays proportional to the tree.
        self._leaves: dict[int, list[tuple[int, int, _Node]]] = {}
        self._order = itertools.count()
        self._nodes = 0

    def size(self, tenant: int) -> int:
        """Elements the tree believes ``tenant`` holds."""
        return self._sizes.get(tenant, 0)

    def match(self, seq: Sequence) -> dict[int, int]:
        """Each tenant's longest prefix of ``seq`` that it holds (tenants with none are absent)."""
        found: dict[int, int] = {}
        node, pos = self._root, 0
        while pos < len(seq):
            child = node.children.get(seq[pos])
            if child is None:
                break
            common = _common_length(child.key, seq, pos)
            for tenant in child.tenants:
                found[tenant] = pos + common
            if common < len(child.key):
                break
            node, pos = child, pos + common
        return found

    def insert(self, seq: Sequence, tenant: int) -> None:
        """Record that ``tenant`` was sent ``seq``, then trim it back to ``max_tokens``."""
        self._tick += 1
        node, pos = self._root, 0
        while pos < len(seq):
            child = node.children.get(seq[pos])
            if child is None:
                child = _Node(tuple(seq[pos:]), node)
                node.children[seq[pos]] = child
                self._nodes += 1
            else:
                common = _common_length(child.key, seq, pos)
                if common < len(child.key):
                    child = self._split(child, common)
            if tenant not in child.tenants:
                self._sizes[tenant] = self.size(tenant) + len(child.key)
            child.tenants[tenant] = self._tick
            node, pos = child, pos + len(child.key)
        if node is not self._root:
            self._push_leaf(tenant, node)
        self._evict(tenant)

    def remove_tenant(self, tenant: int) -> None:
        """Forget everything ``tenant`` holds (its cache was flushed, or it is gone)."""
        stack = list(self._root.children.values())
        while stack:
            node = stack.pop()
            if node.tenants.pop(tenant, None) is not None:
                stack.extend(node.children.values())
                if not node.tenants:
                    self._drop(node)
        self._sizes.pop(tenant, None)
        self._leaves.pop(tenant, None)

    def _split(self, node: _Node, at: int) -> _Node:
        """Cut ``node``'s edge after ``at`` elements; return the new upper node."""
        upper = _Node(node.key[:at], node.parent)
        upper.tenants = dict(node.tenants)
        node.parent.children[node.key[0]] = upper
        node.key = node.key[at:]
        node.parent = upper
        upper.children[node.key[0]] = node
        self._nodes += 1
        return upper

    def _drop(self, node: _Node) -> None:
        del node.parent.children[node.key[0]]
        self._nodes -= 1

    def _push_leaf(self, tenant: int, node: _Node) -> None:
        heap = self._leaves.setdefault(tenant, [])
        heapq.heappush(heap, (node.tenants[tenant], next(self._order), node))
        if len(heap) > 4 * self._nodes + 64:
            self._rebuild_leaves(tenant)

    def _rebuild_leaves(self, tenant: int) -> None:
        heap = []
        stack = list(self._root.children.values())
        while stack:
            node = stack.pop()
            if tenant in node.tenants:
                if node.is_leaf_of(tenant):
                    heap.append((node.tenants[tenant], next(self._order), node))
                stack.extend(node.children.values())
        heapq.heapify(heap)
        self._leaves[tenant] = heap

    def _evict(self, tenant: int) -> None:
        heap = self._leaves.get(tenant, [])
        while self.size(tenant) > self.max_tokens:
            tick, _, node = heapq.heappop(heap)
            if node.tenants.get(tenant) != tick or node.parent is None or not node.is_leaf_of(tenant):
                continue  # stale: touched since, split off, or no longer a leaf of this tenant
            excess = self.size(tenant) - self.max_tokens
            if excess < len(node.key):  # trim only the edge's tail
                self._split(node, len(node.key) - excess)
            self._sizes[tenant] -= len(node.key)
            del node.tenants[tenant]
            if not node.tenants:
                self._drop(node)
            parent = node.parent
            if parent is not self._root and parent.is_leaf_of(tenant):
                heapq.heappush(heap, (parent.tenants[tenant], next(self._order), parent))

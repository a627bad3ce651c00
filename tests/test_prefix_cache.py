"""Tests for the prefix cache: unit tests, and a stateful property test that runs random
operation sequences against a plain-Python reference model and a real TokenKVPool."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import pytest
import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from sglang_core.layers.attention_spec import AttentionLayerSpec
from sglang_core.mem.kv_pool import TokenKVPool
from sglang_core.mem.prefix_cache import NoPrefixCache, RadixCache

POOL_SIZE = 200


def make_pool(size: int = POOL_SIZE) -> TokenKVPool:
    return TokenKVPool(size, [AttentionLayerSpec(1, 1, 1, 1, 1.0)], dtype=torch.float32, device="cpu")


def slots_of(values: list[int]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int64)


# -- unit tests ------------------------------------------------------------------------


def test_match_on_empty_cache_returns_nothing():
    cache = RadixCache(make_pool())
    slots, handle = cache.match_prefix([1, 2, 3])
    assert slots.dtype == torch.int64 and slots.numel() == 0
    cache.lock(handle)  # the root handle is lockable and changes nothing
    cache.unlock(handle)
    assert cache.total_size() == 0
    cache.check_integrity()


def test_partial_match_splits_node():
    cache = RadixCache(make_pool())
    assert cache.insert([1, 2, 3, 4], slots_of([10, 11, 12, 13])) == 0
    slots, handle = cache.match_prefix([1, 2, 9])
    assert slots.tolist() == [10, 11]
    assert handle.key == [1, 2] and list(handle.children) == [3]
    assert handle.children[3].key == [3, 4] and handle.children[3].value.tolist() == [12, 13]
    # Locking the split-off prefix protects only its two tokens.
    cache.lock(handle)
    assert (cache.protected_size(), cache.evictable_size()) == (2, 2)
    cache.check_integrity()
    assert cache.match_prefix([1, 2, 3, 4, 5])[0].tolist() == [10, 11, 12, 13]


def test_insert_returns_already_cached_length():
    cache = RadixCache(make_pool())
    assert cache.insert([1, 2, 3], slots_of([10, 11, 12])) == 0
    assert cache.insert([1, 2, 3, 4, 5], slots_of([20, 21, 22, 23, 24])) == 3
    # Only the uncached tail was taken; the cache keeps its original slots for the prefix.
    assert cache.match_prefix([1, 2, 3, 4, 5])[0].tolist() == [10, 11, 12, 23, 24]
    # A fully cached key takes nothing, whether it ends at or inside a node.
    assert cache.insert([1, 2, 3, 4, 5], slots_of([30, 31, 32, 33, 34])) == 5
    assert cache.insert([1, 2], slots_of([40, 41])) == 2
    assert sorted(cache.all_slots().tolist()) == [10, 11, 12, 23, 24]
    assert cache.total_size() == 5
    cache.check_integrity()


def test_insert_copies_slots():
    cache = RadixCache(make_pool())
    row = slots_of([10, 11, 12])
    cache.insert([1, 2, 3], row)
    row.fill_(0)  # the caller reusing its request row must not touch the cache
    assert cache.match_prefix([1, 2, 3])[0].tolist() == [10, 11, 12]


def test_namespaces_keep_the_same_tokens_apart():
    """The same key cached in two namespaces: each match reads its own namespace's slots (none
    where only the other has it), locks protect one namespace's copy, and eviction goes least
    recently used across namespaces."""
    pool = make_pool(10)
    cache = RadixCache(pool)
    short, long = pool.alloc(3), pool.alloc(3)
    assert cache.insert([1, 2, 3], short) == 0
    assert cache.match_prefix([1, 2, 3], namespace=1)[0].numel() == 0
    assert cache.insert([1, 2, 3], long, namespace=1) == 0  # takes its own slots: nothing was cached there
    assert cache.match_prefix([1, 2, 3, 4])[0].tolist() == short.tolist()
    slots, handle = cache.match_prefix([1, 2], namespace=1)
    assert slots.tolist() == long[:2].tolist()
    cache.lock(handle)
    assert (cache.protected_size(), cache.evictable_size()) == (2, 4)
    cache.match_prefix([1, 2, 3], namespace=1)  # namespace 0's [1, 2, 3] is now the least recently used
    assert cache.evict(1) == 3
    assert pool.free_slots()[-3:].tolist() == short.tolist()
    assert cache.match_prefix([1, 2, 3])[0].numel() == 0
    assert cache.evict(10) == 1  # namespace 1's locked [1, 2] stays
    cache.unlock(handle)
    cache.check_integrity()
    assert sorted(cache.all_slots().tolist()) == sorted(long[:2].tolist())


def test_evict_frees_least_recently_used_leaf_first():
    pool = make_pool(10)
    cache = RadixCache(pool)
    a, b, c = pool.alloc(2), pool.alloc(2), pool.alloc(2)
    cache.insert([1, 1], a)
    cache.insert([2, 2], b)
    cache.insert([3, 3], c)
    cache.match_prefix([1, 1])  # now [2, 2] is the least recently used
    free_before = pool.available_size()
    assert cache.evict(1) == 2
    assert pool.available_size() == free_before + 2
    assert pool.free_slots()[-2:].tolist() == b.tolist()
    assert cache.match_prefix([2, 2])[0].numel() == 0
    assert cache.evict(1) == 2  # then [3, 3]
    assert cache.match_prefix([3, 3])[0].numel() == 0
    assert cache.match_prefix([1, 1])[0].tolist() == a.tolist()
    cache.check_integrity()


def test_evict_skips_locked_and_climbs_to_parent():
    pool = make_pool(10)
    cache = RadixCache(pool)
    cache.insert([1, 2, 3], pool.alloc(3))
    dup = pool.alloc(3)
    assert cache.insert([1, 2, 4], dup) == 2
    pool.free(dup[:2])  # the caller frees its duplicates of [1, 2]
    _, handle = cache.match_prefix([1, 2, 4])
    cache.lock(handle)
    assert cache.evict(100) == 1  # only the unlocked [3] leaf can go
    cache.unlock(handle)
    assert cache.evict(100) == 3  # [4], then its parent [1, 2] once it becomes a leaf
    assert cache.total_size() == 0
    cache.check_integrity()


def test_unlock_below_zero_errors():
    cache = RadixCache(make_pool())
    cache.insert([1, 2], slots_of([10, 11]))
    _, handle = cache.match_prefix([1, 2])
    with pytest.raises(RuntimeError):
        cache.unlock(handle)
    cache.lock(handle)
    cache.unlock(handle)
    with pytest.raises(RuntimeError):
        cache.unlock(handle)
    cache.check_integrity()


def test_reset_forgets_without_freeing():
    pool = make_pool(10)
    cache = RadixCache(pool)
    cache.insert([1, 2], pool.alloc(2))
    cache.reset()
    assert cache.total_size() == 0 and cache.all_slots().numel() == 0
    assert cache.match_prefix([1, 2])[0].numel() == 0
    assert pool.available_size() == 8


def test_shared_prefixes_group_requests_by_their_longest_common_prefix():
    """Requests (their full prompts cached, a handle each) under two system prompts, one alone,
    and two that share only a short header: grouped by system prompt, with its length; the
    others in no group. Checked against the keys themselves, and the slots are one copy."""
    pool = make_pool(1000)
    cache = RadixCache(pool)
    header = [1, 2, 3]
    system = {"a": header + list(range(100, 140)), "b": header + list(range(200, 260))}
    prompts = [system["a"] + [7, 8], system["b"] + [9], system["a"] + [5], system["b"] + [6, 6],
               system["a"] + [4, 4, 4], header + [300, 301], header + [400], list(range(500, 520))]
    handles = []
    for key in prompts:
        cached, _ = cache.match_prefix(key)
        cache.insert(key, torch.cat([cached, pool.alloc(len(key) - len(cached))]))
        handles.append(cache.match_prefix(key)[1])
    groups = cache.shared_prefixes(handles, min_length=10)
    assert sorted(groups) == [(len(system["a"]), (0, 2, 4)), (len(system["b"]), (1, 3))]
    for length, members in groups:
        first = prompts[members[0]][:length]
        assert all(prompts[m][:length] == first for m in members)
        slots = [cache.match_prefix(prompts[m][:length])[0].tolist() for m in members]
        assert all(s == slots[0] for s in slots)
    # A lower bar groups the header-only pair too; NoPrefixCache groups nothing.
    assert (3, (5, 6)) in cache.shared_prefixes(handles, min_length=3)
    assert NoPrefixCache(pool).shared_prefixes(handles, min_length=1) == ()
    cache.check_integrity()


def test_no_prefix_cache():
    pool = make_pool(10)
    cache = NoPrefixCache(pool)
    slots = pool.alloc(3)
    assert cache.insert([1, 2, 3], slots) == 3  # takes nothing: the caller frees all three
    prefix, handle = cache.match_prefix([1, 2, 3])
    assert prefix.dtype == torch.int64 and prefix.numel() == 0 and handle is None
    cache.lock(handle)
    cache.unlock(handle)
    assert cache.evict(5) == 0
    assert (cache.evictable_size(), cache.protected_size(), cache.total_size()) == (0, 0, 0)
    assert cache.all_slots().numel() == 0
    cache.reset()
    assert pool.available_size() == 7


# -- reference model -------------------------------------------------------------------


class RefCache:
    """The cache as a flat set of cached prefixes: each cached prefix, a tuple of its namespace
    then its tokens, maps to the slot of its last token, its lock count and its last access
    tick. Prefix-closed within each namespace."""

    def __init__(self) -> None:
        self.slot: dict[tuple[int, ...], int] = {}
        self.locks: dict[tuple[int, ...], int] = {}
        self.time: dict[tuple[int, ...], int] = {}
        self.clock = 0

    def cached_len(self, key: list[int], namespace: int) -> int:
        n = 0
        while n < len(key) and (namespace, *key[: n + 1]) in self.slot:
            n += 1
        return n

    def match(self, key: list[int], namespace: int) -> list[int]:
        self.clock += 1
        prefixes = [(namespace, *key[:i]) for i in range(1, self.cached_len(key, namespace) + 1)]
        for p in prefixes:
            self.time[p] = self.clock
        return [self.slot[p] for p in prefixes]

    def insert(self, key: list[int], slots: list[int], namespace: int) -> int:
        self.clock += 1
        already = self.cached_len(key, namespace)
        for i in range(len(key)):
            p = (namespace, *key[: i + 1])
            if p not in self.slot:
                self.slot[p], self.locks[p] = slots[i], 0
            self.time[p] = self.clock
        return already

    def lock(self, prefix: list[int], namespace: int, delta: int) -> None:
        for i in range(1, len(prefix) + 1):
            self.locks[(namespace, *prefix[:i])] += delta

    def remove(self, prefixes: set[tuple[int, ...]]) -> None:
        for p in prefixes:
            del self.slot[p], self.locks[p], self.time[p]

    def leaves(self) -> set[tuple[int, ...]]:
        parents = {p[:-1] for p in self.slot}  # a namespace's first tokens have (namespace,): no entry
        return {p for p in self.slot if p not in parents}


def tree_contents(cache: RadixCache) -> dict[tuple[int, ...], tuple[int, int, int]]:
    """Read the trees' structure only: (namespace, *cached prefix) -> (slot, lock count, access time)."""
    out: dict[tuple[int, ...], tuple[int, int, int]] = {}
    stack = [(root, (namespace,)) for namespace, root in cache.roots.items()]
    while stack:
        node, prefix = stack.pop()
        for tok, slot in zip(node.key, node.value.tolist()):
            prefix = prefix + (tok,)
            out[prefix] = (slot, node.lock_ref, node.last_access)
        stack.extend((child, prefix) for child in node.children.values())
    return out


@dataclass
class Request:
    key: list[int]
    namespace: int
    prefix: torch.Tensor  # cache-owned slots, locked through handle
    handle: object
    own: torch.Tensor  # slots the request holds for key[len(prefix):]


tokens = st.integers(0, 3)  # a tiny alphabet so keys share prefixes often
keys = st.lists(tokens, max_size=12)
namespaces = st.integers(0, 1)  # the same keys land in both often


class RadixCacheMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.pool = make_pool()
        self.cache = RadixCache(self.pool)
        self.ref = RefCache()
        self.requests: dict[int, Request] = {}
        self.next_rid = 0

    # Helpers mirror every cache call on the reference, so their access clocks stay in step.

    def _match(self, key: list[int], namespace: int) -> tuple[torch.Tensor, object]:
        slots, handle = self.cache.match_prefix(key, namespace)
        assert slots.dtype == torch.int64 and slots.dim() == 1
        assert slots.tolist() == self.ref.match(key, namespace)
        return slots, handle

    def _insert(self, key: list[int], slots: torch.Tensor, namespace: int) -> int:
        n = self.cache.insert(key, slots, namespace)
        assert n == self.ref.insert(key, slots.tolist(), namespace)
        return n

    def _evict(self, num_tokens: int) -> None:
        free_before = Counter(self.pool.free_slots().tolist())
        unlocked_before = sum(1 for c in self.ref.locks.values() if c == 0)
        freed = self.cache.evict(num_tokens)
        removed = set(self.ref.slot) - set(tree_contents(self.cache))
        assert freed == len(removed)
        assert Counter(self.pool.free_slots().tolist()) - free_before == Counter(self.ref.slot[p] for p in removed)
        assert freed >= min(num_tokens, unlocked_before)
        assert all(self.ref.locks[p] == 0 for p in removed), "evicted a locked token"
        if removed:
            # LRU: nothing left evictable is older than the newest token evicted, and
            # evicting stopped soon enough: the tokens older than that were not enough.
            newest = max(self.ref.time[p] for p in removed)
            assert sum(1 for p in removed if self.ref.time[p] < newest) < num_tokens
        self.ref.remove(removed)
        if removed:
            for leaf in self.ref.leaves():
                assert self.ref.locks[leaf] > 0 or self.ref.time[leaf] >= newest, "evicted out of LRU order"

    def _alloc(self, n: int) -> torch.Tensor | None:
        short = n - self.pool.available_size()
        if short > 0:
            self._evict(short)
        return self.pool.alloc(n)

    # -- rules ---------------------------------------------------------------------------

    @rule(key=keys, namespace=namespaces)
    def match(self, key: list[int], namespace: int) -> None:
        self._match(key, namespace)

    @rule(key=keys, namespace=namespaces)
    def insert_fresh(self, key: list[int], namespace: int) -> None:
        slots = self._alloc(len(key))
        if slots is None:
            return
        n = self._insert(key, slots, namespace)
        self.pool.free(slots[:n])  # nothing was matched first, so all of these are duplicates

    @rule(num_tokens=st.integers(-1, 40))
    def evict(self, num_tokens: int) -> None:
        self._evict(num_tokens)

    @rule(key=keys, namespace=namespaces)
    def start_request(self, key: list[int], namespace: int) -> None:
        prefix, handle = self._match(key, namespace)
        self.cache.lock(handle)
        self.ref.lock(key[: len(prefix)], namespace, +1)
        own = self._alloc(len(key) - len(prefix))
        if own is None:
            self.cache.unlock(handle)
            self.ref.lock(key[: len(prefix)], namespace, -1)
            return
        self.requests[self.next_rid] = Request(key, namespace, prefix, handle, own)
        self.next_rid += 1

    def _pick(self, data: st.DataObject) -> int:
        return data.draw(st.sampled_from(sorted(self.requests)), label="request")

    @precondition(lambda self: self.requests)
    @rule(data=st.data(), extra=st.lists(tokens, min_size=1, max_size=4))
    def decode(self, data: st.DataObject, extra: list[int]) -> None:
        req = self.requests[self._pick(data)]
        slots = self._alloc(len(extra))
        if slots is not None:
            req.key = req.key + extra
            req.own = torch.cat((req.own, slots))

    @precondition(lambda self: self.requests)
    @rule(data=st.data(), cache_it=st.booleans())
    def finish_request(self, data: st.DataObject, cache_it: bool) -> None:
        req = self.requests.pop(self._pick(data))
        p = len(req.prefix)
        if cache_it:
            n = self._insert(req.key, torch.cat((req.prefix, req.own)), req.namespace)
            assert n >= p, "a locked prefix shrank"
            self.pool.free(req.own[: n - p])
        else:  # aborted: nothing cached
            self.pool.free(req.own)
        self.cache.unlock(req.handle)
        self.ref.lock(req.key[:p], req.namespace, -1)

    @precondition(lambda self: self.requests)
    @rule(data=st.data())
    def checkpoint_request(self, data: st.DataObject) -> None:
        """Cache a running request's tokens and move its lock onto them (chunked prefill)."""
        req = self.requests[self._pick(data)]
        p = len(req.prefix)
        n = self._insert(req.key, torch.cat((req.prefix, req.own)), req.namespace)
        self.pool.free(req.own[: n - p])
        prefix, handle = self._match(req.key, req.namespace)
        assert len(prefix) == len(req.key)
        self.cache.lock(handle)
        self.ref.lock(req.key, req.namespace, +1)
        self.cache.unlock(req.handle)
        self.ref.lock(req.key[:p], req.namespace, -1)
        req.prefix, req.handle, req.own = prefix, handle, req.own[:0]

    # -- invariants ----------------------------------------------------------------------

    @invariant()
    def tree_matches_reference(self) -> None:
        self.cache.check_integrity()
        tree = tree_contents(self.cache)
        assert {p: s for p, (s, _, _) in tree.items()} == self.ref.slot
        assert {p: c for p, (_, c, _) in tree.items()} == self.ref.locks
        # Access times: the two clocks differ, but must order every token the same way.
        tick_map: dict[int, int] = {}
        for p, (_, _, t) in tree.items():
            assert tick_map.setdefault(self.ref.time[p], t) == t
        tree_ticks = [tick_map[r] for r in sorted(tick_map)]
        assert tree_ticks == sorted(set(tree_ticks))

    @invariant()
    def sizes_agree(self) -> None:
        locked = sum(1 for c in self.ref.locks.values() if c > 0)
        assert self.cache.protected_size() == locked
        assert self.cache.evictable_size() == len(self.ref.slot) - locked
        assert self.cache.total_size() == len(self.ref.slot) == self.cache.all_slots().numel()
        assert sorted(self.cache.all_slots().tolist()) == sorted(self.ref.slot.values())

    @invariant()
    def locked_prefixes_stay_cached(self) -> None:
        for req in self.requests.values():
            p = len(req.prefix)
            expected = [self.ref.slot.get((req.namespace, *req.key[:i])) for i in range(1, p + 1)]
            assert req.prefix.tolist() == expected

    @invariant()
    def every_slot_accounted_for_once(self) -> None:
        held = [self.pool.free_slots(), self.cache.all_slots()] + [r.own for r in self.requests.values()]
        everything = torch.cat(held).tolist()
        assert sorted(everything) == list(range(1, POOL_SIZE + 1))

    def teardown(self) -> None:
        # Releasing every request leaves the whole cache evictable, and evicting it all
        # returns the pool to full.
        for rid in list(self.requests):
            req = self.requests.pop(rid)
            self.pool.free(req.own)
            self.cache.unlock(req.handle)
        assert self.cache.protected_size() == 0
        self.cache.evict(POOL_SIZE)
        assert self.cache.total_size() == 0
        assert self.pool.available_size() == POOL_SIZE


RadixCacheMachine.TestCase.settings = settings(
    max_examples=200,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestRadixCacheStateful = RadixCacheMachine.TestCase

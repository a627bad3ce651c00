"""The data-parallel router's pieces without any engine: the approximate radix tree checked
against a plain-Python model of what it must remember, the routing policies' promises, and the
standalone router's handling of workers that are down or die mid-response."""

from __future__ import annotations

import asyncio
import json
import random

import httpx
import pytest
from hypothesis import given, settings, strategies as st
from prometheus_client import generate_latest

from sglang_core.plugins import PluginManager
from sglang_core.router.options import RouterOptions
from sglang_core.router.policies import CacheAware, ReplicaLoad
from sglang_core.router.router import NoReplica, Router
from sglang_core.router.tree import ApproxRadixTree


class ModelTree:
    """The specification, element by element: each tenant holds a prefix-closed set of
    sequences, each stamped with the last insert through it; past the capacity, the tenant's
    least recently stamped leaf (a held sequence no held sequence extends) is dropped, one
    element at a time."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.held: dict[int, dict[tuple, int]] = {}
        self.clock = 0

    def insert(self, seq: list[int], tenant: int) -> None:
        self.clock += 1
        held = self.held.setdefault(tenant, {})
        for end in range(1, len(seq) + 1):
            held[tuple(seq[:end])] = self.clock
        while len(held) > self.capacity:
            extended = {p[:-1] for p in held}
            leaves = [p for p in held if p not in extended]
            oldest = min(held[p] for p in leaves)
            (victim,) = [p for p in leaves if held[p] == oldest]  # the order is never ambiguous
            del held[victim]

    def match(self, seq: list[int]) -> dict[int, int]:
        found = {}
        for tenant, held in self.held.items():
            length = max((n for n in range(1, len(seq) + 1) if tuple(seq[:n]) in held), default=0)
            if length:
                found[tenant] = length
        return found

    def remove_tenant(self, tenant: int) -> None:
        self.held.pop(tenant, None)

    def size(self, tenant: int) -> int:
        return len(self.held.get(tenant, {}))


# Requests repeat and share prefixes: each operation cuts one of a few base sequences.
bases = st.lists(st.lists(st.integers(0, 3), min_size=1, max_size=6), min_size=1, max_size=4)
operations = st.lists(st.tuples(st.sampled_from(["insert", "insert", "match", "remove"]), st.integers(0, 3),
                                st.integers(0, 6), st.integers(0, 2)), max_size=40)


@settings(max_examples=300, deadline=None)
@given(capacity=st.integers(1, 10), bases=bases, ops=operations)
def test_tree_matches_the_model(capacity, bases, ops):
    tree, model = ApproxRadixTree(capacity), ModelTree(capacity)
    seen: list[list[int]] = []
    for op, base, cut, tenant in ops:
        seq = bases[base % len(bases)][:cut]
        seen.append(seq)
        if op == "insert":
            tree.insert(seq, tenant)
            model.insert(seq, tenant)
        elif op == "remove":
            tree.remove_tenant(tenant)
            model.remove_tenant(tenant)
        for probe in seen:  # what was inserted earlier may have been evicted since
            assert tree.match(probe) == model.match(probe)
        for t in range(3):
            assert tree.size(t) == model.size(t) <= capacity


def test_a_prefix_sent_again_is_evicted_last():
    tree, model = ApproxRadixTree(4), ModelTree(4)
    for seq in ([1, 1], [2, 2], [1, 1], [3, 3]):  # [1, 1] is fresher than [2, 2] when [3, 3] needs room
        tree.insert(seq, 0)
        model.insert(seq, 0)
    assert tree.match([1, 1]) == model.match([1, 1]) == {0: 2}
    assert tree.match([2, 2]) == model.match([2, 2]) == {}


def test_tree_memory_stays_bounded_under_endless_distinct_prompts():
    tree = ApproxRadixTree(max_tokens=500)
    for i in range(3000):
        tree.insert([i % 7, i, i + 1, i * 3 % 11] * 10, tenant=i % 2)
    assert tree.size(0) <= 500 and tree.size(1) <= 500
    nodes = _count_nodes(tree._root)
    assert nodes <= 1000
    assert all(len(heap) <= 4 * nodes + 64 for heap in tree._leaves.values())


def _count_nodes(node) -> int:
    return sum(1 + _count_nodes(child) for child in node.children.values())


def test_bad_tree_size_names_the_field():
    with pytest.raises(ValueError, match="router_max_tree_tokens"):
        ApproxRadixTree(0)


def options(**overrides) -> RouterOptions:
    return RouterOptions(**overrides)


def make_router(replicas: int, **overrides) -> Router:
    # The built-in policies are the core's and load with any selection; one small plugin keeps
    # the other installed ones out of this test.
    return Router(replicas, options(**overrides), PluginManager(["llama"]))


def group_prompt(group: int, member: int) -> list[int]:
    return [1000 + group] * 40 + [member] * 5  # a long prefix shared by the group, a short tail


def test_cache_aware_keeps_a_prefix_group_on_one_replica_while_balanced():
    router = make_router(2, router_policy="cache_aware")
    homes: dict[int, set[int]] = {0: set(), 1: set(), 2: set(), 3: set()}
    held = []
    order = list(homes)
    for member in range(6):
        random.Random(member).shuffle(order)  # no fixed arrival pattern that alternation could follow
        for group in order:
            cm = router.routed(group_prompt(group, member))
            homes[group].add(cm.__enter__())
            held.append(cm)  # still in flight: loads grow evenly
    assert all(len(h) == 1 for h in homes.values()), homes
    assert {next(iter(h)) for h in homes.values()} == {0, 1}  # new prefixes spread over both
    for cm in held:
        cm.__exit__(None, None, None)
    assert [load.requests for load in router.loads] == [0, 0]


def test_imbalance_sends_a_cached_prompt_to_the_shortest_queue():
    prompt = group_prompt(0, 0)

    def choice(busy: int, idle: int) -> int:
        policy = CacheAware(2, options(router_balance_abs=3, router_balance_rel=1.5))
        policy.tree.insert(prompt, 0)
        return policy.choose(prompt, [ReplicaLoad(busy, 100), ReplicaLoad(idle, 10)], [0, 1])

    assert choice(4, 1) == 0  # 3 more: within the absolute margin
    assert choice(5, 1) == 1  # 4 more and 5 times as many: imbalanced
    assert choice(12, 8) == 0  # 4 more, but only 1.5 times as many


def test_cache_aware_ignores_a_short_match_below_the_threshold():
    policy = CacheAware(2, options(router_cache_threshold=0.5))
    policy.tree.insert([7] * 10, 0)
    loads = [ReplicaLoad(1, 10), ReplicaLoad(0, 0)]
    assert policy.choose([7] * 4 + [8] * 16, loads, [0, 1]) == 1  # 4 of 20 cached: shortest queue
    assert policy.choose([7] * 10 + [8] * 5, loads, [0, 1]) == 0  # 10 of 15 cached


@pytest.mark.parametrize("policy", ["round_robin", "shortest_queue", "cache_aware"])
def test_no_policy_routes_to_a_dead_replica(policy):
    router = make_router(3, router_policy=policy)
    router.mark_dead(1)
    chosen = []
    for i in range(9):
        with router.routed([i % 2] * 8) as replica:
            chosen.append(replica)
    assert 1 not in chosen and set(chosen) <= {0, 2}
    router.mark_dead(0)
    router.mark_dead(2)
    with pytest.raises(NoReplica):
        with router.routed([1]):
            pass


def test_round_robin_takes_turns_and_shortest_queue_counts_in_flight():
    rr = make_router(3, router_policy="round_robin")
    turns = []
    for _ in range(6):
        with rr.routed([5]) as replica:
            turns.append(replica)
    assert turns == [0, 1, 2, 0, 1, 2]
    sq = make_router(2, router_policy="shortest_queue")
    long_request = sq.routed([1] * 50)
    assert long_request.__enter__() == 0
    with sq.routed([2]) as replica:
        assert replica == 1
        with sq.routed([3]) as third:  # one each in flight: the fewer tokens win
            assert third == 1
    long_request.__exit__(None, None, None)


def test_unknown_policy_names_the_field():
    with pytest.raises(ValueError, match="router_policy: no policy named 'nope'.*cache_aware"):
        make_router(2, router_policy="nope")


def test_each_replica_gets_its_own_gpus(monkeypatch):
    import torch

    from sglang_core.router.data_parallel import replica_devices

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert replica_devices(2, 2, "auto") == [{"cuda_visible_devices": "0,1"}, {"cuda_visible_devices": "2,3"}]
    assert replica_devices(2, 1, "cpu") == [{}, {}]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5,6")  # indices of the GPUs this process may use
    assert replica_devices(3, 1, "cuda") == [{"cuda_visible_devices": d} for d in ("3", "5", "6")]
    with pytest.raises(ValueError, match="dp_size: 2 replicas of tp_size 2 need 4 GPUs; 3 visible"):
        replica_devices(2, 2, "cuda")


def test_routing_overhead_benchmark_runs():
    """benchmarks/dp_router.py --routing-overhead (the router's own cost, no engines) reports every
    policy, and the cache-aware one saw the whole load."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "benchmarks" / "dp_router.py"
    out = subprocess.run([sys.executable, str(script), "--routing-overhead", "--dp", "2", "--groups", "2",
                          "--per-group", "3", "--prefix-len", "8", "--question-len", "2"],
                         capture_output=True, text=True, timeout=120, check=True).stdout
    rows = [json.loads(line) for line in out.splitlines()]
    assert [r["policy"] for r in rows] == ["round_robin", "shortest_queue", "cache_aware"]
    assert all(r["requests"] == 6 and r["prompt_tokens"] == 10 and 0 < r["us_median"] <= r["us_p99"] for r in rows)


WORKER_UP, WORKER_DOWN = "http://up.test", "http://down.test"


def worker_transport(events_before_death: int | None) -> httpx.MockTransport:
    """Two workers as the router's HTTP client meets them: ``WORKER_DOWN`` refuses connections;
    ``WORKER_UP`` answers /health, and a /generate (or /v1/messages) stream of numbered events whose
    connection is cut after ``events_before_death`` of them (None: it ends normally) - what httpx
    raises when a worker process is killed mid-response."""
    async def events():
        for i in range(events_before_death if events_before_death is not None else 3):
            yield f'data: {{"text": "{i}"}}\n\n'.encode()
        if events_before_death is not None:
            raise httpx.RemoteProtocolError("peer closed connection without sending complete message body")
        yield b"data: [DONE]\n\n"

    async def whole():  # a streamed body, as the router reads every worker's (raw bytes, not pre-read)
        yield b'{"text": "whole"}'

    async def handle(request: httpx.Request) -> httpx.Response:
        if request.url.host == "down.test":
            raise httpx.ConnectError("connection refused", request=request)
        if request.url.path == "/health":
            return httpx.Response(200)
        if json.loads(request.content).get("stream"):
            return httpx.Response(200, headers={"content-type": "text/event-stream"}, content=events())
        return httpx.Response(200, headers={"content-type": "application/json"}, content=whole())

    return httpx.MockTransport(handle)


async def _through_router(events_before_death: int | None, *requests: tuple[str, dict]) -> tuple[list, object]:
    """The standalone router's app over ``worker_transport``'s workers (round robin, the down one
    listed first): each request's (status, body text), and the worker pool."""
    from sglang_core.router.standalone import StandaloneRouterSettings, build_router_app

    app = build_router_app(StandaloneRouterSettings(workers=[WORKER_DOWN, WORKER_UP], router_policy="round_robin",
                                                    plugins=["llama"]))
    pool = app.state.pool
    pool.client = httpx.AsyncClient(transport=worker_transport(events_before_death))
    answers = []
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://router.test") as client:
        for path, body in requests:
            reply = await client.post(path, json=body)
            answers.append((reply.status_code, reply.text))
    return answers, pool


def test_standalone_router_skips_a_worker_down_at_start_and_reports_it():
    """No health check has run yet: round robin picks the down worker first; the router finds no
    connection, takes it out of routing and serves the request on the other worker."""
    answers, pool = asyncio.run(_through_router(None, ("/generate", {"text": "a"}), ("/generate", {"text": "b"})))
    assert answers == [(200, '{"text": "whole"}')] * 2
    assert pool.router.live == [False, True]
    metrics = generate_latest(pool.metrics.registry).decode()
    assert f'sglang_router_worker_up{{worker="{WORKER_DOWN}"}} 0.0' in metrics
    assert f'sglang_router_worker_errors_total{{worker="{WORKER_DOWN}"}} 1.0' in metrics


@pytest.mark.parametrize("path, ending", [
    ("/generate", 'data: {"error": {"message": "worker http://up.test failed mid-response'),
    ("/v1/messages", 'event: error\ndata: {"type": "error", "error": {"type": "api_error", "message": "worker '
                     'http://up.test failed mid-response'),
])
def test_standalone_router_ends_a_stream_whose_worker_died_with_an_error_event(path, ending):
    """The worker's events so far, then an error event in the route's API's shape (and [DONE]
    outside Anthropic's API); the worker leaves routing, so the next request finds no worker."""
    answers, pool = asyncio.run(_through_router(2, (path, {"text": "a", "stream": True}), (path, {"text": "b"})))
    (status, text), (status_after, text_after) = answers
    assert status == 200 and text.startswith('data: {"text": "0"}\n\ndata: {"text": "1"}\n\n'), text
    events = text.split("\n\n")
    assert ending in text and (events[-2] == "data: [DONE]") == (path == "/generate"), events[-3:]
    assert pool.router.live == [False, False]
    assert status_after == 503 and "no replica is running" in text_after

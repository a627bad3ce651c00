"""Waiting-queue order: longest cached prefix first, FCFS, and aging that prevents starvation."""

from __future__ import annotations

from sglang_core.request import Req
from sglang_core.sampling.params import SamplingParams
from sglang_core.scheduler.policy import order_waiting


def _req(rid: str, arrival: float) -> Req:
    return Req(rid=rid, origin_input_ids=[1, 2], sampling_params=SamplingParams(), arrival_time=arrival)


def test_lpm_orders_by_cached_prefix_ties_by_arrival():
    reqs = [_req("a", 1.0), _req("b", 2.0), _req("c", 3.0), _req("d", 4.0)]
    cached = {"a": 0, "b": 50, "c": 10, "d": 50}
    order = order_waiting(reqs, "lpm", lambda r: cached[r.rid], aging_s=100, now=5.0)
    assert [r.rid for r in order] == ["b", "d", "c", "a"]


def test_fcfs_is_arrival_order():
    reqs = [_req("late", 3.0), _req("early", 1.0), _req("mid", 2.0)]
    order = order_waiting(reqs, "fcfs", lambda r: 0, aging_s=100, now=5.0)
    assert [r.rid for r in order] == ["early", "mid", "late"]


def test_aged_requests_jump_ahead_of_the_policy():
    """A cache-cold request that waited past the aging limit comes before cache-hot newcomers."""
    cold = _req("cold", 0.0)
    hot = [_req(f"hot{i}", 9.0 + i * 0.1) for i in range(3)]
    order = order_waiting([*hot, cold], "lpm", lambda r: 0 if r is cold else 100, aging_s=5.0, now=10.0)
    assert order[0] is cold
    fresh = order_waiting([*hot, cold], "lpm", lambda r: 0 if r is cold else 100, aging_s=50.0, now=10.0)
    assert fresh[-1] is cold

"""Prometheus metrics of one server (its own registry, so several servers can share a process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class ServerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("sglang_requests", "HTTP requests by route and status code", ["route", "status"], registry=r)
        self.prompt_tokens = Counter("sglang_prompt_tokens", "prompt tokens of finished requests", registry=r)
        self.cached_tokens = Counter("sglang_cached_prompt_tokens", "prompt tokens served from the prefix cache", registry=r)
        self.generation_tokens = Counter("sglang_generation_tokens", "generated tokens", registry=r)
        self.ttft = Histogram("sglang_time_to_first_token_seconds", "time to first token", buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("sglang_inter_token_latency_seconds", "time between streamed outputs",
                             buckets=LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("sglang_e2e_request_latency_seconds", "request latency, arrival to finish",
                             buckets=LATENCY_BUCKETS, registry=r)
        self.running = Gauge("sglang_num_running_reqs", "requests in the running batch", registry=r)
        self.waiting = Gauge("sglang_num_waiting_reqs", "requests waiting for admission", registry=r)
        self.kv_usage = Gauge("sglang_kv_pool_usage", "fraction of KV slots in use (requests + cache)", registry=r)
        self.cache_hit_rate = Gauge("sglang_prefix_cache_hit_rate", "cached / total prompt tokens so far", registry=r)

        # One series per engine replica (several with --dp-size); the gauges above sum the live ones.
        self.replica_up = Gauge("sglang_replica_up", "1 while the replica's engine process runs", ["replica"], registry=r)
        self.replica_running = Gauge("sglang_replica_num_running_reqs", "requests in the replica's running batch",
                                     ["replica"], registry=r)
        self.replica_waiting = Gauge("sglang_replica_num_waiting_reqs", "requests waiting on the replica",
                                     ["replica"], registry=r)
        self.replica_kv_usage = Gauge("sglang_replica_kv_pool_usage", "fraction of the replica's KV slots in use",
                                      ["replica"], registry=r)

    def update_engine_gauges(self, reports: list[dict[str, int] | None]) -> None:
        """From each replica's memory report (None: the replica is dead)."""
        live = [r for r in reports if r is not None]
        self.running.set(sum(r["running"] for r in live))
        self.waiting.set(sum(r["waiting"] for r in live))
        self.kv_usage.set(_usage(sum(r["kv_free"] for r in live), sum(r["kv_pool_size"] for r in live)))
        for index, report in enumerate(reports):
            label = str(index)
            self.replica_up.labels(label).set(report is not None)
            if report is not None:
                self.replica_running.labels(label).set(report["running"])
                self.replica_waiting.labels(label).set(report["waiting"])
                self.replica_kv_usage.labels(label).set(_usage(report["kv_free"], report["kv_pool_size"]))
        prompt = self.prompt_tokens._value.get()
        self.cache_hit_rate.set(self.cached_tokens._value.get() / prompt if prompt else 0.0)


def _usage(free: int, size: int) -> float:
    return 1 - free / max(size, 1)

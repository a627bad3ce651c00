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

    def update_engine_gauges(self, report: dict[str, int]) -> None:
        self.running.set(report["running"])
        self.waiting.set(report["waiting"])
        self.kv_usage.set(1 - report["kv_free"] / max(report["kv_pool_size"], 1))
        prompt = self.prompt_tokens._value.get()
        self.cache_hit_rate.set(self.cached_tokens._value.get() / prompt if prompt else 0.0)

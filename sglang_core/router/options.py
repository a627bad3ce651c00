"""The router's settings, shared by ``sglang-core serve --dp-size N`` and ``sglang-core router``."""

from __future__ import annotations

from pydantic import Field

from sglang_core.config import CliSettings


class RouterOptions(CliSettings):
    router_policy: str = Field("cache_aware", json_schema_extra={"flags": ["--policy"]}, description="how requests are spread over replicas: round_robin, shortest_queue, cache_aware, or a plugin's policy")
    router_balance_abs: int = Field(32, ge=0, description="cache_aware: the load counts as imbalanced (requests then go to the shortest queue) when the busiest replica has more than this many requests in flight beyond the idlest's, and more than --router-balance-rel times as many")
    router_balance_rel: float = Field(1.5, ge=1, description="cache_aware: the other half of the imbalance test (see --router-balance-abs): the busiest replica has more than this many times the idlest's requests in flight")
    router_cache_threshold: float = Field(0.5, ge=0, le=1, description="cache_aware: follow the longest cached prefix only when it covers at least this fraction of the prompt (else the shortest queue)")
    router_max_tree_tokens: int = Field(2**22, gt=0, description="cache_aware: most prompt tokens (characters for the standalone router) remembered per replica; least recently used ones are forgotten first")

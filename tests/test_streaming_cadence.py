"""Streaming cadence (issue 23): the server flushes each engine step's tokens to the stream at
once, with no batching delay. Each streamed ``/generate`` event carries ``meta_info.produced_at``,
the wall-clock time the engine handed its token out; the client, on the same host, compares it
with the event's arrival.

The test plugin ``tests/pace_plugin.py`` (installed in conftest's ``tiny_server``) makes every
step of the test's request last 150 ms, so the engine's cadence is known: each token must reach
the client before the engine has produced the next, and in an event of its own.
"""

from __future__ import annotations

import json
import time

import httpx

STEP_S = 0.15


def stream_events(url: str, body: dict) -> list[tuple[float, dict]]:
    """Each SSE event of a streamed ``/generate`` with its wall-clock arrival time."""
    events = []
    with httpx.stream("POST", f"{url}/generate", json=body, timeout=60) as resp:
        assert resp.status_code == 200
        for line in resp.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                events.append((time.time(), json.loads(line[6:])))
    return events


def test_each_steps_token_reaches_the_client_before_the_next_step(tiny_server):
    n = 6
    events = stream_events(tiny_server.url, {"input_ids": [5, 6, 7, 8, 9], "stream": True, "sampling_params": {
        "max_new_tokens": n, "ignore_eos": True, "temperature": 0, "custom_params": {"pace_s": STEP_S}}})
    assert [e["meta_info"]["completion_tokens"] for _, e in events] == list(range(1, n + 1)), \
        "one event per step: no token held back to go out with the next"
    produced = [e["meta_info"]["produced_at"] for _, e in events]
    arrived = [t for t, _ in events]
    assert all(b - a >= STEP_S for a, b in zip(produced, produced[1:])), "the plugin paces the engine"
    assert all(p <= a for p, a in zip(produced, arrived))
    for k in range(n - 1):
        assert arrived[k] < produced[k + 1], f"token {k + 1} reached the client only after token {k + 2} was produced"

"""The token budget of a step that carries prefill (``--max-step-tokens``, ``--target-step-ms``).

The running requests' decodes take their share of the budget first and prefill chunks fill the
rest, so a long prompt stalls the decodes by one bounded step at a time instead of by whole
prefill steps. With a latency target the budget follows measured step times: a least-squares
line, time = a + b * tokens, over the recent steps that carried prefill, solved for the tokens
that take the target. The target is fixed (``--target-step-ms``) or a multiple of the running
batch's plain decode step (``--target-step-ratio``): the stall a prefill step adds to every
stream then stays a bounded factor of its usual inter-token gap, small batch or large.

Under saturation bounded steps cost throughput and buy nothing: requests wait in the queue far
past any TTFT target anyway. With ``--max-queue-prefill-ms`` the budget grows when the queue's
prompts would take longer than that to prefill in steps of the budget (by the same fitted line),
to the size that clears them in that time, at most the decodes plus ``--chunked-prefill-size``:
steps are bounded while the queue is short and as large as an unbounded schedule's when it is not.
"""

from __future__ import annotations

import math
import statistics
from collections import deque

from sglang_core.config import EngineSettings

# A target below a step's fixed cost would leave no room for prefill; this floor keeps prompts
# moving (the fixed cap, when smaller, still wins). The fitted line's knee is a second floor.
MIN_STEP_TOKENS = 32
# Recent steps the cost line is fitted to: enough to span several step sizes, few enough to
# follow a change of load (longer contexts make the same tokens cost more).
COST_WINDOW = 64
# Step sizes spanning less than this share of their mean fix no slope: timing noise over nearly
# equal sizes can give any slope, and a slope too small would allow steps far past the target.
MIN_SIZE_SPREAD = 0.25
# Plain decode steps whose median is "a decode step" for --target-step-ratio: a median, so the odd
# slow step (a new graph size, a host hiccup) does not move the target.
DECODE_WINDOW = 32


class StepCostModel:
    """Step time as a + b * tokens, fitted by least squares to the latest ``window`` steps."""

    def __init__(self, window: int = COST_WINDOW):
        self.samples: deque[tuple[int, float]] = deque(maxlen=window)
        self._knee = 0  # the last knee a sloped line gave (``knee``)

    def record(self, tokens: int, seconds: float) -> None:
        self.samples.append((tokens, seconds))

    def fit(self) -> tuple[float, float] | None:
        """(a seconds, b seconds per token), or None before any step. Steps all of about one
        size (a queue that keeps every step full) fix no slope: the line then goes through the
        origin, counting the fixed cost per token, which under-estimates the budget, so the next
        steps are smaller and fix the line."""
        n = len(self.samples)
        if n == 0:
            return None
        sizes = [x for x, _ in self.samples]
        mean_x = sum(sizes) / n
        mean_y = sum(y for _, y in self.samples) / n
        if not self._sloped():
            return 0.0, mean_y / mean_x
        sxx = sum((x - mean_x) ** 2 for x in sizes)
        b = sum((x - mean_x) * (y - mean_y) for x, y in self.samples) / sxx
        return mean_y - b * mean_x, b

    def _sloped(self) -> bool:
        """Whether the steps' sizes spread enough to fix a slope (MIN_SIZE_SPREAD)."""
        sizes = [x for x, _ in self.samples]
        return max(sizes) - min(sizes) >= MIN_SIZE_SPREAD * sum(sizes) / len(sizes)

    def tokens_within(self, seconds: float) -> int | None:
        """The most tokens a step may hold to take ``seconds`` by the fitted line; None without a
        line, or when time does not grow with tokens (nothing to bound)."""
        line = self.fit()
        if line is None or line[1] <= 0:
            return None
        a, b = line
        return int((seconds - a) / b)

    def knee(self) -> int:
        """The step size whose per-token cost equals its fixed cost (a / b; 0 without a fixed cost
        or a slope). A smaller step spends most of its time on the fixed cost: shrinking it cuts
        the stall little and prefill throughput a lot (an eager pass of Llama-8B on an H100 costs
        ~17 ms of launches at any size: budgets of 32 tokens admitted 1.9 of 8 requests a second)."""
        line = self.fit()
        if line is None:
            return 0
        # Steps held at the knee are all of one size and fix no line: the last knee stands.
        if self._sloped():
            self._knee = int(line[0] / line[1]) if line[0] > 0 and line[1] > 0 else 0
        return self._knee


class StepBudget:
    """How many tokens (decodes + prefill) the next step carrying prefill may hold."""

    def __init__(self, settings: EngineSettings):
        self.cap = settings.max_step_tokens or settings.chunked_prefill_size
        self.target_s = settings.target_step_ms / 1000 if settings.target_step_ms is not None else None
        self.target_ratio = settings.target_step_ratio
        self.queue_s = settings.max_queue_prefill_ms / 1000 if settings.max_queue_prefill_ms is not None else None
        self.chunk_cap = settings.chunked_prefill_size
        self.costs = StepCostModel()
        self.decode_times: deque[float] = deque(maxlen=DECODE_WINDOW)
        self._last_decode_end: float | None = None

    @property
    def timed(self) -> bool:
        """Whether steps are timed: the budget follows a time target."""
        return any(v is not None for v in (self.target_s, self.target_ratio, self.queue_s))

    def target(self) -> float | None:
        """The time a step carrying prefill should take; None before anything fixes one."""
        if self.target_ratio is None:
            return self.target_s
        return self.target_ratio * statistics.median(self.decode_times) if self.decode_times else None

    def tokens(self, decodes: int = 0, queued: int = 0) -> int:
        """The budget of the next step, which carries ``decodes`` running decodes while ``queued``
        prompt tokens wait to be prefilled (``--max-queue-prefill-ms`` grows it by them)."""
        bounded = self._bounded()
        if self.queue_s is None or queued == 0:
            return bounded
        return max(bounded, min(decodes + self.chunk_cap, self._clearing(decodes, queued)))

    def _bounded(self) -> int:
        target = self.target()
        fitted = self.costs.tokens_within(target) if target is not None else None
        if fitted is None:
            return self.cap
        return min(self.cap, max(MIN_STEP_TOKENS, self.costs.knee(), fitted))

    def _clearing(self, decodes: int, queued: int) -> float:
        """The smallest budget B whose steps prefill ``queued`` tokens within the queue target T:
        queued / (B - decodes) steps of a + b * B seconds each, so B >= (queued a + T decodes) /
        (T - queued b); no line yet: 0 (nothing known to grow by); no such B: unbounded."""
        line = self.costs.fit()
        if line is None:
            return 0
        a, b = line
        room = self.queue_s - queued * b
        if room <= 0:
            return math.inf
        return math.ceil((queued * a + self.queue_s * decodes) / room)

    def record(self, tokens: int, seconds: float) -> None:
        """A step carrying prefill took ``seconds`` for ``tokens`` (decodes included)."""
        if self.timed:
            self.costs.record(tokens, seconds)
        self._last_decode_end = None  # the gap up to the next decode step is not a decode step's

    def decoded(self, now: float) -> None:
        """A plain decode step ended at ``now`` (``time.perf_counter``): the gap since the one
        before, with no prefill between, is one decode step of the running batch."""
        if self.target_ratio is None:
            return
        if self._last_decode_end is not None:
            self.decode_times.append(now - self._last_decode_end)
        self._last_decode_end = now

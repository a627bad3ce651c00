"""The outlines backend's number bounds as regexes (``numbers.number_regex``), checked against
Python's own arithmetic: for random integer ranges (inclusive, exclusive, half-open, wide,
negative, with ``multipleOf``) every integer near either end or zero, and random ones across and past the range, matches iff it
is in range;
for decimal bounds, sampled decimals near each bound match iff they are in range."""

from __future__ import annotations

import random
import re
from decimal import Decimal

import pytest

from sglang_plugins.grammar.outlines.numbers import Bound, number_regex


def in_bounds(value: Decimal, low: Bound | None, high: Bound | None, step: Decimal | None) -> bool:
    return ((low is None or value > low.value or (value == low.value and not low.exclusive))
            and (high is None or value < high.value or (value == high.value and not high.exclusive))
            and (step is None or value % step == 0))


def random_bound(rng: random.Random, value: int | Decimal | None) -> Bound | None:
    return None if value is None else Bound(Decimal(value), rng.random() < 0.4)


@pytest.mark.parametrize("seed", range(4))
def test_integer_ranges_match_exactly_the_integers_in_range(seed):
    rng = random.Random(seed)
    checked = 0
    for _ in range(40):
        low = rng.choice([None, rng.randint(-10**6, 10**6), rng.randint(-120, 120), 0])
        high = rng.choice([None, (low or 0) + rng.randint(0, 10 ** rng.randint(0, 7))])
        step = rng.choice([None, None, 2, 5, 25, 1000, 7])
        lower, upper = random_bound(rng, low), random_bound(rng, high)
        try:
            pattern = re.compile(number_regex(lower, upper, None if step is None else Decimal(step), True))
        except ValueError:  # an empty range, or 7 over an unbounded one: refused, checked below
            continue
        ends = [v for v in (low, high) if v is not None] or [0]
        near = {n for end in ends for n in range(end - 300, end + 300)}
        inside = {rng.randint(min(ends) - 10**7, max(ends) + 10**7) for _ in range(300)}
        for n in sorted(near | inside | set(range(-300, 300))):
            expected = in_bounds(Decimal(n), lower, upper, None if step is None else Decimal(step))
            assert bool(pattern.fullmatch(str(n))) == expected, (lower, upper, step, n)
        checked += 1
    assert checked >= 25


def test_refusals_say_why():
    with pytest.raises(ValueError, match="no integer lies"):
        number_regex(Bound(Decimal(5), False), Bound(Decimal(5), True), None, True)
    with pytest.raises(ValueError, match="multipleOf 7"):
        number_regex(Bound(Decimal(0), False), None, Decimal(7), True)
    with pytest.raises(ValueError, match="multipleOf 0.3"):
        number_regex(Bound(Decimal(0), False), None, Decimal("0.3"), False)


DECIMALS = ["0", "-1.5", "2.25", "0.001", "0.01", "-0.5", "100", "-3", "12.345", "0.1", "-0.0625", "7", "999.999"]
STEPS = [None, None, "0.25", "0.125", "0.5", "0.01", "0.3", "2", "0.0625"]


@pytest.mark.parametrize("seed", range(4))
def test_number_bounds_match_sampled_decimals(seed):
    """Decimals at, just inside and just outside each bound (several digit counts, trailing
    zeros included): the canonical text matches iff in range; no text outside matches."""
    rng = random.Random(100 + seed)
    checked = 0
    for _ in range(60):
        low, high = rng.choice([None, *DECIMALS]), rng.choice([None, *DECIMALS])
        step = rng.choice(STEPS)
        lower, upper = random_bound(rng, low), random_bound(rng, high)
        step_value = None if step is None else Decimal(step)
        try:
            pattern = re.compile(number_regex(lower, upper, step_value, False))
        except ValueError:
            continue
        samples = {Decimal(b) + Decimal(k).scaleb(-scale) for b in (low, high, "0") if b is not None
                   for k in range(-25, 26) for scale in range(5)}
        for value in samples:
            text = "0" if value == 0 else format(value.normalize(), "f")
            expected = in_bounds(Decimal(text), lower, upper, step_value)
            assert bool(pattern.fullmatch(text)) == expected, (lower, upper, step, text)
            for variant in (text + ("0" if "." in text else ".0"), "-0", "-0.0", text + "e1"):
                if pattern.fullmatch(variant):  # a non-canonical spelling may match only if in range
                    assert in_bounds(Decimal(variant), lower, upper, step_value), (lower, upper, step, variant)
        checked += 1
    assert checked >= 20

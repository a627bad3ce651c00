"""JSON numbers within bounds (and on a ``multipleOf`` grid) as regexes.

outlines-core writes any integer or number for ``"type": "integer"`` / ``"number"``; this spells
the bounds out digit by digit instead, so a bounded number is an automaton like any other: an
integer range splits by digit count, and within a count by the first digit that differs from a
bound; a fraction is compared to a bound's fraction digits from the left. Outputs are plain
decimals (no exponent, no ``-0``): a subset of what the schema allows, never more.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from decimal import Decimal

# An enumerated grid (a multipleOf that no fixed set of last digits decides) stops here.
MAX_ENUMERATED = 1000
# A multipleOf decided by the last digits: at most this many allowed endings.
MAX_ENDINGS = 200


@dataclass(frozen=True)
class Bound:
    value: Decimal
    exclusive: bool


def number_regex(lower: Bound | None, upper: Bound | None, multiple_of: Decimal | None, integer: bool) -> str:
    """A regex for the JSON numbers in the bounds (and multiples of ``multiple_of``), integers
    only when ``integer``. Raises ``ValueError`` when nothing is in range, or for a grid that
    cannot be spelled out (a step like 0.3 over an unbounded range)."""
    if multiple_of is not None and multiple_of <= 0:
        raise ValueError(f"multipleOf must be > 0, got {multiple_of}")
    if integer or (multiple_of is not None and multiple_of == multiple_of.to_integral_value()):
        step = 1 if multiple_of is None else _integer_step(multiple_of)
        low = None if lower is None else _first_integer(lower)
        high = None if upper is None else -_first_integer(Bound(-upper.value, upper.exclusive))
        if low is not None and high is not None and low > high:
            raise ValueError(f"no integer lies in [{low}, {high}]")
        return _alternatives(_signed(low, high, lambda a, b: _naturals(a, b, step)))
    if lower is not None and upper is not None and (
            lower.value > upper.value or (lower.value == upper.value and (lower.exclusive or upper.exclusive))):
        raise ValueError(f"no number lies between {lower.value} and {upper.value}")
    fractions = None if multiple_of is None else _fraction_grid(multiple_of, lower, upper)
    if isinstance(fractions, str):  # an enumerated grid
        return fractions
    alternatives = []
    for sign, low, high in _magnitude_sides(lower, upper):
        alternatives += [sign + a for a in _magnitudes(low, high, fractions)]
    if not alternatives:
        raise ValueError("no number lies in the bounds")
    return _alternatives(alternatives)


def _integer_step(multiple_of: Decimal) -> int:
    """The integer multiples of ``multiple_of`` are the multiples of this integer."""
    numerator, denominator = multiple_of.as_integer_ratio()
    return numerator // math.gcd(numerator, denominator)


def _first_integer(bound: Bound) -> int:
    """The least integer satisfying a lower bound."""
    floor = math.floor(bound.value)
    return floor + 1 if bound.exclusive or floor < bound.value else floor


def _signed(low: int | None, high: int | None, naturals) -> list[str]:
    """Alternatives for the integers in [low, high]: ``naturals(a, b)`` writes those in [a, b]
    (a >= 0, b None: no upper end); negatives are a minus sign and their magnitude."""
    out = []
    if low is None or low < 0:
        top = -1 if high is None or high >= 0 else high
        out += ["-" + a for a in naturals(-top, None if low is None else -low)]
    if high is None or high >= 0:
        out += naturals(max(low or 0, 0), high)
    return out


def _naturals(a: int, b: int | None, step: int) -> list[str]:
    """The multiples of ``step`` in [a, b] written in decimal (b None: unbounded)."""
    if b is not None and a > b:
        return []
    if step == 1:
        return _digit_range(a, b)
    digits = next((k for k in range(1, 7) if 10 ** k % step == 0), None)
    if digits is None or 10 ** digits // step > MAX_ENDINGS:
        if b is None or (b - a) // step > MAX_ENUMERATED:
            raise ValueError(f"multipleOf {step} over a range this wide cannot be written as a regex")
        return [str(n) for n in range(-(-a // step) * step, b + 1, step)]
    # A multiple of a divisor of 10**k is decided by its last k digits.
    block = 10 ** digits
    endings = list(range(0, block, step))
    out = [str(r) for r in endings if a <= r <= (block - 1 if b is None else min(b, block - 1))]
    full_low = max(1, -(-a // block))
    full_high = None if b is None else (b + 1) // block - 1
    if full_high is None or full_low <= full_high:
        out += [p + _group([f"{r:0{digits}d}" for r in endings]) for p in _digit_range(full_low, full_high)]
    for prefix in sorted({a // block} | ({b // block} if b is not None else set())):
        if prefix >= 1 and not (prefix >= full_low and (full_high is None or prefix <= full_high)):
            kept = [f"{r:0{digits}d}" for r in endings if a <= prefix * block + r and (b is None or prefix * block + r <= b)]
            if kept:
                out.append(str(prefix) + _group(kept))
    return out


def _digit_range(a: int, b: int | None) -> list[str]:
    """Alternatives matching exactly the decimal integers in [a, b] (b None: unbounded)."""
    out = []
    if a == 0:
        out.append("0")
        a = 1
    if b is not None and a > b:
        return out
    first = len(str(a))
    last = first if b is None else len(str(b))
    for length in range(first, last + 1):
        low = str(a) if length == first else "1" + "0" * (length - 1)
        high = str(b) if b is not None and length == last else "9" * length
        out += _same_length(low, high)
    if b is None:
        out.append(f"[1-9][0-9]{{{first},}}")
    return out


def _same_length(low: str, high: str) -> list[str]:
    """Digit strings of this length from ``low`` to ``high`` (inclusive, as numbers)."""
    if not low:
        return [""]
    if low[0] == high[0]:
        return [low[0] + _group(_same_length(low[1:], high[1:]))]
    rest = len(low) - 1
    first, last = int(low[0]), int(high[0])
    out = []
    if low[1:] != "0" * rest:
        out.append(low[0] + _group(_same_length(low[1:], "9" * rest)))
        first += 1
    tail = []
    if high[1:] != "9" * rest:
        tail.append(high[0] + _group(_same_length("0" * rest, high[1:])))
        last -= 1
    if first <= last:
        out.append(_digit_class(range(first, last + 1)) + ("[0-9]" if rest == 1 else f"[0-9]{{{rest}}}" if rest else ""))
    return out + tail


# ---- fractions -----------------------------------------------------------------------------------

def _magnitude_sides(lower: Bound | None, upper: Bound | None):
    """(sign, lower, upper) for the non-negative numbers and for the negative ones written as a
    minus sign and a magnitude (> 0), each side skipped when empty."""
    zero = Decimal(0)
    if lower is None or lower.value < 0:
        low = Bound(zero, True) if upper is None or upper.value >= 0 else Bound(-upper.value, upper.exclusive)
        high = None if lower is None else Bound(-lower.value, lower.exclusive)
        yield "-", low, high
    if upper is None or upper.value > 0 or (upper.value == 0 and not upper.exclusive):
        yield "", lower if lower is not None and lower.value >= 0 else Bound(zero, False), upper


def _split(value: Decimal) -> tuple[int, str]:
    """Integer part and fraction digits (no trailing zeros) of a non-negative decimal."""
    whole = math.floor(value)
    digits = format(value - whole, "f").partition(".")[2].rstrip("0")
    return whole, digits


def _magnitudes(low: Bound, high: Bound | None, fractions: list[Decimal] | None) -> list[str]:
    """Alternatives for the non-negative decimals in [low, high] (bounds maybe exclusive);
    ``fractions``: the only fraction values allowed (a grid), None: any."""
    if high is not None and (low.value > high.value or (low.value == high.value and (low.exclusive or high.exclusive))):
        return []
    low_whole, low_digits = _split(low.value)
    high_whole, high_digits = (None, "") if high is None else _split(high.value)
    low_fraction = (low_digits, low.exclusive)
    high_fraction = None if high is None else (high_digits, high.exclusive)
    if high_whole == low_whole:
        pieces = [(str(low_whole), low_fraction, high_fraction)]
    else:
        pieces = [(str(low_whole), low_fraction, None)]
        middle_high = None if high_whole is None else high_whole - 1
        if middle_high is None or low_whole + 1 <= middle_high:
            pieces += [(w, None, None) for w in _digit_range(low_whole + 1, middle_high)]
        if high_whole is not None:
            pieces.append((str(high_whole), None, high_fraction))
    out = []
    for whole, lo, hi in pieces:
        alternatives = _fraction_alternatives(lo, hi) if fractions is None else _grid_alternatives(fractions, lo, hi)
        nonempty = [a for a in alternatives if a]
        if not nonempty:
            if "" in alternatives:
                out.append(whole)
            continue
        tail = r"\." + _group(nonempty)
        out.append(whole + (f"(?:{tail})?" if "" in alternatives else tail))
    return out


def _fraction_alternatives(low: tuple[str, bool] | None, high: tuple[str, bool] | None) -> list[str]:
    """Alternatives for the fraction digit strings d with ``low`` <= 0.d <= ``high``; a bound is
    (digits without trailing zeros, exclusive) or None. "" stands for no digits (the value 0)."""
    if low is not None and low == ("", False):
        low = None  # >= 0 holds for every fraction
    if low is None and high is None:
        return ["", "[0-9]+"]
    if high is not None and high[0] == "":  # at most 0: only zeros, and only if 0 is allowed
        return ["", "0+"] if low is None and not high[1] else []
    if low is not None and low[0] == "" and high is None:  # above 0: some digit is not 0
        return ["0*[1-9][0-9]*"]
    by_rest: dict[tuple, list[int]] = {}
    for digit in range(10):
        rest_low = rest_high = None
        if low is not None:
            bound = int(low[0][0]) if low[0] else 0
            if digit < bound:
                continue
            if digit == bound:
                rest_low = (low[0][1:], low[1])
        if high is not None:
            bound = int(high[0][0])
            if digit > bound:
                continue
            if digit == bound:
                rest_high = (high[0][1:], high[1])
        by_rest.setdefault((rest_low, rest_high), []).append(digit)
    out = [""] if low is None else []  # no digits: 0, and high > 0 here
    for (rest_low, rest_high), digits in by_rest.items():
        rest = _fraction_alternatives(rest_low, rest_high)
        if rest:
            out.append(_digit_class(digits) + _optional_group(rest))
    return out


def _fraction_grid(multiple_of: Decimal, lower: Bound | None, upper: Bound | None) -> list[Decimal] | str:
    """The fraction values a multiple of a non-integer ``multiple_of`` may have, when they do not
    depend on the integer part (its denominator's digits decide it); else the whole grid of a
    bounded range as one regex."""
    sign, digits, exponent = multiple_of.as_tuple()
    places = max(0, -exponent)
    scaled = int(multiple_of.scaleb(places))
    if 10 ** places % scaled == 0 and 10 ** places // scaled <= MAX_ENDINGS:
        return [Decimal(r).scaleb(-places) for r in range(0, 10 ** places, scaled)]
    if lower is None or upper is None:
        raise ValueError(f"multipleOf {multiple_of} over an unbounded range cannot be written as a regex")
    first = math.ceil(lower.value / multiple_of)
    last = math.floor(upper.value / multiple_of)
    if last - first > MAX_ENUMERATED:
        raise ValueError(f"multipleOf {multiple_of}: more than {MAX_ENUMERATED} values in range")
    values = [n * multiple_of for n in range(first, last + 1)]
    values = [v for v in values if (v > lower.value or (v == lower.value and not lower.exclusive))
              and (v < upper.value or (v == upper.value and not upper.exclusive))]
    if not values:
        raise ValueError(f"no multiple of {multiple_of} lies in the bounds")
    return _alternatives([_decimal_text(v) for v in values])


def _decimal_text(value: Decimal) -> str:
    text = format(value.normalize(), "f")
    return ("-" + text[1:] if text.startswith("-") else text).replace(".", r"\.") if value != 0 else "0"


def _grid_alternatives(fractions: list[Decimal], low: tuple[str, bool] | None,
                       high: tuple[str, bool] | None) -> list[str]:
    """The grid's fraction digit strings within the bounds (as ``_fraction_alternatives``)."""
    def value(bound: tuple[str, bool]) -> Decimal:
        return Decimal("0." + bound[0]) if bound[0] else Decimal(0)

    out = []
    for f in fractions:
        if low is not None and (f < value(low) or (f == value(low) and low[1])):
            continue
        if high is not None and (f > value(high) or (f == value(high) and high[1])):
            continue
        out.append(format(f, "f").partition(".")[2].rstrip("0"))
    return out


# ---- regex text ----------------------------------------------------------------------------------

def _digit_class(digits) -> str:
    digits = sorted(digits)
    if len(digits) == 1:
        return str(digits[0])
    if digits == list(range(digits[0], digits[-1] + 1)):
        return f"[{digits[0]}-{digits[-1]}]"
    return "[" + "".join(map(str, digits)) + "]"


def _group(alternatives: list[str]) -> str:
    if len(alternatives) == 1 and "|" not in alternatives[0]:
        return alternatives[0]
    return "(?:" + "|".join(alternatives) + ")"


def _optional_group(alternatives: list[str]) -> str:
    """The alternatives, "" among them meaning nothing at all."""
    nonempty = [a for a in alternatives if a]
    if len(nonempty) == len(alternatives):
        return _group(nonempty)
    return "" if not nonempty else "(?:" + "|".join(nonempty) + ")?"


def _alternatives(alternatives: list[str]) -> str:
    if not alternatives:
        raise ValueError("no number lies in the bounds")
    return "(?:" + "|".join(alternatives) + ")"

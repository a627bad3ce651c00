"""Per-request sampling parameters, with SGLang's field names and defaults."""

from __future__ import annotations

import json
import math
import numbers
import re
from dataclasses import dataclass, field, fields
from typing import Any, Callable

# Below this temperature dividing the logits would overflow float32, so treat it as greedy.
GREEDY_TEMPERATURE = 1e-6
# The sampler works in float32. A temperature past its range flattens the distribution to uniform
# over the unmasked tokens as well as infinity would, without a masked -inf / inf = NaN.
FLOAT32_MAX = 3.4028234663852886e38
# Repetition penalties are clamped into this range: at 1e-6 a seen token's positive logit is
# multiplied a million-fold, at 1e6 a negative one, which is already "always" / "never" for any
# real logit, and every logit stays finite through the penalty and a 1e-6 temperature (a logit
# of 0 times an infinite penalty would be NaN, a positive one over a zero penalty inf).
REPETITION_PENALTY_RANGE = (1e-6, 1e6)
# OpenAI's range for logit_bias; vLLM clamps to it too.
LOGIT_BIAS_LIMIT = 100.0
# The sampling params that constrain the output, each naming its kind of constraint.
CONSTRAINT_KINDS = ("regex", "json_schema", "ebnf")

_TOKEN_ID_KEY = re.compile(r"-?\d+")


INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


def _integer(name: str, value: Any) -> int:
    # bool is an int subclass; `"top_k": true` is a client bug, not 1.
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name}: expected an integer, got {value!r}")
    return int(value)


def _int(name: str, value: Any) -> int:
    value = _integer(name, value)
    # Every integer crosses to the engine process and into tensors as int64.
    if not INT64_MIN <= value <= INT64_MAX:
        raise ValueError(f"{name}: {value} is outside the 64-bit integer range")
    return value


def choice_seed(seed: int | None, choice: int) -> int | None:
    """The seed of choice ``choice`` of an ``n > 1`` request: ``seed + choice``, wrapped into the
    int64 range. The sampler takes every seed mod 2**64, so wrapping keeps each stream, and seed
    2**63 - 1 has distinct later choices too."""
    return None if seed is None else (seed + choice - INT64_MIN) % 2**64 + INT64_MIN


def _float(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name}: expected a number, got {value!r}")
    return float(value)


def _bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{name}: expected true or false, got {value!r}")
    return value


def _optional(coerce: Callable[[str, Any], Any]) -> Callable[[str, Any], Any]:
    return lambda name, value: None if value is None else coerce(name, value)


def _stop(name: str, value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, (list, tuple)) and all(isinstance(s, str) for s in value):
        return list(value)
    raise ValueError(f"{name}: expected a string or a list of strings, got {value!r}")


def _token_ids(name: str, value: Any) -> list[int]:
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"{name}: expected a list of token ids, got {value!r}")
    return [_int(name, v) for v in value]


def _logit_bias(name: str, value: Any) -> dict[int, float]:
    if not isinstance(value, dict):
        raise ValueError(f"{name}: expected a mapping of token id to bias, got {value!r}")
    bias = {}
    for key, val in value.items():
        # OpenAI clients send JSON, whose object keys are always strings.
        if isinstance(key, str) and _TOKEN_ID_KEY.fullmatch(key):
            key = int(key)
        bias[_int(name, key)] = _float(name, val)
    return bias


def _dict(name: str, value: Any) -> dict:
    if not isinstance(value, dict):
        raise ValueError(f"{name}: expected a mapping, got {value!r}")
    return value


def _param(default: Any, coerce: Callable[[str, Any], Any]) -> Any:
    return field(default=default, metadata={"coerce": coerce})


def _text(name: str, value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{name}: expected a string, got {type(value).__name__}")
    return value


def _schema_text(name: str, value: Any) -> str:
    if isinstance(value, dict):
        return json.dumps(value)
    return _text(name, value)


@dataclass
class SamplingParams:
    """What to sample and when to stop. Types are checked (and coerced) at construction."""

    max_new_tokens: int = _param(128, _int)
    min_new_tokens: int = _param(0, _int)
    temperature: float = _param(1.0, _float)  # 0 = greedy
    top_p: float = _param(1.0, _float)
    top_k: int = _param(-1, _int)  # -1 = whole vocabulary
    min_p: float = _param(0.0, _float)
    frequency_penalty: float = _param(0.0, _float)
    presence_penalty: float = _param(0.0, _float)
    repetition_penalty: float = _param(1.0, _float)
    # A single string is accepted and normalised to a one-element list.
    stop: list[str] | str | None = _param(None, _stop)
    stop_token_ids: list[int] | None = _param(None, _optional(_token_ids))
    ignore_eos: bool = _param(False, _bool)
    skip_special_tokens: bool = _param(True, _bool)
    spaces_between_special_tokens: bool = _param(True, _bool)
    n: int = _param(1, _int)
    seed: int | None = _param(None, _optional(_int))  # any int64; the sampler takes it mod 2**64
    # Keys may be digit strings ("50256"), as OpenAI sends them; they become ints.
    logit_bias: dict[int, float] | None = _param(None, _optional(_logit_bias))
    # Free-form settings for third-party logits processors.
    custom_params: dict[str, Any] | None = _param(None, _optional(_dict))
    # Constrained decoding: the output must match this regex, or this JSON Schema (a JSON string;
    # an object is accepted and serialised), or this grammar (EBNF, in the grammar backend's
    # dialect). At most one.
    regex: str | None = _param(None, _optional(_text))
    json_schema: str | None = _param(None, _optional(_schema_text))
    # The constraint starts only after the output holds these tokens (a reasoning model's end of
    # thinking, e.g. the ids of "</think>"); until then every token is allowed.
    constraint_after_ids: list[int] | None = _param(None, _optional(_token_ids))
    ebnf: str | None = _param(None, _optional(_text))

    def __post_init__(self) -> None:
        self._coerce()

    def _coerce(self) -> None:
        for f in fields(self):
            setattr(self, f.name, f.metadata["coerce"](f.name, getattr(self, f.name)))

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> SamplingParams:
        """Build from a request's JSON object; a null value means the field's default."""
        if d is None:
            return cls()
        if not isinstance(d, dict):
            raise ValueError(f"sampling_params: expected a mapping, got {d!r}")
        known = {f.name for f in fields(cls)}
        for key in d:
            if key not in known:
                raise ValueError(f"{key}: unknown sampling parameter")
        return cls(**{k: v for k, v in d.items() if v is not None})

    def validate(self, vocab_size: int) -> None:
        """Check every value range; raise ``ValueError("<field>: ...")`` on the first bad one.
        Then clamp the values float32 cannot carry through the sampler (see ``_clamp``)."""
        self._coerce()  # fields may have been reassigned since construction

        def require(ok: bool, name: str, rule: str) -> None:
            if not ok:
                raise ValueError(f"{name}: {rule}, got {getattr(self, name)!r}")

        # Written so that NaN fails every range check.
        require(math.isfinite(self.temperature) and self.temperature >= 0, "temperature", "must be finite and >= 0")
        require(0 < self.top_p <= 1, "top_p", "must be in (0, 1]")
        require(self.top_k == -1 or self.top_k >= 1, "top_k", "must be -1 (off) or >= 1")
        require(0 <= self.min_p <= 1, "min_p", "must be in [0, 1]")
        require(self.max_new_tokens >= 0, "max_new_tokens", "must be >= 0")
        require(
            0 <= self.min_new_tokens <= self.max_new_tokens, "min_new_tokens", "must be in [0, max_new_tokens]"
        )
        require(-2 <= self.frequency_penalty <= 2, "frequency_penalty", "must be in [-2, 2]")
        require(-2 <= self.presence_penalty <= 2, "presence_penalty", "must be in [-2, 2]")
        require(
            math.isfinite(self.repetition_penalty) and self.repetition_penalty > 0,
            "repetition_penalty",
            "must be finite and > 0",
        )
        require(self.n >= 1, "n", "must be >= 1")
        require(all(self.stop), "stop", "stop strings must be non-empty")
        in_vocab = f"token ids must be in [0, {vocab_size})"
        require(all(0 <= t < vocab_size for t in self.stop_token_ids or ()), "stop_token_ids", in_vocab)
        require(all(0 <= t < vocab_size for t in self.constraint_after_ids or ()), "constraint_after_ids", in_vocab)
        require(self.constraint_after_ids != [], "constraint_after_ids", "must not be empty")
        bias = self.logit_bias or {}
        require(all(0 <= t < vocab_size for t in bias), "logit_bias", in_vocab)
        require(all(math.isfinite(v) for v in bias.values()), "logit_bias", "biases must be finite")
        given = [name for name in CONSTRAINT_KINDS if getattr(self, name) is not None]
        require(len(given) <= 1, given[0] if given else "regex", "give at most one of regex, json_schema and ebnf")
        require(self.regex != "", "regex", "must not be empty")
        require(self.ebnf != "", "ebnf", "must not be empty")
        if self.json_schema is not None:
            try:
                schema = json.loads(self.json_schema)
            except ValueError as exc:
                raise ValueError(f"json_schema: not valid JSON ({exc})") from None
            except RecursionError:
                raise ValueError("json_schema: nested too deeply") from None
            require(isinstance(schema, dict), "json_schema", "must be a JSON object")
        self._clamp(vocab_size)

    def _clamp(self, vocab_size: int) -> None:
        """Bring accepted values into the range where the sampler's float32 arithmetic has no
        inf or NaN: temperature and top_p to values that sample exactly as asked, the repetition
        penalty and logit biases to their limits (see the constants)."""
        self.temperature = min(self.temperature, FLOAT32_MAX)
        # A top_p at most the top token's share keeps the top token alone, and that share is at
        # least 1 / vocab_size; half of it keeps top_p * mass clear of float32's zero (5e-324
        # became 0, which kept no token).
        self.top_p = max(self.top_p, 0.5 / vocab_size)
        low, high = REPETITION_PENALTY_RANGE
        self.repetition_penalty = min(max(self.repetition_penalty, low), high)
        if self.logit_bias:
            self.logit_bias = {token: min(max(bias, -LOGIT_BIAS_LIMIT), LOGIT_BIAS_LIMIT)
                               for token, bias in self.logit_bias.items()}

    @property
    def constraint(self) -> tuple[str, str] | None:
        """``("regex", pattern)``, ``("json_schema", schema)`` or ``("ebnf", grammar)``, or None
        when unconstrained."""
        for kind in CONSTRAINT_KINDS:
            if getattr(self, kind) is not None:
                return kind, getattr(self, kind)
        return None

    @property
    def is_greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE or self.top_k == 1

"""The language's public expressions: ``gen``, ``select``, ``image``, ``video`` and the roles.

Every argument is checked here, when the program builds the expression, so a mistake is a
``ValueError`` naming the argument at the line that made it.
"""

from __future__ import annotations

import json
import math
import numbers
from typing import Any

from sglang_core.lang.backend import CHOICE_METHODS, GenParams
from sglang_core.lang.ir import Expr, Gen, ImageExpr, RoleBegin, RoleEnd, Select, Seq, VideoExpr, as_expr

# What gen(dtype=...) constrains the output to.
INT_REGEX = r"-?[0-9]{1,18}"
STRING_REGEX = r'"[^"\n]{0,200}"'

token_length_normalized = "token_length_normalized"
greedy_token_selection = "greedy_token_selection"
unconditional_likelihood_normalized = "unconditional_likelihood_normalized"


def gen(name: str | None = None, max_tokens: int | None = None, stop: str | list[str] | None = None,
        stop_token_ids: list[int] | None = None, temperature: float | None = None, top_p: float | None = None,
        top_k: int | None = None, min_p: float | None = None, frequency_penalty: float | None = None,
        presence_penalty: float | None = None, ignore_eos: bool = False, regex: str | None = None,
        json_schema: str | dict | None = None, choices: list[str] | None = None, dtype: type | None = None,
        return_logprob: bool = False, top_logprobs_num: int | None = None,
        choices_method: str = token_length_normalized, tools: list[dict] | None = None,
        tool_choice: str | None = None) -> Expr:
    """Generate text into variable ``name`` (``s[name]``). With ``choices`` it is a :func:`select`;
    ``regex`` / ``json_schema`` constrain the output; ``dtype=int`` constrains it to an integer
    and stores an ``int``, ``dtype=str`` to a double-quoted string. ``tools`` (OpenAI function
    tools) may be called, as ``tool_choice`` lets (``auto``, ``none``, ``required`` or a tool's
    name); the calls are ``s.get_meta_info(name)["tool_calls"]`` and ``s[name]`` the text."""
    if choices is not None:
        if regex is not None or json_schema is not None or dtype is not None:
            raise ValueError("choices: cannot be combined with regex, json_schema or dtype")
        return select(name, choices, temperature=0.0 if temperature is None else temperature,
                      choices_method=choices_method)
    if dtype not in (None, int, str):
        raise ValueError(f"dtype: must be int or str, got {dtype!r}")
    if dtype is not None:
        if regex is not None or json_schema is not None:
            raise ValueError("dtype: cannot be combined with regex or json_schema")
        regex = INT_REGEX if dtype is int else STRING_REGEX
    if regex is not None and json_schema is not None:
        raise ValueError("regex: give at most one of regex and json_schema")
    params = GenParams(
        max_tokens=_optional_int("max_tokens", max_tokens, minimum=1),
        stop=_strings("stop", stop),
        stop_token_ids=tuple(_optional_int("stop_token_ids", t, minimum=0) for t in stop_token_ids or ()),
        temperature=_optional_float("temperature", temperature, 0.0, math.inf),
        top_p=_optional_float("top_p", top_p, 0.0, 1.0, open_low=True),
        top_k=_optional_int("top_k", top_k, minimum=-1),
        min_p=_optional_float("min_p", min_p, 0.0, 1.0),
        frequency_penalty=_optional_float("frequency_penalty", frequency_penalty, -2.0, 2.0),
        presence_penalty=_optional_float("presence_penalty", presence_penalty, -2.0, 2.0),
        ignore_eos=_bool("ignore_eos", ignore_eos),
        regex=_optional_str("regex", regex),
        json_schema=_schema(json_schema),
        return_logprob=_bool("return_logprob", return_logprob),
        top_logprobs_num=_optional_int("top_logprobs_num", top_logprobs_num, minimum=0),
        tools=_tools(tools),
        tool_choice=_tool_choice(tool_choice, tools),
    )
    return Gen(_name(name), params, dtype)


def gen_int(name: str | None = None, max_tokens: int | None = None, **kwargs: Any) -> Expr:
    """``gen(..., dtype=int)``: an integer, stored as ``int``."""
    return gen(name, max_tokens=max_tokens, dtype=int, **kwargs)


def gen_string(name: str | None = None, max_tokens: int | None = None, **kwargs: Any) -> Expr:
    """``gen(..., dtype=str)``: a double-quoted string."""
    return gen(name, max_tokens=max_tokens, dtype=str, **kwargs)


def select(name: str | None = None, choices: list[str] | None = None, temperature: float = 0.0,
           choices_method: str = token_length_normalized) -> Expr:
    """Pick one of ``choices`` (scored by the backend; see ``sglang_core.choices``) into ``name``."""
    if not isinstance(choices, (list, tuple)) or not choices or not all(isinstance(c, str) and c for c in choices):
        raise ValueError("choices: must be a non-empty list of non-empty strings")
    if choices_method not in CHOICE_METHODS:
        raise ValueError(f"choices_method: must be one of {', '.join(CHOICE_METHODS)}")
    temperature = _optional_float("temperature", temperature, 0.0, math.inf)
    return Select(_name(name), tuple(choices), temperature, choices_method)


def image(source: str | bytes) -> Expr:
    """An image (file path, ``http(s)`` URL or raw bytes) in the current turn."""
    if not isinstance(source, (str, bytes, bytearray)) or not source:
        raise ValueError("image: expected a file path, a URL or image bytes")
    return ImageExpr(bytes(source) if isinstance(source, bytearray) else source)


def video(path: str, num_frames: int) -> Expr:
    """``num_frames`` frames of a video file, as images in the current turn."""
    if not isinstance(path, str) or not path:
        raise ValueError("video: expected a file path")
    if num_frames is None:
        raise ValueError("num_frames: must be an integer >= 1, got None")
    return VideoExpr(path, _optional_int("num_frames", num_frames, minimum=1))


def _role(role: str, expr: Any) -> Expr:
    return Seq((RoleBegin(role), as_expr(expr), RoleEnd(role)))


def system(expr: Any = "") -> Expr:
    """``expr`` as a system turn."""
    return _role("system", expr)


def user(expr: Any = "") -> Expr:
    """``expr`` as a user turn."""
    return _role("user", expr)


def assistant(expr: Any = "") -> Expr:
    """``expr`` as an assistant turn."""
    return _role("assistant", expr)


def system_begin() -> Expr:
    return RoleBegin("system")


def system_end() -> Expr:
    return RoleEnd("system")


def user_begin() -> Expr:
    return RoleBegin("user")


def user_end() -> Expr:
    return RoleEnd("user")


def assistant_begin() -> Expr:
    return RoleBegin("assistant")


def assistant_end() -> Expr:
    return RoleEnd("assistant")


# ---- argument checks ---------------------------------------------------------------------------

def _name(name: Any) -> str | None:
    if name is not None and (not isinstance(name, str) or not name):
        raise ValueError(f"name: must be a non-empty string, got {name!r}")
    return name


def _bool(field: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{field}: must be True or False, got {value!r}")
    return value


def _optional_int(field: str, value: Any, minimum: int) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{field}: must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _optional_float(field: str, value: Any, low: float, high: float, open_low: bool = False) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or math.isnan(value):
        raise ValueError(f"{field}: must be a number, got {value!r}")
    if value > high or value < low or (open_low and value == low):
        raise ValueError(f"{field}: must be in {'(' if open_low else '['}{low}, {high}], got {value!r}")
    return float(value)


def _optional_str(field: str, value: Any) -> str | None:
    if value is not None and (not isinstance(value, str) or not value):
        raise ValueError(f"{field}: must be a non-empty string, got {value!r}")
    return value


def _strings(field: str, value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)) or not all(isinstance(s, str) and s for s in items):
        raise ValueError(f"{field}: must be a non-empty string or a list of them, got {value!r}")
    return tuple(items)


def _tools(value: Any) -> tuple[dict, ...]:
    if value is None:
        return ()
    if not isinstance(value, (list, tuple)) or not value or not all(
            isinstance(t, dict) and t.get("type") == "function" and isinstance(t.get("function"), dict)
            and isinstance(t["function"].get("name"), str) for t in value):
        raise ValueError("tools: must be a non-empty list of OpenAI function tools "
                         "({'type': 'function', 'function': {'name': ..., 'parameters': {...}}})")
    return tuple(value)


def _tool_choice(value: Any, tools: Any) -> str | None:
    if value is None:
        return None
    names = [t["function"]["name"] for t in tools or ()]
    if not names:
        raise ValueError("tool_choice: needs tools")
    if value not in ("auto", "none", "required", *names):
        raise ValueError(f"tool_choice: must be 'auto', 'none', 'required' or the name of one of the tools, "
                         f"got {value!r}")
    return value


def _schema(value: Any) -> str | None:
    """A JSON Schema as given (object or JSON text) -> its JSON text."""
    if value is None:
        return None
    if isinstance(value, dict):
        return json.dumps(value)
    if isinstance(value, str):
        try:
            parsed = json.loads(value)
        except ValueError as exc:
            raise ValueError(f"json_schema: not valid JSON ({exc})") from None
        if isinstance(parsed, dict):
            return value
    raise ValueError("json_schema: must be a JSON object (a dict or its JSON text)")

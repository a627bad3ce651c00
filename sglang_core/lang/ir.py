"""The expressions a program adds to its state (``s += expr``): text, generations, selections,
images and role markers. They are plain data; ``sglang_core.lang.state`` executes them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Union

from sglang_core.lang.backend import GenParams


class Expr:
    """Base of every expression; ``a + b`` (either side may be a string) is their sequence."""

    def __add__(self, other: Any) -> Seq:
        return Seq((self, as_expr(other)))

    def __radd__(self, other: Any) -> Seq:
        return Seq((as_expr(other), self))


@dataclass(frozen=True, eq=False)
class Text(Expr):
    text: str


@dataclass(frozen=True, eq=False)
class Seq(Expr):
    items: tuple[Expr, ...]


@dataclass(frozen=True, eq=False)
class Gen(Expr):
    """``gen``: sample text into variable ``name``; ``dtype`` int converts the text with ``int``.
    ``params`` fields left ``None`` take the run's defaults, then the backend's."""

    name: str | None
    params: GenParams
    dtype: type | None = None


@dataclass(frozen=True, eq=False)
class Select(Expr):
    name: str | None
    choices: tuple[str, ...]
    temperature: float
    method: str


@dataclass(frozen=True, eq=False)
class ImageExpr(Expr):
    source: Union[str, bytes]


@dataclass(frozen=True, eq=False)
class VideoExpr(Expr):
    path: str
    num_frames: int


@dataclass(frozen=True, eq=False)
class RoleBegin(Expr):
    role: str


@dataclass(frozen=True, eq=False)
class RoleEnd(Expr):
    role: str


def as_expr(value: Any) -> Expr:
    """A string becomes :class:`Text`; an expression stays; anything else is a ``ValueError``."""
    if isinstance(value, Expr):
        return value
    if isinstance(value, str):
        return Text(value)
    raise ValueError(f"expr: expected a string or an sgl expression (gen, select, image, ...), "
                     f"got {type(value).__name__}")

"""A running program's state and the interpreter that executes what is added to it.

Every state owns a queue of expressions and executes them in order on a worker thread of its own
(started when work arrives, gone when the queue is empty), so ``s += sgl.gen(...)`` returns at
once and the branches of a ``fork`` run at the same time. Reading the state (``s["var"]``,
``s.text()``, ...) waits until everything added so far has run, and re-raises the first error.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import threading
from collections import deque
from typing import Any, AsyncIterator, Iterator

from sglang_core.lang.backend import GenParams, GenResult, Image, LangBackend, Prompt, UnsupportedError, Video
from sglang_core.lang.ir import Expr, Gen, ImageExpr, RoleBegin, RoleEnd, Select, Seq, Text, VideoExpr, as_expr
from sglang_core.lang.media import load_image, load_video, load_video_frames

Piece = tuple[str | None, str]  # (the gen/select variable it belongs to, or None; the text)


class ProgramState:
    """What ``s`` is inside an ``@sgl.function``: text, chat messages, images and variables."""

    def __init__(self, backend: LangBackend, defaults: dict[str, Any] | None = None, stream: bool = False):
        self.backend = backend
        self.error: BaseException | None = None
        self._defaults = dict(defaults or {})  # GenParams fields set by run(...) for every gen
        self._stream = stream
        self._text = ""
        self._messages: list[dict[str, Any]] = []  # content: a list of ("text", str) / ("image", Image)
        self._images: list[Image] = []
        self._videos: list[Video] = []
        self._open_role: str | None = None
        self._variables: dict[str, Any] = {}
        self._meta_info: dict[str, Any] = {}
        self._pieces: list[Piece] = []
        self._cond = threading.Condition()
        self._queue: deque[Expr] = deque()
        self._working = False
        self._program_done = True  # False while a program function still runs on this state

    # ---- adding to the state -----------------------------------------------------------------

    def __iadd__(self, expr: Any) -> ProgramState:
        self._submit(as_expr(expr))
        return self

    def _submit(self, expr: Expr) -> None:
        with self._cond:
            if self.error is not None:
                return  # the program has already failed; the error surfaces at the next read
            self._queue.append(expr)
            if not self._working:
                self._working = True
                threading.Thread(target=self._work, name="sgl-state", daemon=True).start()

    def _work(self) -> None:
        while True:
            with self._cond:
                if not self._queue:
                    self._working = False
                    self._cond.notify_all()
                    return
                expr = self._queue.popleft()
            try:
                self._execute(expr)
            except BaseException as exc:  # kept for the reader: a program error must not vanish in a thread
                self._fail(exc)

    def _set_program_done(self, done: bool) -> None:
        with self._cond:
            self._program_done = done
            self._cond.notify_all()

    def _fail(self, exc: BaseException) -> None:
        with self._cond:
            if self.error is None:
                self.error = exc
            self._queue.clear()
            self._cond.notify_all()

    @contextlib.contextmanager
    def _role(self, role: str) -> Iterator[None]:
        self._submit(RoleBegin(role))
        yield
        self._submit(RoleEnd(role))

    def system(self) -> contextlib.AbstractContextManager[None]:
        """``with s.system(): s += "..."``: the block is a system turn."""
        return self._role("system")

    def user(self) -> contextlib.AbstractContextManager[None]:
        """``with s.user(): s += "..."``: the block is a user turn."""
        return self._role("user")

    def assistant(self) -> contextlib.AbstractContextManager[None]:
        """``with s.assistant(): s += sgl.gen("answer")``: the block is an assistant turn."""
        return self._role("assistant")

    # ---- reading the state ------------------------------------------------------------------

    def sync(self) -> ProgramState:
        """Wait until everything added so far has run; raise the program's error, if any."""
        with self._cond:
            self._cond.wait_for(lambda: not self._working)
        if self.error is not None:
            raise self.error
        return self

    @property
    def finished(self) -> bool:
        """True once the program has returned and everything it added has run (or failed)."""
        with self._cond:
            return self._is_finished()

    def _is_finished(self) -> bool:
        return (self._program_done or self.error is not None) and not self._working

    def __getitem__(self, name: str) -> Any:
        self.sync()
        if name not in self._variables:
            raise KeyError(f"no variable {name!r}; the program has set: {', '.join(self._variables) or 'none'}")
        return self._variables[name]

    def get_var(self, name: str) -> Any:
        return self[name]

    def set_var(self, name: str, value: Any) -> None:
        self.sync()
        self._variables[name] = value

    def text(self) -> str:
        """Everything written so far, roles rendered with the backend's chat template."""
        self.sync()
        return self._text

    def messages(self) -> list[dict[str, Any]]:
        """The chat turns so far as ``{"role", "content"}`` dicts."""
        self.sync()
        return list(self._snapshot().messages)

    def get_meta_info(self, name: str) -> dict[str, Any]:
        """What the backend reported for the ``gen``/``select`` named ``name`` (token counts,
        cached tokens, finish reason, logprobs, scores)."""
        self.sync()
        if name not in self._meta_info:
            raise KeyError(f"no gen or select named {name!r}")
        return self._meta_info[name]

    def text_iter(self, var_name: str | None = None) -> Iterator[str]:
        """The text as it is written, piece by piece, while the program runs (every piece, or only
        those of the ``gen`` named ``var_name``); ends when the program finishes and raises its
        error, if any. Pieces arrive before a generation ends with ``run(stream=True)``."""
        index = 0
        while (piece := self._next_piece(index)) is not None:
            index += 1
            if var_name is None or piece[0] == var_name:
                yield piece[1]
        if self.error is not None:
            raise self.error

    async def text_async_iter(self, var_name: str | None = None) -> AsyncIterator[str]:
        """:meth:`text_iter` for ``async for``; waiting happens off the event loop."""
        index = 0
        while (piece := await asyncio.to_thread(self._next_piece, index)) is not None:
            index += 1
            if var_name is None or piece[0] == var_name:
                yield piece[1]
        if self.error is not None:
            raise self.error

    def _next_piece(self, index: int) -> Piece | None:
        with self._cond:
            self._cond.wait_for(lambda: index < len(self._pieces) or self._is_finished())
            return self._pieces[index] if index < len(self._pieces) else None

    # ---- fork / join -------------------------------------------------------------------------

    def fork(self, n: int) -> ForkGroup:
        """``n`` copies of this state that run on from here at the same time. The backend is first
        asked to cache the shared prefix, so the branches reuse it."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"n: fork needs a positive integer, got {n!r}")
        self.sync()
        self.backend.cache_prefix(self._snapshot())
        return ForkGroup(self._copy() for _ in range(n))

    def join(self, forks: list[ProgramState]) -> list[ProgramState]:
        """Wait until every branch has finished what was added to it; raise the first error."""
        for branch in forks:
            branch.sync()
        return forks

    def _copy(self) -> ProgramState:
        branch = ProgramState(self.backend, self._defaults, self._stream)
        branch._text = self._text
        branch._messages = [{"role": m["role"], "content": list(m["content"])} for m in self._messages]
        branch._images = list(self._images)
        branch._videos = list(self._videos)
        branch._open_role = self._open_role
        branch._variables = dict(self._variables)
        branch._meta_info = dict(self._meta_info)
        return branch

    # ---- the interpreter ---------------------------------------------------------------------

    def _execute(self, expr: Expr) -> None:
        if isinstance(expr, Text):
            self._write(expr.text)
        elif isinstance(expr, Seq):
            for item in expr.items:
                self._execute(item)
        elif isinstance(expr, Gen):
            self._gen(expr)
        elif isinstance(expr, Select):
            self._select(expr)
        elif isinstance(expr, RoleBegin):
            self._begin_role(expr.role)
        elif isinstance(expr, RoleEnd):
            self._end_role(expr.role)
        elif isinstance(expr, ImageExpr):
            self._require_images("image")
            self._add_images([load_image(expr.source)])
        elif isinstance(expr, VideoExpr):
            self._require_images("video")
            if self.backend.video_token:  # the server decodes the file and samples its frames
                self._videos.append(load_video(expr.path, expr.num_frames))
                self._write(self.backend.video_token, in_message=False)
            else:
                self._add_images(load_video_frames(expr.path, expr.num_frames))
        else:
            raise TypeError(f"unknown expression {expr!r}")

    def _write(self, text: str, var: str | None = None, in_message: bool = True) -> None:
        with self._cond:
            self._text += text
            if in_message and self._open_role is not None:
                self._messages[-1]["content"].append(("text", text))
            if text:
                self._pieces.append((var, text))
            self._cond.notify_all()

    def _begin_role(self, role: str) -> None:
        template = self.backend.chat_template
        if role not in template.role_prefix:
            raise ValueError(f"role: the {self.backend.name} backend's chat template has no role {role!r}")
        if self._open_role is not None:
            raise ValueError(f"role: cannot begin {role!r} inside the open {self._open_role!r} turn")
        self._write(template.role_prefix[role], in_message=False)
        self._messages.append({"role": role, "content": []})
        self._open_role = role

    def _end_role(self, role: str) -> None:
        if self._open_role != role:
            raise ValueError(f"role: cannot end {role!r}; the open turn is {self._open_role!r}")
        self._open_role = None
        self._write(self.backend.chat_template.role_suffix[role], in_message=False)

    def _require_images(self, what: str) -> None:
        if not self.backend.supports_images:
            raise UnsupportedError(f"{what}: the {self.backend.name} backend does not take images")

    def _add_images(self, images: list[Image]) -> None:
        self._images += images
        if self.backend.image_token:  # text only: chat backends get the images as message parts
            self._write(self.backend.image_token * len(images), in_message=False)
        if self._open_role is not None:
            self._messages[-1]["content"] += [("image", image) for image in images]

    def _snapshot(self) -> Prompt:
        messages = []
        for m in self._messages:
            parts = m["content"]
            if all(kind == "text" for kind, _ in parts):
                content: Any = "".join(value for _, value in parts)
            else:
                content = [{"type": "text", "text": v} if k == "text" else {"type": "image", "image": v}
                           for k, v in parts]
            messages.append({"role": m["role"], "content": content})
        return Prompt(self._text, tuple(messages), tuple(self._images), self._open_role, tuple(self._videos))

    def _params(self, params: GenParams) -> GenParams:
        unset = {f.name: f.default for f in dataclasses.fields(GenParams) if f.name != "extra"}
        merged = {k: v for k, v in self._defaults.items() if getattr(params, k) == unset[k]}
        if self._open_role == "assistant" and self.backend.chat_template.stop:
            stop = params.stop or merged.get("stop", ())
            merged["stop"] = tuple(stop) + tuple(s for s in self.backend.chat_template.stop if s not in stop)
        return dataclasses.replace(params, **merged)

    def _gen(self, expr: Gen) -> None:
        params = self._params(expr.params)
        if params.tools and not self.backend.supports_tools:
            raise UnsupportedError(f"tools: the {self.backend.name} backend cannot call tools "
                                   f"(sgl.OpenAI with a chat model and sgl.Anthropic can)")
        prompt = self._snapshot()
        if self._stream:
            result, streamed = None, []
            for item in self.backend.generate_stream(prompt, params):
                if isinstance(item, GenResult):
                    result = item
                else:
                    streamed.append(item)
                    self._write(item, var=expr.name)
            if result is None or result.text != "".join(streamed):
                raise RuntimeError(f"gen: the {self.backend.name} backend's stream did not end with a "
                                   f"GenResult holding the streamed text")
        else:
            result = self.backend.generate(prompt, params)
            self._write(result.text, var=expr.name)
        value: Any = result.text
        if expr.dtype is int:
            try:
                value = int(value.strip())
            except ValueError:
                raise ValueError(f"gen: {expr.name!r} should be an integer, the backend produced {value!r}") from None
        if expr.name is not None:
            self._variables[expr.name] = value
            self._meta_info[expr.name] = result.meta_info

    def _select(self, expr: Select) -> None:
        result = self.backend.select(self._snapshot(), list(expr.choices), expr.temperature, expr.method)
        self._write(result.choice, var=expr.name)
        if expr.name is not None:
            self._variables[expr.name] = result.choice
            self._meta_info[expr.name] = {"index": result.index, "scores": result.scores, **result.meta_info}

    def __repr__(self) -> str:
        return f"ProgramState(finished={self.finished}, text={self._text[-60:]!r})"


class ForkGroup(list):
    """The branches of ``s.fork(n)``: a list of states, plus ``+=`` (to every branch) and ``join``."""

    def __iadd__(self, expr: Any) -> ForkGroup:
        for branch in self:
            branch += expr
        return self

    def join(self) -> ForkGroup:
        """Wait until every branch has finished what was added to it."""
        for branch in self:
            branch.sync()
        return self

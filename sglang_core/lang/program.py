"""``@sgl.function`` and running programs: ``run`` (optionally streaming) and ``run_batch``."""

from __future__ import annotations

import functools
import inspect
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

from sglang_core.lang import api
from sglang_core.lang.backend import LangBackend
from sglang_core.lang.backends import resolve_backend
from sglang_core.lang.state import ProgramState


def _sampling_defaults(max_new_tokens: int | None, stop: str | list[str] | None, stop_token_ids: list[int] | None,
                       temperature: float | None, top_p: float | None, top_k: int | None, min_p: float | None,
                       frequency_penalty: float | None, presence_penalty: float | None, ignore_eos: bool,
                       return_logprob: bool, top_logprobs_num: int | None) -> dict[str, Any]:
    """``run``'s sampling keywords, checked exactly as ``gen`` checks them, as GenParams fields
    that every ``gen`` of the program takes unless it sets its own."""
    checked = api.gen(max_tokens=max_new_tokens, stop=stop, stop_token_ids=stop_token_ids, temperature=temperature,
                      top_p=top_p, top_k=top_k, min_p=min_p, frequency_penalty=frequency_penalty,
                      presence_penalty=presence_penalty, ignore_eos=ignore_eos, return_logprob=return_logprob,
                      top_logprobs_num=top_logprobs_num).params
    given = {"max_tokens": max_new_tokens, "stop": stop, "stop_token_ids": stop_token_ids,
             "temperature": temperature, "top_p": top_p, "top_k": top_k, "min_p": min_p,
             "frequency_penalty": frequency_penalty, "presence_penalty": presence_penalty,
             "ignore_eos": ignore_eos or None, "return_logprob": return_logprob or None,
             "top_logprobs_num": top_logprobs_num}
    return {name: getattr(checked, name) for name, value in given.items() if value is not None}


class SglFunction:
    """A program: a Python function whose first parameter is the state ``s``."""

    def __init__(self, func: Callable[..., Any]):
        params = list(inspect.signature(func).parameters.values())
        if not params or params[0].kind not in (params[0].POSITIONAL_ONLY, params[0].POSITIONAL_OR_KEYWORD):
            raise ValueError(f"function: {func.__name__} must take the program state as its first argument")
        self.func = func
        self._signature = inspect.signature(func)
        functools.update_wrapper(self, func)

    def run(self, *args: Any, backend: LangBackend | None = None, stream: bool = False,
            max_new_tokens: int | None = None, stop: str | list[str] | None = None,
            stop_token_ids: list[int] | None = None, temperature: float | None = None, top_p: float | None = None,
            top_k: int | None = None, min_p: float | None = None, frequency_penalty: float | None = None,
            presence_penalty: float | None = None, ignore_eos: bool = False, return_logprob: bool = False,
            top_logprobs_num: int | None = None, **kwargs: Any) -> ProgramState:
        """Run the program on ``backend`` (default: ``sgl.set_default_backend``'s). Keyword
        arguments other than the sampling defaults go to the function.

        Without ``stream`` this returns once the program has finished, and raises its error.
        With ``stream=True`` it returns at once; the program runs in a thread and the state's
        ``text_iter()`` / ``text_async_iter()`` give its text as it is generated."""
        defaults = _sampling_defaults(max_new_tokens, stop, stop_token_ids, temperature, top_p, top_k, min_p,
                                      frequency_penalty, presence_penalty, ignore_eos, return_logprob,
                                      top_logprobs_num)
        state = ProgramState(resolve_backend(backend), defaults, stream=bool(stream))
        bound = self._bind(state, args, kwargs)
        if stream:
            state._set_program_done(False)
            threading.Thread(target=self._execute, args=(state, bound), name="sgl-program", daemon=True).start()
            return state
        self._execute(state, bound)
        return state.sync()

    def run_batch(self, batch_kwargs: list[dict[str, Any]], *, backend: LangBackend | None = None,
                  num_threads: int | str = "auto", progress_bar: bool = False, max_new_tokens: int | None = None,
                  stop: str | list[str] | None = None, stop_token_ids: list[int] | None = None,
                  temperature: float | None = None, top_p: float | None = None, top_k: int | None = None,
                  min_p: float | None = None, frequency_penalty: float | None = None,
                  presence_penalty: float | None = None, ignore_eos: bool = False, return_logprob: bool = False,
                  top_logprobs_num: int | None = None) -> list[ProgramState]:
        """Run the program once per dict of keyword arguments, ``num_threads`` at a time. Returns
        the states in input order; an item that failed has its exception in ``state.error`` and
        the others are unaffected."""
        if not isinstance(batch_kwargs, list) or not all(isinstance(item, dict) for item in batch_kwargs):
            raise ValueError("batch_kwargs: must be a list of dicts of keyword arguments")
        if num_threads == "auto":
            num_threads = max(8, 4 * (os.cpu_count() or 1))
        elif isinstance(num_threads, bool) or not isinstance(num_threads, int) or num_threads < 1:
            raise ValueError(f"num_threads: must be 'auto' or a positive integer, got {num_threads!r}")
        defaults = _sampling_defaults(max_new_tokens, stop, stop_token_ids, temperature, top_p, top_k, min_p,
                                      frequency_penalty, presence_penalty, ignore_eos, return_logprob,
                                      top_logprobs_num)
        backend = resolve_backend(backend)
        states = [ProgramState(backend, defaults) for _ in batch_kwargs]

        def one(index: int) -> None:
            state = states[index]
            try:
                self._execute(state, self._bind(state, (), batch_kwargs[index]))
                state.sync()
            except Exception as exc:  # kept on the item's state (state.error); the batch goes on
                state._fail(exc)

        progress = None
        if progress_bar:
            from tqdm import tqdm

            progress = tqdm(total=len(states))
        with ThreadPoolExecutor(max_workers=min(num_threads, max(len(states), 1))) as pool:
            for _ in pool.map(one, range(len(states))):
                if progress is not None:
                    progress.update(1)
        if progress is not None:
            progress.close()
        return states

    def _bind(self, state: ProgramState, args: tuple, kwargs: dict[str, Any]) -> inspect.BoundArguments:
        try:
            return self._signature.bind(state, *args, **kwargs)
        except TypeError as exc:
            raise ValueError(f"arguments: {self.func.__name__}(s, ...) {exc}") from None

    def _execute(self, state: ProgramState, bound: inspect.BoundArguments) -> None:
        """Call the function on ``state``; its own errors end up in ``state.error`` too."""
        try:
            self.func(*bound.args, **bound.kwargs)
        except BaseException as exc:
            state._fail(exc)
        finally:
            state._set_program_done(True)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Calling a program inside another program runs it on the caller's state."""
        return self.func(*args, **kwargs)


def function(func: Callable[..., Any]) -> SglFunction:
    """Decorator: ``@sgl.function def prog(s, question): s += ...``."""
    return SglFunction(func)

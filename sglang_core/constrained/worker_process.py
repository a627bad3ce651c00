"""Compiling in child processes that can be killed: a compile that overruns its time budget is
stopped for real (its CPU and memory are the kernel's again), where a thread could only be
abandoned, still running. A backend names a module whose ``__main__`` calls ``serve``; the parent
sends it one setup message (say, the vocabulary) and then requests, and gets bytes back. Messages
are length-prefixed bytes on the child's stdin and stdout; nothing is pickled.

The child also bounds itself, so it cannot outlive a parent that died mid-compile: its address
space is capped at the memory budget, and its CPU time at the time budget per request.
"""

from __future__ import annotations

import math
import os
import resource
import select
import signal
import struct
import subprocess
import sys
import threading
import time
from typing import Any, BinaryIO, Callable

from sglang_core.constrained.limits import CompileBudget  # not grammar: the child must not import torch

_LENGTH = struct.Struct(">Q")
_OK, _ERROR = b"\x00", b"\x01"


class WorkerProcess:
    """One child running ``python -m module``, serving one request at a time."""

    def __init__(self, module: str, setup: bytes, budget: CompileBudget):
        self.budget = budget
        args = [str(budget.memory_mb or 0), str(budget.timeout_s or 0)]
        self._proc = subprocess.Popen([sys.executable, "-m", module, *args], stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, bufsize=0)
        self._send(setup)

    def call(self, request: bytes) -> bytes:
        """The child's reply to ``request``. Raises ``ValueError`` with the child's message when
        it refused the request (the child is still usable), ``TimeoutError`` when it overran the
        time budget and ``ChildProcessError`` when it died (both kill it)."""
        deadline = None if self.budget.timeout_s is None else time.monotonic() + self.budget.timeout_s
        try:
            self._send(request)
            reply = self._receive(_LENGTH.unpack(self._receive(_LENGTH.size, deadline))[0], deadline)
        except BaseException:
            self.kill()
            raise
        if reply[:1] == _ERROR:
            raise ValueError(reply[1:].decode("utf-8", "replace"))
        return reply[1:]

    def kill(self) -> None:
        if self._proc.poll() is None:
            self._proc.kill()
        self._proc.wait()
        for pipe in (self._proc.stdin, self._proc.stdout):
            pipe.close()

    @property
    def pid(self) -> int:
        return self._proc.pid

    def _send(self, data: bytes) -> None:
        message = memoryview(_LENGTH.pack(len(data)) + data)
        try:
            while message:  # a blocking pipe takes it all, unless a signal cuts a write short
                message = message[self._proc.stdin.write(message):]
        except (BrokenPipeError, ValueError):  # ValueError: the pipe was closed by kill()
            raise ChildProcessError(self._death()) from None

    def _receive(self, size: int, deadline: float | None) -> bytes:
        data = bytearray()
        fd = self._proc.stdout.fileno()
        while len(data) < size:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and (left <= 0 or not select.select([fd], [], [], left)[0]):
                raise TimeoutError(f"took longer than {self.budget.timeout_s:g} s")
            chunk = os.read(fd, min(size - len(data), 1 << 20))
            if not chunk:
                raise ChildProcessError(self._death())
            data += chunk
        return bytes(data)

    def _death(self) -> str:
        code = self._proc.wait()
        if code < 0 and -code in (signal.SIGABRT, signal.SIGSEGV) and self.budget.memory_mb:
            return f"the compile process died ({signal.Signals(-code).name}; over its {self.budget.memory_mb} MB memory budget?)"
        if code == -signal.SIGXCPU:
            return f"the compile process used more than {self.budget.timeout_s:g} s of CPU time"
        return f"the compile process died (exit status {code})"


class WorkerPool:
    """Worker processes of one module, started as needed and reused; one that overran or died is
    replaced by a fresh one on the next call."""

    def __init__(self, module: str, setup: bytes, budget: CompileBudget):
        self.module, self.setup, self.budget = module, setup, budget
        self._idle: list[WorkerProcess] = []
        self._busy: set[WorkerProcess] = set()
        self._lock = threading.Lock()
        self._closed = False

    def call(self, request: bytes) -> bytes:
        """See ``WorkerProcess.call``."""
        with self._lock:
            if self._closed:
                raise ChildProcessError("the compile workers are shut down")
            worker = self._idle.pop() if self._idle else None
        if worker is None:
            worker = WorkerProcess(self.module, self.setup, self.budget)
        with self._lock:
            self._busy.add(worker)
        try:
            reply = worker.call(request)
        except ValueError:
            self._release(worker, alive=True)
            raise
        except BaseException:
            self._release(worker, alive=False)
            raise
        self._release(worker, alive=True)
        return reply

    def pids(self) -> list[int]:
        """The worker processes alive now (busy or idle)."""
        with self._lock:
            return [w.pid for w in [*self._idle, *self._busy]]

    def close(self) -> None:
        """Kill every worker, busy ones too (their calls raise ``ChildProcessError``)."""
        with self._lock:
            self._closed = True
            workers, self._idle = [*self._idle, *self._busy], []
        for worker in workers:
            worker.kill()

    def _release(self, worker: WorkerProcess, alive: bool) -> None:
        with self._lock:
            self._busy.discard(worker)
            if alive and not self._closed:
                self._idle.append(worker)
                return
        worker.kill()


class LazyWorkerPool:
    """A ``WorkerPool`` made by its first call, for a backend whose setup message (its
    vocabulary, say) takes a while to build; safe to share between the compile threads."""

    def __init__(self, module: str, setup: Callable[[], bytes]):
        self.module, self._setup = module, setup
        self._pool: WorkerPool | None = None
        self._lock = threading.Lock()

    def call(self, request: bytes, budget: CompileBudget) -> bytes:
        """See ``WorkerProcess.call``; ``budget`` bounds the workers this pool starts."""
        with self._lock:
            if self._pool is None:
                self._pool = WorkerPool(self.module, self._setup(), budget)
        return self._pool.call(request)

    def close(self) -> None:
        with self._lock:
            if self._pool is not None:
                self._pool.close()


def serve(setup: Callable[[bytes], Any], handle: Callable[[Any, bytes], bytes]) -> None:
    """The child's main loop: ``state = setup(first message)``, then each request's reply is
    ``handle(state, request)``; an exception from ``handle`` is sent back as a refusal. Ends when
    the parent closes the pipe."""
    memory_mb, timeout_s = int(sys.argv[1]), float(sys.argv[2])
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for the engine, which then closes us
    if memory_mb:
        resource.setrlimit(resource.RLIMIT_AS, (memory_mb << 20, memory_mb << 20))
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    sys.stdout = sys.stderr  # a stray print must not corrupt the replies
    state = setup(_read_message(stdin))
    while (request := _read_message(stdin)) is not None:
        if timeout_s:  # the soft limit may be raised again for the next request
            used = resource.getrusage(resource.RUSAGE_SELF)
            hard = resource.getrlimit(resource.RLIMIT_CPU)[1]
            cap = math.ceil(used.ru_utime + used.ru_stime + timeout_s) + 1
            resource.setrlimit(resource.RLIMIT_CPU, (cap if hard == resource.RLIM_INFINITY else min(cap, hard), hard))
        try:
            reply = _OK + handle(state, request)
        except Exception as exc:  # the request's fault, reported to the parent as such
            reply = _ERROR + str(exc).encode()
        stdout.write(_LENGTH.pack(len(reply)) + reply)
        stdout.flush()


def _read_message(stream: BinaryIO) -> bytes | None:
    header = stream.read(_LENGTH.size)
    if len(header) < _LENGTH.size:
        return None
    (size,) = _LENGTH.unpack(header)
    data = stream.read(size)
    return data if len(data) == size else None

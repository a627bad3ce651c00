"""Where the engine core runs: a thread of this process, or a process of its own.

Both clients take ``GenerateRequest``s and named calls, and hand every ``TokenOutput`` to a
``deliver`` callback from a background thread. The process client speaks msgpack-encoded msgspec
messages over local ZeroMQ ``ipc://`` sockets (never pickle) and notices when the engine
process dies.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import queue
import shutil
import subprocess
import sys
import tempfile
import threading
from concurrent.futures import Future
from typing import Any, Callable

import msgspec
import torch

from sglang_core.config import EngineSettings
from sglang_core.engine_core import EngineCore, ModelInfo
from sglang_core.messages import GenerateRequest, TokenOutput
from sglang_core.plugins import PluginManager

logger = logging.getLogger(__name__)

Deliver = Callable[[list[TokenOutput]], None]
IDLE_POLL_MS = 100


# ---- wire messages (request side -> engine process) --------------------------------------
class Add(msgspec.Struct, tag="add"):
    request: GenerateRequest


class Abort(msgspec.Struct, tag="abort"):
    rid: str


class Call(msgspec.Struct, tag="call"):
    call_id: int
    name: str


class Shutdown(msgspec.Struct, tag="shutdown"):
    pass


# ---- wire messages (engine process -> request side) --------------------------------------
class Ready(msgspec.Struct, tag="ready"):
    info: dict[str, Any] | None = None
    error: str | None = None


class Outputs(msgspec.Struct, tag="outputs"):
    outputs: list[TokenOutput]


class Reply(msgspec.Struct, tag="reply"):
    call_id: int
    result: Any = None
    error: str | None = None
    error_type: str | None = None


_WIRE_ENCODER = msgspec.msgpack.Encoder()
_WIRE_DECODER = msgspec.msgpack.Decoder(GenerateRequest)
_REQUEST_FIELDS = {f.name: f.type for f in msgspec.structs.fields(GenerateRequest)}
# What encoding (lone surrogates, integers beyond 64 bits, foreign objects) or strict decoding raises.
_WIRE_ERRORS = (UnicodeEncodeError, OverflowError, TypeError, msgspec.MsgspecError)


def check_sendable(request: GenerateRequest) -> None:
    """Raise ``ValueError("<field>: ...")`` unless ``request`` would reach the engine process
    intact, as msgpack decoded strictly into a ``GenerateRequest``. Both clients check it, so a
    request is refused alike wherever the core runs, and before anything is registered for it."""
    try:
        _WIRE_DECODER.decode(_WIRE_ENCODER.encode(request))
        return
    except _WIRE_ERRORS:
        pass
    # Find the field at fault; a sampling parameter is named by its own name.
    for name, kind in _REQUEST_FIELDS.items():
        value = getattr(request, name)
        parts = value.items() if name == "sampling_params" and isinstance(value, dict) else [(name, value)]
        for part_name, part in parts:
            try:
                msgspec.msgpack.decode(_WIRE_ENCODER.encode(part), type=kind if part_name == name else Any)
            except _WIRE_ERRORS as exc:
                raise ValueError(f"{part_name}: cannot be sent to the engine: {exc}") from None
    raise ValueError("body: the request cannot be sent to the engine")


class CoreClient:
    """What the request side needs from wherever the core runs."""

    info: ModelInfo
    alive: bool

    def add(self, request: GenerateRequest) -> None: ...

    def abort(self, rid: str) -> None: ...

    def call(self, name: str) -> Any: ...

    def shutdown(self) -> None: ...


def _run_call(core: EngineCore, name: str) -> tuple[Any, str | None, str | None]:
    try:
        return core.call(name), None, None
    except Exception as exc:
        return None, str(exc), type(exc).__name__


def _raise_reply(error: str, error_type: str | None) -> None:
    raise (AssertionError if error_type == "AssertionError" else RuntimeError)(error)


class ThreadCoreClient(CoreClient):
    """The core in a background thread that owns all of its state; callers use an inbox."""

    def __init__(self, settings: EngineSettings, plugins: PluginManager, deliver: Deliver):
        self.core = EngineCore(settings, plugins)
        self.info = self.core.info
        # The core thread must get the GIL back quickly to launch the next GPU step while the
        # caller's thread detokenizes; CPython's default 5 ms switch interval is a whole step.
        sys.setswitchinterval(min(sys.getswitchinterval(), 0.0005))
        self.alive = True
        self._deliver = deliver
        self._inbox: queue.Queue = queue.Queue()
        self._wake = threading.Event()
        self._stopped = False
        self._thread = threading.Thread(target=self._loop, name="sglang-core-engine", daemon=True)
        self._thread.start()

    def add(self, request: GenerateRequest) -> None:
        self._put(("add", request))

    def abort(self, rid: str) -> None:
        self._put(("abort", rid))

    def call(self, name: str) -> Any:
        future: Future = Future()
        self._put(("call", (name, future)))
        return future.result()

    def shutdown(self) -> None:
        self._stopped = True
        self._wake.set()
        self._thread.join(timeout=30)
        self.alive = False
        if not self._thread.is_alive():
            # Give the model and the KV pool back now, not when the Engine object is collected:
            # a second engine in this process sizes its pool from the GPU memory left free.
            self.core = None
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()

    def _put(self, item: tuple) -> None:
        self._inbox.put(item)
        self._wake.set()

    def _loop(self) -> None:
        core = self.core
        while not self._stopped:
            if not core.has_work() and self._inbox.empty():
                self._wake.wait(timeout=IDLE_POLL_MS / 1000)
            self._wake.clear()
            outputs: list[TokenOutput] = []
            while True:
                try:
                    kind, item = self._inbox.get_nowait()
                except queue.Empty:
                    break
                if kind == "add":
                    core.add(item)
                elif kind == "abort":
                    outputs += core.abort(item)
                else:
                    name, future = item
                    result, error, error_type = _run_call(core, name)
                    if error is None:
                        future.set_result(result)
                    else:
                        future.set_exception(AssertionError(error) if error_type == "AssertionError"
                                             else RuntimeError(error))
            if core.has_work():
                outputs += core.step()
            if outputs:
                self._deliver(outputs)
        self._deliver(core.fail_all("the engine shut down"))
        core.close()


def engine_process_main(settings_json: str, plugin_names: list[str], addr_in: str, addr_out: str,
                        parent_pid: int) -> None:
    """Entry point of the engine process: build the core, then serve messages until shut down."""
    import zmq

    settings = EngineSettings.model_validate_json(settings_json)
    logging.basicConfig(level=settings.log_level.upper())
    ctx = zmq.Context()
    inbox, outbox = ctx.socket(zmq.PULL), ctx.socket(zmq.PUSH)
    inbox.connect(addr_in)
    outbox.connect(addr_out)
    encoder = msgspec.msgpack.Encoder()
    decoder = msgspec.msgpack.Decoder(Add | Abort | Call | Shutdown)
    try:
        core = EngineCore(settings, PluginManager(plugin_names))
    except Exception as exc:  # report why, then exit
        outbox.send(encoder.encode(Ready(error=f"{type(exc).__name__}: {exc}")))
        return
    outbox.send(encoder.encode(Ready(info=msgspec.structs.asdict(_info_struct(core.info)))))
    while True:
        if os.getppid() != parent_pid:  # the server is gone: do not linger as an orphan
            return
        outputs: list[TokenOutput] = []
        if inbox.poll(0 if core.has_work() else IDLE_POLL_MS):
            while True:
                try:
                    msg = decoder.decode(inbox.recv(zmq.NOBLOCK))
                except zmq.Again:
                    break
                if isinstance(msg, Add):
                    core.add(msg.request)
                elif isinstance(msg, Abort):
                    outputs += core.abort(msg.rid)
                elif isinstance(msg, Call):
                    result, error, error_type = _run_call(core, msg.name)
                    outbox.send(encoder.encode(Reply(msg.call_id, result, error, error_type)))
                else:
                    outbox.send(encoder.encode(Outputs(core.fail_all("the engine shut down"))))
                    core.close()
                    return
        if core.has_work():
            outputs += core.step()
        if outputs:
            outbox.send(encoder.encode(Outputs(outputs)))
        if core.broken:  # a tensor-parallel rank died: exit, so the server sees a dead engine (503)
            core.close()
            return


class _InfoStruct(msgspec.Struct):
    model_path: str
    tokenizer_path: str
    model_folder: str
    architecture: str
    vocab_size: int
    context_len: int
    max_total_tokens: int
    eos_token_ids: list[int]
    attention_backend: str
    device: str
    dtype: str


def _info_struct(info: ModelInfo) -> _InfoStruct:
    return _InfoStruct(**{**info.__dict__, "eos_token_ids": list(info.eos_token_ids)})


class ProcessCoreClient(CoreClient):
    """The core in a spawned process; a receiver thread delivers its outputs and watches it live."""

    def __init__(self, settings: EngineSettings, plugins: PluginManager, deliver: Deliver,
                 on_death: Callable[[], None], start_timeout_s: float = 900):
        import zmq

        self._deliver = deliver
        self._on_death = on_death
        self._dir = tempfile.mkdtemp(prefix="sglang-core-")
        addr_in, addr_out = f"ipc://{self._dir}/in", f"ipc://{self._dir}/out"
        self._ctx = zmq.Context()
        self._out = self._ctx.socket(zmq.PUSH)
        self._out.bind(addr_in)
        self._in = self._ctx.socket(zmq.PULL)
        self._in.bind(addr_out)
        self._send_lock = threading.Lock()  # zmq sockets are not thread-safe
        self._encoder = msgspec.msgpack.Encoder()
        self._decoder = msgspec.msgpack.Decoder(Ready | Outputs | Reply)
        self._calls: dict[int, Future] = {}
        self._next_call = 0
        self._stopped = False
        # A fresh interpreter (not multiprocessing): nothing of the caller's __main__ is re-imported.
        args = json.dumps([settings.model_dump_json(), plugins.loaded_names(), addr_in, addr_out, os.getpid()])
        # Idle OpenMP workers must sleep, not spin: they would take the cores the server process
        # needs for HTTP and tokenization (a 4-5x slowdown on small machines).
        env = {"OMP_WAIT_POLICY": "PASSIVE", **os.environ}
        if settings.cuda_visible_devices is not None:
            env["CUDA_VISIBLE_DEVICES"] = settings.cuda_visible_devices
        self.process = subprocess.Popen([sys.executable, "-m", "sglang_core.core_client", args], env=env)
        self.info = self._wait_ready(start_timeout_s)
        self.alive = True
        self._thread = threading.Thread(target=self._receive, name="sglang-core-receiver", daemon=True)
        self._thread.start()

    def _wait_ready(self, timeout_s: float) -> ModelInfo:
        waited = 0.0
        while not self._in.poll(500):
            waited += 0.5
            if self.process.poll() is not None or waited > timeout_s:
                self._close()
                raise RuntimeError("the engine process failed to start (see its log above)")
        msg = self._decoder.decode(self._in.recv())
        if not isinstance(msg, Ready) or msg.error:
            self._close()
            raise ValueError(msg.error if isinstance(msg, Ready) else "unexpected first message from the engine")
        info = dict(msg.info)
        info["eos_token_ids"] = tuple(info["eos_token_ids"])
        return ModelInfo(**info)

    def add(self, request: GenerateRequest) -> None:
        self._send(Add(request))

    def abort(self, rid: str) -> None:
        self._send(Abort(rid))

    def call(self, name: str) -> Any:
        future: Future = Future()
        with self._send_lock:
            self._next_call += 1
            call_id = self._next_call
            self._calls[call_id] = future
        if not self.alive:
            raise RuntimeError("the engine process is not running")
        self._send(Call(call_id, name))
        return future.result(timeout=60)

    def shutdown(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        if self.process.poll() is None:
            self._send(Shutdown())
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=5)
        self._thread.join(timeout=5)
        self.alive = False
        self._close()

    def _send(self, msg: msgspec.Struct) -> None:
        data = self._encoder.encode(msg)
        with self._send_lock:
            self._out.send(data)

    def _receive(self) -> None:
        while True:
            if self._in.poll(200):
                msg = self._decoder.decode(self._in.recv())
                if isinstance(msg, Outputs):
                    self._deliver(msg.outputs)
                elif isinstance(msg, Reply):
                    future = self._calls.pop(msg.call_id)
                    if msg.error is None:
                        future.set_result(msg.result)
                    else:
                        try:
                            _raise_reply(msg.error, msg.error_type)
                        except Exception as exc:
                            future.set_exception(exc)
            elif self.process.poll() is not None:
                self.alive = False
                for future in self._calls.values():
                    future.set_exception(RuntimeError("the engine process died"))
                self._calls.clear()
                if not self._stopped:
                    logger.error("the engine process died (exit code %s)", self.process.returncode)
                    self._on_death()
                return

    def _close(self) -> None:
        self._out.close(linger=0)
        self._in.close(linger=0)
        self._ctx.term()
        shutil.rmtree(self._dir, ignore_errors=True)


if __name__ == "__main__":
    engine_process_main(*json.loads(sys.argv[1]))

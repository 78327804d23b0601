"""asyncio front of the Engine for the server: one thread runs engine.step() while there is work and hands
each output to the event loop of the request it belongs to. That thread is a Stepper's: a background one, or
the caller's own with `run()`. `hearth serve` steps on the main thread, because an OpenMP parallel region
started from any other thread costs ~90 us with GNU OpenMP instead of ~5 (measured: a Q4_0 decode step at
Qwen2.5-0.5B shapes took 34-39 ms in a thread against 18-21 ms on the main thread). A server with several
models loaded steps them all from that one thread, one step of each in turn."""

from __future__ import annotations

import asyncio
import itertools
import threading
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

from .engine import Engine, EngineStats, RequestOutput
from .sampler import SamplingParams


class Stepper:
    """The one thread that steps engines: each engine with work takes one step in turn; with none, it sleeps
    until an engine is given work. `start()` runs it in a background thread, `run()` in the caller's."""

    def __init__(self):
        self.wake = threading.Event()
        self._engines: list[AsyncEngine] = []
        self._lock = threading.Lock()
        self._stopped = False
        self._thread: threading.Thread | None = None

    def add(self, engine: AsyncEngine) -> None:
        with self._lock:
            self._engines.append(engine)
        self.wake.set()

    def remove(self, engine: AsyncEngine) -> None:
        with self._lock:
            if engine in self._engines:
                self._engines.remove(engine)

    def start(self) -> Stepper:
        self._thread = threading.Thread(target=self.run, name="hearthlm-engine", daemon=True)
        self._thread.start()
        return self

    def run(self) -> None:
        """Step until stop()."""
        while not self._stopped:
            with self._lock:
                engines = list(self._engines)
            busy = False
            for e in engines:
                busy = e.tick() or busy
            if not busy:
                self.wake.wait()
                self.wake.clear()

    def stop(self) -> None:
        self._stopped = True
        self.wake.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()


class AsyncEngine:
    def __init__(self, engine: Engine, background: bool = True, stepper: Stepper | None = None):
        """`stepper`: the thread that steps this engine, shared with other engines; none given, the engine gets
        its own, started now (`background`) or run by the caller with run()."""
        self.engine = engine
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._aborts: list[str] = []  # ids whose consumers went away; aborted by the step thread
        self._jobs: list[tuple[Callable[[], Any], asyncio.AbstractEventLoop, asyncio.Future]] = []
        self._lock = threading.Lock()
        self._stopped = False
        self._ids = itertools.count()
        self._own = stepper is None
        self.stepper = stepper or Stepper()
        self._wake = self.stepper.wake
        self.stepper.add(self)
        if self._own and background:
            self.stepper.start()

    def run(self) -> None:
        """Step in the calling thread until shutdown() (an engine made with background=False)."""
        if not self._own or self.stepper._thread is not None:
            raise RuntimeError("this AsyncEngine is stepped by another thread")
        self.stepper.run()

    async def call(self, work: Callable[[], Any]) -> Any:
        """Run `work()` on the step thread, between two steps (e.g. one batched embedding forward), and return
        its result; it never runs alongside a step of any engine of that thread."""
        if self._stopped:
            raise RuntimeError("AsyncEngine is shut down")
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        with self._lock:
            self._jobs.append((work, loop, future))
        self._wake.set()
        return await future

    async def generate(
        self,
        prompt: list[int],
        params: SamplingParams,
        request_id: str | None = None,
        media=None,
        client: str | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Stream one request's outputs until the finished one. Invalid input raises before the first output.
        If the consumer stops iterating (aclose, cancellation, a dropped client), the request is aborted.
        `client`: who asked (server/clients.py), for an engine that isolates clients."""
        if self._stopped:
            raise RuntimeError("AsyncEngine is shut down")
        rid = request_id or f"req-{uuid.uuid4().hex[:12]}-{next(self._ids)}"
        queue: asyncio.Queue = asyncio.Queue()
        with self._lock:
            if rid in self._streams:
                raise ValueError(f"request id {rid!r} is already in use by an unfinished request")
            self._streams[rid] = (asyncio.get_running_loop(), queue)
        finished = False
        try:
            if params.constrained:  # compiling a grammar can take a while: not on the event loop
                await asyncio.to_thread(self.engine.prepare, params)
            self.engine.add_request(rid, prompt, params, media, client=client)
            self._wake.set()
            while True:
                item = await queue.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            with self._lock:
                self._streams.pop(rid, None)
                if not finished:
                    self._aborts.append(rid)
            self._wake.set()

    def stats(self) -> EngineStats:
        return self.engine.stats()

    def shutdown(self) -> None:
        """Stop stepping this engine (and its own thread, if it has one); unfinished requests are aborted and
        their consumers get RuntimeError."""
        self._stopped = True
        self.stepper.remove(self)
        if self._own:
            self.stepper.stop()
        with self._lock:
            streams, self._streams = dict(self._streams), {}
            jobs, self._jobs = self._jobs, []
        for rid in streams:
            self.engine.abort(rid)
        for loop, queue in streams.values():
            self._deliver(loop, queue, RuntimeError("the engine was shut down"))
        for _, loop, future in jobs:
            self._settle(loop, future, error=RuntimeError("the engine was shut down"))

    # -- the step thread ---------------------------------------------------------------------------
    def tick(self) -> bool:
        """One turn on the step thread: aborts, queued calls, then one step if a request is unfinished.
        Returns whether there was work."""
        with self._lock:
            aborts, self._aborts = self._aborts, []
            jobs, self._jobs = self._jobs, []
        for rid in aborts:
            self.engine.abort(rid)
        for work, loop, future in jobs:
            try:
                self._settle(loop, future, result=work())
            except Exception as e:
                self._settle(loop, future, error=e)
        if self._stopped or not self.engine.has_unfinished():
            return bool(jobs)
        try:
            outputs = self.engine.step()
        except Exception as e:  # a bug or an out-of-memory: fail every open request, keep serving
            self._fail_all(e)
            return True
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, Any]]] = {}
        with self._lock:
            for out in outputs:
                target = self._streams.get(out.request_id)
                if target is not None:  # a request that failed alone gets its error; the others go on
                    item = RuntimeError(f"generation failed: {out.error}") if out.error else out
                    by_loop.setdefault(target[0], []).append((target[1], item))
        for loop, items in by_loop.items():  # one wake-up of each event loop per step, not one per request
            self._deliver_all(loop, items)
        return True

    @staticmethod
    def _settle(loop: asyncio.AbstractEventLoop, future: asyncio.Future, result: Any = None, error=None) -> None:
        def settle() -> None:
            if not future.done():
                future.set_exception(error) if error is not None else future.set_result(result)

        try:
            loop.call_soon_threadsafe(settle)
        except RuntimeError:  # the caller's loop is closed
            pass

    def _fail_all(self, error: Exception) -> None:
        with self._lock:
            streams = dict(self._streams)
        for rid, (loop, queue) in streams.items():
            self.engine.abort(rid)
            self._deliver(loop, queue, RuntimeError(f"engine step failed: {error!r}"))

    @staticmethod
    def _deliver_all(loop: asyncio.AbstractEventLoop, items: list[tuple[asyncio.Queue, Any]]) -> None:
        def put() -> None:
            for queue, item in items:
                queue.put_nowait(item)

        try:
            loop.call_soon_threadsafe(put)
        except RuntimeError:  # the consumers' loop is closed
            pass

    @staticmethod
    def _deliver(loop: asyncio.AbstractEventLoop, queue: asyncio.Queue, item) -> None:
        try:
            loop.call_soon_threadsafe(queue.put_nowait, item)
        except RuntimeError:  # the consumer's loop is closed
            pass

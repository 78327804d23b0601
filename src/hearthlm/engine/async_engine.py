"""asyncio front of the Engine for the server: one thread runs engine.step() while there is work and hands
each output to the event loop of the request it belongs to. That thread is a background one, or the caller's
own with `background=False` and `run()`: `hearth serve` steps on the main thread, because an OpenMP parallel
region started from any other thread costs ~90 us with GNU OpenMP instead of ~5 (measured: a Q4_0 decode step
at Qwen2.5-0.5B shapes took 34-39 ms in a thread against 18-21 ms on the main thread)."""

from __future__ import annotations

import asyncio
import itertools
import threading
import uuid
from collections.abc import AsyncIterator

from .engine import Engine, EngineStats, RequestOutput
from .sampler import SamplingParams


class AsyncEngine:
    def __init__(self, engine: Engine, background: bool = True):
        self.engine = engine
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._aborts: list[str] = []  # ids whose consumers went away; aborted by the step thread
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stopped = False
        self._ids = itertools.count()
        self._thread = threading.Thread(target=self._loop, name="hearthlm-engine", daemon=True) if background else None
        if self._thread is not None:
            self._thread.start()

    def run(self) -> None:
        """Step in the calling thread until shutdown() (an engine made with background=False)."""
        if self._thread is not None:
            raise RuntimeError("this AsyncEngine steps in its own background thread")
        self._loop()

    async def generate(
        self, prompt: list[int], params: SamplingParams, request_id: str | None = None
    ) -> AsyncIterator[RequestOutput]:
        """Stream one request's outputs until the finished one. Invalid input raises before the first output.
        If the consumer stops iterating (aclose, cancellation, a dropped client), the request is aborted."""
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
            self.engine.add_request(rid, prompt, params)
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
        """Stop the step thread; unfinished requests are aborted and their consumers get RuntimeError."""
        self._stopped = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join()
        with self._lock:
            streams, self._streams = dict(self._streams), {}
        for rid in streams:
            self.engine.abort(rid)
        for loop, queue in streams.values():
            self._deliver(loop, queue, RuntimeError("the engine was shut down"))

    # -- the step thread ---------------------------------------------------------------------------
    def _loop(self) -> None:
        while not self._stopped:
            with self._lock:
                aborts, self._aborts = self._aborts, []
            for rid in aborts:
                self.engine.abort(rid)
            if not self.engine.has_unfinished():
                self._wake.wait()
                self._wake.clear()
                continue
            try:
                outputs = self.engine.step()
            except Exception as e:  # a bug or an out-of-memory: fail every open request, keep serving
                self._fail_all(e)
                continue
            for out in outputs:
                with self._lock:
                    target = self._streams.get(out.request_id)
                if target is not None:
                    self._deliver(*target, out)

    def _fail_all(self, error: Exception) -> None:
        with self._lock:
            streams = dict(self._streams)
        for rid, (loop, queue) in streams.items():
            self.engine.abort(rid)
            self._deliver(loop, queue, RuntimeError(f"engine step failed: {error!r}"))

    @staticmethod
    def _deliver(loop: asyncio.AbstractEventLoop, queue: asyncio.Queue, item) -> None:
        try:
            loop.call_soon_threadsafe(queue.put_nowait, item)
        except RuntimeError:  # the consumer's loop is closed
            pass

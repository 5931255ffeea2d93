"""Fair admission to a one-at-a-time model: a bounded FIFO queue, a short wait list, honest Retry-After.

The model serves one request at a time, so requests queue. :class:`FifoWorker`
runs them on one worker thread in arrival order. At most ``max_queue`` are
admitted (running or queued). A request that finds the queue full does not
get an instant 429: it joins a wait list (at most ``max_queue`` long) and is
admitted, in arrival order, as soon as a slot frees, the freed slot passing
straight to the oldest waiter so a newcomer cannot jump ahead. Only a request
that waits longer than about two requests' run time per place ahead of it,
or finds the wait list full too, is refused: :class:`~premoe.guard.ApiError`
429 with ``Retry-After`` (seconds until the backlog ahead of it should drain).

Example::

    worker = FifoWorker(max_queue=8)
    future = await worker.admit(lambda: model_call())   # concurrent.futures.Future
    result = await asyncio.wrap_future(future)
"""
from __future__ import annotations

import asyncio
import math
import queue
import threading
import time
from collections import deque
from concurrent.futures import Future
from typing import Callable

from premoe.guard import ApiError

MAX_WAIT_S = 10.0  # the longest a request waits for admission, whatever the estimate


class FifoWorker:
    """One worker thread, a bounded FIFO of admitted work, and a FIFO wait list in front of it."""

    def __init__(self, max_queue: int, name: str = "premoe-worker", on_count: Callable[..., None] | None = None):
        self.max_queue, self.name = max_queue, name
        self._count = on_count or (lambda **kw: None)  # reports in_flight / waiting changes to the metrics
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()  # (work, future), in admission order
        self._waitlist: deque = deque()  # (loop, asyncio future) of requests waiting for a slot, oldest first
        self._admitted = 0  # running or queued
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self.seconds_per_job = 1.0  # running mean of one request's run time (first guess: 1 s)

    # ------------------------------------------------------------------ admission

    async def admit(self, work: Callable[[], object]) -> Future:
        """Queue ``work``; wait (FIFO) for a slot when the queue is full; 429 when none frees in time.

        Cancelling the returned future before the worker reaches it means the
        work never runs (a client that left while queued).
        """
        with self._lock:
            if self._admitted < self.max_queue and not self._waitlist:
                self._admitted += 1
                entry = None
            elif len(self._waitlist) < self.max_queue:
                entry = (asyncio.get_running_loop(), asyncio.get_running_loop().create_future())
                self._waitlist.append(entry)
                wait = min(MAX_WAIT_S, 2 * self.seconds_per_job * len(self._waitlist))
            else:
                raise self._busy()
        if entry is None:
            self._count(in_flight=1)
        else:
            await self._wait_for_slot(entry, wait)
        return self._enqueue(work)

    async def _wait_for_slot(self, entry, wait: float) -> None:
        """Return holding a slot (passed on by the worker), or raise 429 having left the wait list."""
        self._count(waiting=1)
        try:
            await asyncio.wait_for(asyncio.shield(entry[1]), wait)
        except (asyncio.TimeoutError, asyncio.CancelledError) as e:
            with self._lock:
                waiting = entry in self._waitlist
                if waiting:
                    self._waitlist.remove(entry)
            if not waiting:  # the slot arrived as the wait ended: use it, or hand it back if cancelled
                if isinstance(e, asyncio.CancelledError):
                    self._release()
                    raise
                return
            if isinstance(e, asyncio.CancelledError):
                raise
            raise self._busy() from None
        finally:
            self._count(waiting=-1)

    def _busy(self) -> ApiError:
        ahead = self._admitted + len(self._waitlist)
        seconds = max(1, math.ceil(self.seconds_per_job * (len(self._waitlist) + 1)))
        return ApiError(429, f"the server is busy ({ahead} requests running or waiting); retry in about {seconds} s",
                        "rate_limit_exceeded", "rate_limit_error", headers={"Retry-After": str(seconds)})

    def _enqueue(self, work) -> Future:
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._work_forever, name=self.name, daemon=True)
                self._thread.start()
        future: Future = Future()
        self._jobs.put((work, future))
        return future

    def _release(self) -> None:
        """A slot frees: it passes to the oldest waiter, else the count drops."""
        with self._lock:
            if self._waitlist:
                loop, waiter = self._waitlist.popleft()
                try:
                    loop.call_soon_threadsafe(_resolve, waiter)
                    return
                except RuntimeError:  # its event loop has closed (server shut down): nobody to pass it to
                    pass
            self._admitted -= 1
        self._count(in_flight=-1)

    # ------------------------------------------------------------------ the worker

    def _work_forever(self) -> None:
        """One request at a time, first come first served."""
        while True:
            work, future = self._jobs.get()
            started = time.perf_counter()
            ran = future.set_running_or_notify_cancel()  # False: cancelled while queued, never runs
            result, error = None, None
            if ran:
                try:
                    result = work()
                except BaseException as e:  # noqa: BLE001 - handed to whoever awaits the future
                    error = e
                with self._lock:
                    self.seconds_per_job = 0.8 * self.seconds_per_job + 0.2 * (time.perf_counter() - started)
            self._release()  # before the client hears back, so a finished request never holds a slot
            if error is not None:
                future.set_exception(error)
            elif ran:
                future.set_result(result)

    @property
    def admitted(self) -> int:
        return self._admitted


def _resolve(waiter: asyncio.Future) -> None:
    if not waiter.done():
        waiter.set_result(None)

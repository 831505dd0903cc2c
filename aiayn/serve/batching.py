"""Batching for a server: requests that arrive close together are decoded together.

Every job (one sentence, say) goes into a bounded queue with its cost in tokens and a key (jobs of
different keys, e.g. beam sizes, cannot share a batch); a full queue refuses new jobs at once
(QueueFull: the server answers 503 with Retry-After). A single task on the event loop runs the
model in its worker thread, off the event loop. Two ways to batch:

- DynamicBatcher (beam search): waits for the first job, gathers more while they keep coming
  (until none came for `gap_ms`), for at most `max_wait_ms` after the oldest one arrived, or until
  `max_tokens` are queued: a lone request waits `gap_ms`, a burst of clients is gathered into one
  batch. It then takes the jobs of one key up to that budget, sorted by length, and decodes them.
- ContinuousBatcher (greedy search, aiayn.decode.continuous): one decoding step at a time; queued
  jobs join the rows in flight at any step and each leaves with its result as soon as it ends, so
  the batch stays full and no request waits for a longer one.

In both, an exception goes to every job it concerns, so no request hangs, and a job whose future
was cancelled (its client went away) is dropped: before it starts, or (continuous) at the next step.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any

from aiayn.errors import InputError


class QueueFull(Exception):
    """The batcher's queue has no room for the jobs of a request."""

    def __init__(self, queued: int, limit: int):
        super().__init__(f"the server is busy ({queued} jobs queued, the limit is {limit}); retry shortly")


@dataclass
class _Job:
    key: Hashable
    item: Any
    cost: int
    future: asyncio.Future
    arrived: float = field(default_factory=time.monotonic)


class _Batcher:
    """The queue, submit and stop that both batchers share; a subclass runs `_loop`."""

    def __init__(self, executor: Executor, max_queue: int):
        if max_queue < 1:
            raise InputError("max_queue must be >= 1")
        self.executor, self.max_queue = executor, max_queue
        self._queue: deque[_Job] = deque()
        self._arrived: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        # for /healthz and tests: batches (decoding steps, when continuous) run, the jobs in them
        # (rows in them), jobs dropped because their client left
        self.batches = self.jobs = self.dropped = 0

    def __len__(self) -> int:
        return len(self._queue)

    def start(self) -> None:
        self._arrived = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._loop(), name=f"aiayn-{type(self).__name__}")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        while self._queue:  # nobody will run these any more
            _fail([self._queue.popleft()], RuntimeError("the server is shutting down"))

    async def submit(self, key: Hashable, items: Sequence, costs: Sequence[int]) -> list:
        """Queue the items (all or none) and wait for their results. Cancelling the caller (a client
        that disconnected) cancels its jobs: those not yet started are dropped."""
        if self._task is None:
            raise RuntimeError("the batcher is not started")
        if len(self._queue) + len(items) > self.max_queue:
            raise QueueFull(len(self._queue), self.max_queue)
        loop = asyncio.get_running_loop()
        jobs = [_Job(key, item, max(1, int(cost)), loop.create_future()) for item, cost in zip(items, costs)]
        self._queue.extend(jobs)
        self._arrived.set()
        try:
            return list(await asyncio.gather(*(job.future for job in jobs)))
        except BaseException:
            for job in jobs:  # e.g. cancelled: the jobs not yet started are dropped when they come up
                job.future.cancel()
            raise

    async def _loop(self) -> None:
        raise NotImplementedError


def _fail(jobs, e: BaseException) -> None:
    """Every job still waiting gets `e` (a cancellation: the server is shutting down)."""
    for job in jobs:
        if not job.future.done():
            job.future.set_exception(e if isinstance(e, Exception) else RuntimeError("the server is shutting down"))


class DynamicBatcher(_Batcher):
    """run_batch(key, items) -> results (one per item, in order), called in `executor`.

    Use: `await batcher.submit(key, items, costs)` from request handlers, between `start()` and
    `await stop()` on the same event loop.
    """

    def __init__(self, run_batch: Callable[[Hashable, list], Sequence], executor: Executor,
                 max_wait_ms: float = 20.0, max_tokens: int = 8192, max_queue: int = 512, gap_ms: float = 2.0):
        if max_wait_ms < 0 or gap_ms < 0 or max_tokens < 1 or max_queue < 1:
            raise InputError("max_wait_ms and gap_ms must be >= 0, max_tokens and max_queue >= 1")
        super().__init__(executor, max_queue)
        self.run_batch = run_batch
        self.max_wait, self.gap, self.max_tokens = max_wait_ms / 1000, gap_ms / 1000, max_tokens

    # ------------------------------------------------------------------------------ the loop
    def _queued_tokens(self) -> int:
        return sum(job.cost for job in self._queue)

    def _take(self) -> list[_Job]:
        """The first live job's key, and up to max_tokens of the queued jobs of that key (at least one)."""
        while self._queue and self._queue[0].future.done():
            self._queue.popleft()
            self.dropped += 1
        if not self._queue:
            return []
        key, taken, kept, budget = self._queue[0].key, [], deque(), self.max_tokens
        for job in self._queue:
            if job.future.done():
                self.dropped += 1
            elif job.key == key and (not taken or job.cost <= budget):
                taken.append(job)
                budget -= job.cost
            else:
                kept.append(job)
        self._queue = kept
        return sorted(taken, key=lambda job: job.cost)

    async def _gather(self) -> None:
        """Wait until max_tokens are queued, no job came for `gap`, or the oldest has waited max_wait."""
        while self._queue and self._queued_tokens() < self.max_tokens:
            now = time.monotonic()
            left = min(self._queue[0].arrived + self.max_wait, self._queue[-1].arrived + self.gap) - now
            if left <= 0:
                return
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), left)
            except asyncio.TimeoutError:
                return

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._queue:
                self._arrived.clear()
                await self._arrived.wait()
            await self._gather()
            jobs = self._take()
            if not jobs:
                continue
            self.batches += 1
            self.jobs += len(jobs)
            try:
                results = await loop.run_in_executor(self.executor, self.run_batch, jobs[0].key,
                                                     [job.item for job in jobs])
                if len(results) != len(jobs):
                    raise RuntimeError(f"a batch of {len(jobs)} jobs gave {len(results)} results")
            except (Exception, asyncio.CancelledError) as e:  # every waiting request gets it: none hangs
                _fail(jobs, e)
                if isinstance(e, asyncio.CancelledError):
                    raise
                continue
            for job, result in zip(jobs, results):
                if not job.future.done():
                    job.future.set_result(result)


STEPS_PER_CALL = 8  # decoding steps a ContinuousBatcher runs in one call to its executor, at most


class ContinuousBatcher(_Batcher):
    """Jobs decoded with continuous batching: `make_stream(key, max_rows)` gives a key's stream
    (made once, in `executor`), with `add(items)` -> handles, `step()` -> [(handle, result)] of the
    rows that ended, `drop(handles)`; each call to it runs in `executor`, one decoding step at a
    time, so other work on that thread (text generation) takes its turn between steps.

    Before each step the rows of given-up requests are dropped, and queued jobs join if there is
    room and enough of them: at least a quarter as many as the rows in flight (the encoder then runs
    on groups, not on one sentence a step: on the shipped model, one sentence a step cost 1.25x the
    CPU of joining in groups), or the oldest has waited `max_wait_ms`, or nothing is in flight. If a
    step fails, the exception goes to every job of that stream, which starts afresh.
    """

    def __init__(self, make_stream: Callable[[Hashable, int], Any], executor: Executor, max_rows: int = 64,
                 max_wait_ms: float = 20.0, max_queue: int = 512):
        if max_rows < 1 or max_wait_ms < 0:
            raise InputError("max_rows must be >= 1 and max_wait_ms >= 0")
        super().__init__(executor, max_queue)
        self.make_stream, self.max_rows, self.max_wait = make_stream, max_rows, max_wait_ms / 1000
        self._streams: dict[Hashable, Any] = {}                  # key -> its stream (touched in executor)
        self._flight: dict[Hashable, dict[Any, _Job]] = {}       # key -> {handle: job} of the rows in flight

    async def stop(self) -> None:
        await super().stop()
        for flight in self._flight.values():
            _fail(flight.values(), RuntimeError("the server is shutting down"))
        self._flight.clear()

    async def _loop(self) -> None:
        while True:
            if any(job.future.done() for job in self._queue):  # given up before they joined
                kept = deque(job for job in self._queue if not job.future.done())
                self.dropped += len(self._queue) - len(kept)
                self._queue = kept
            busy = [key for key, flight in self._flight.items() if flight]
            if not busy and not self._queue:
                self._arrived.clear()
                await self._arrived.wait()
                continue
            for key in dict.fromkeys(busy + [job.key for job in self._queue]):  # each key a step in turn
                await self._advance(key)

    def _joining(self, key: Hashable, in_flight: int) -> list[_Job]:
        """The queued jobs of `key` that join now (see the class), out of the queue."""
        waiting = [job for job in self._queue if job.key == key and not job.future.done()]
        room = self.max_rows - in_flight
        if not waiting or not room or (in_flight and len(waiting) < max(1, in_flight // 4)
                                       and time.monotonic() - waiting[0].arrived < self.max_wait):
            return []
        joining = waiting[:room]
        taken = {id(job) for job in joining}
        self._queue = deque(job for job in self._queue if id(job) not in taken)
        return joining

    async def _advance(self, key: Hashable) -> None:
        flight = self._flight.setdefault(key, {})
        gone = [handle for handle, job in flight.items() if job.future.done()]
        for handle in gone:
            del flight[handle]
        self.dropped += len(gone)
        joining = self._joining(key, len(flight))
        try:
            handles, finished, steps = await asyncio.get_running_loop().run_in_executor(
                self.executor, self._step, key, [job.item for job in joining], gone)
        except (Exception, asyncio.CancelledError) as e:  # every request of the stream gets it: none hangs
            _fail([*flight.values(), *joining], e)
            flight.clear()
            self._streams.pop(key, None)
            if isinstance(e, asyncio.CancelledError):
                raise
            return
        flight.update(zip(handles, joining))
        self.batches += steps
        self.jobs += steps * len(flight)
        for handle, result in finished:
            job = flight.pop(handle)
            if not job.future.done():
                job.future.set_result(result)

    def _step(self, key: Hashable, items: list, gone: list) -> tuple[list, list, int]:
        """In the executor: drop, add, then steps until a row ends, a job is queued, or
        `STEPS_PER_CALL` (at low load, fewer hops between threads: one sentence alone took 25%
        more CPU with a hop per step)."""
        stream = self._streams.get(key)
        if stream is None:
            stream = self._streams[key] = self.make_stream(key, self.max_rows)
        stream.drop(gone)
        handles = stream.add(items)
        for steps in range(1, STEPS_PER_CALL + 1):
            finished = stream.step()
            if finished or self._queue:  # (read from this thread: a deque's length, under the GIL)
                break
        return handles, finished, steps

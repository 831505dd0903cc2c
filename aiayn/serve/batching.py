"""Dynamic batching: requests that arrive close together are decoded together.

Every job (one sentence, say) goes into a bounded queue with its cost in tokens and a key (jobs of
different keys, e.g. beam sizes, cannot share a batch). A single task on the event loop waits for
the first job, gathers more while they keep coming (until none came for `gap_ms`), for at most
`max_wait_ms` after the oldest one arrived, or until `max_tokens` are queued: a lone request waits
`gap_ms`, a burst of clients is gathered into one batch. It then takes the jobs of one key up to
that budget, sorted by length, and runs them in the model's worker thread, off the event loop. Then:
- each job's result goes to its own future; an exception goes to every future of the batch, so
  no request hangs;
- a job whose future was cancelled (its client went away) before its batch started is dropped;
- a full queue refuses new jobs at once (QueueFull: the server answers 503 with Retry-After).
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


class DynamicBatcher:
    """run_batch(key, items) -> results (one per item, in order), called in `executor`.

    Use: `await batcher.submit(key, items, costs)` from request handlers, between `start()` and
    `await stop()` on the same event loop.
    """

    def __init__(self, run_batch: Callable[[Hashable, list], Sequence], executor: Executor,
                 max_wait_ms: float = 20.0, max_tokens: int = 8192, max_queue: int = 512, gap_ms: float = 2.0):
        if max_wait_ms < 0 or gap_ms < 0 or max_tokens < 1 or max_queue < 1:
            raise InputError("max_wait_ms and gap_ms must be >= 0, max_tokens and max_queue >= 1")
        self.run_batch, self.executor = run_batch, executor
        self.max_wait, self.gap, self.max_tokens, self.max_queue = max_wait_ms / 1000, gap_ms / 1000, max_tokens, max_queue
        self._queue: deque[_Job] = deque()
        self._arrived: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        # for /healthz and tests: batches run, the jobs in them, jobs dropped because their client left
        self.batches = self.jobs = self.dropped = 0

    def __len__(self) -> int:
        return len(self._queue)

    def start(self) -> None:
        self._arrived = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="aiayn-batcher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        while self._queue:  # nobody will run these any more
            job = self._queue.popleft()
            if not job.future.done():
                job.future.set_exception(RuntimeError("the server is shutting down"))

    async def submit(self, key: Hashable, items: Sequence, costs: Sequence[int]) -> list:
        """Queue the items (all or none) and wait for their results. Cancelling the caller (a client
        that disconnected) cancels the jobs that have not started yet."""
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
                for job in jobs:
                    if not job.future.done():
                        job.future.set_exception(e if isinstance(e, Exception) else
                                                 RuntimeError("the server is shutting down"))
                if isinstance(e, asyncio.CancelledError):
                    raise
                continue
            for job, result in zip(jobs, results):
                if not job.future.done():
                    job.future.set_result(result)

"""DynamicBatcher on a fake model: gathering, budgets, keys, errors, dropped jobs, a full queue."""

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from aiayn.serve.batching import DynamicBatcher, QueueFull


def run(coro):
    return asyncio.run(coro)


class Fake:
    """A model that records its batches; `gate` holds the worker thread until set."""

    def __init__(self, fail: bool = False):
        self.batches, self.fail, self.gate = [], fail, threading.Event()
        self.gate.set()

    def __call__(self, key, items):
        self.gate.wait(5)
        self.batches.append((key, list(items)))
        if self.fail:
            raise RuntimeError("model exploded")
        return [f"{key}:{x}" for x in items]


async def _batcher(fake, **kw):
    b = DynamicBatcher(fake, ThreadPoolExecutor(1), **kw)
    b.start()
    return b


def test_concurrent_requests_share_a_batch_sorted_by_length():
    async def main():
        fake = Fake()
        b = await _batcher(fake, max_wait_ms=50)
        outs = await asyncio.gather(*(b.submit("k", [x], [len(x)]) for x in ["ccc", "a", "bb"]))
        await b.stop()
        return fake, outs

    fake, outs = run(main())
    assert outs == [["k:ccc"], ["k:a"], ["k:bb"]]  # each request gets its own result
    assert fake.batches == [("k", ["a", "bb", "ccc"])]  # one batch, shortest first


def test_token_budget_and_keys_split_batches():
    async def main():
        fake = Fake()
        b = await _batcher(fake, max_wait_ms=50, max_tokens=10)
        outs = await asyncio.gather(b.submit("x", ["1", "2", "3"], [4, 4, 4]), b.submit("y", ["4"], [1]))
        await b.stop()
        return fake, outs

    fake, outs = run(main())
    assert outs == [["x:1", "x:2", "x:3"], ["y:4"]]
    assert [len(items) for _, items in fake.batches] == [2, 1, 1]  # 4 + 4 <= 10 < 12; then key y alone
    assert {key for key, _ in fake.batches} == {"x", "y"}
    assert all(len({k}) == 1 for k, _ in fake.batches)


def test_an_exception_reaches_every_waiting_request():
    async def main():
        b = await _batcher(Fake(fail=True), max_wait_ms=20)
        results = await asyncio.gather(*(b.submit("k", [i], [1]) for i in range(4)), return_exceptions=True)
        # and the batcher goes on serving
        b.run_batch = Fake()
        after = await b.submit("k", ["ok"], [1])
        await b.stop()
        return results, after

    results, after = run(main())
    assert all(isinstance(r, RuntimeError) and "exploded" in str(r) for r in results)
    assert after == ["k:ok"]


def test_a_cancelled_request_is_dropped_and_a_full_queue_refuses():
    async def main():
        fake = Fake()
        fake.gate.clear()  # the worker thread is busy with the first batch
        b = await _batcher(fake, max_wait_ms=0, max_queue=3)
        first = asyncio.ensure_future(b.submit("k", ["first"], [1]))
        await asyncio.sleep(0.05)  # the first batch has started and holds the thread
        gone = asyncio.ensure_future(b.submit("k", ["gone"], [1]))
        kept = asyncio.ensure_future(b.submit("k", ["kept"], [1]))
        await asyncio.sleep(0.01)
        with pytest.raises(QueueFull):
            await b.submit("k", ["a", "b"], [1, 1])  # 2 queued + 2 > 3
        gone.cancel()  # its client went away
        fake.gate.set()
        out = await asyncio.gather(first, kept)
        await b.stop()
        return fake, out, b.dropped

    fake, out, dropped = run(main())
    assert out == [["k:first"], ["k:kept"]]
    assert [items for _, items in fake.batches] == [["first"], ["kept"]]  # "gone" never ran
    assert dropped == 1


def test_a_lone_request_waits_the_gap_not_the_whole_window():
    async def main():
        b = await _batcher(Fake(), max_wait_ms=5000, gap_ms=10)
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        out = await b.submit("k", ["alone"], [1])
        waited = loop.time() - t0
        await b.stop()
        return out, waited

    out, waited = run(main())
    assert out == ["k:alone"] and waited < 2.0  # not the 5 s window


# ------------------------------------------------------------------------------ continuous batching
class FakeStream:
    """A decoder whose item x takes len(x) steps; records each step's rows and the dropped handles."""

    def __init__(self, key, max_rows, log, fail_at=None):
        self.key, self.max_rows, self.log, self.fail_at = key, max_rows, log, fail_at
        self.rows, self.next = {}, 0  # handle -> [item, steps left]

    def add(self, items):
        assert len(self.rows) + len(items) <= self.max_rows
        handles = list(range(self.next, self.next + len(items)))
        self.next += len(items)
        self.rows.update({h: [x, len(x)] for h, x in zip(handles, items)})
        return handles

    def step(self):
        time.sleep(0.005)  # a step takes a while: requests arrive during it
        self.log["steps"].append(sorted(x for x, _ in self.rows.values()))
        if self.fail_at is not None and self.fail_at in [x for x, _ in self.rows.values()]:
            raise RuntimeError("model exploded")
        done = []
        for h, row in list(self.rows.items()):
            row[1] -= 1
            if row[1] == 0:
                done.append((h, f"{self.key}:{row[0]}"))
                del self.rows[h]
        return done

    def drop(self, handles):
        self.log["dropped"] += [self.rows.pop(h)[0] for h in handles if h in self.rows]


async def _continuous(log, fail_at=None, **kw):
    from aiayn.serve.batching import ContinuousBatcher

    log.setdefault("steps", []), log.setdefault("dropped", []), log.setdefault("made", [])

    def make(key, rows):
        log["made"].append(key)
        return FakeStream(key, rows, log, fail_at)

    b = ContinuousBatcher(make, ThreadPoolExecutor(1), **kw)
    b.start()
    return b


def test_continuous_rows_join_at_any_step_and_leave_when_done():
    async def main():
        log = {}
        b = await _continuous(log, max_rows=3, max_wait_ms=0)
        long = asyncio.ensure_future(b.submit("k", ["a" * 20], [20]))
        await asyncio.sleep(0.02)  # it is decoding
        short = await asyncio.gather(*(b.submit("k", [x], [1]) for x in ["b", "cc", "ddd", "e"]))
        out = await long
        await b.stop()
        return log, short, out

    log, short, out = run(main())
    assert short == [["k:b"], ["k:cc"], ["k:ddd"], ["k:e"]] and out == ["k:" + "a" * 20]
    assert max(len(rows) for rows in log["steps"]) == 3            # never more rows than max_rows
    assert log["steps"][-1] == ["a" * 20]  # the short ones joined the long one's batch and left first


def test_continuous_an_exception_reaches_every_job_of_the_stream_which_starts_afresh():
    async def main():
        log = {}
        b = await _continuous(log, fail_at="boom", max_rows=4, max_wait_ms=0)
        results = await asyncio.gather(*(b.submit("k", [x], [1]) for x in ["xx", "boom", "yyy"]),
                                       return_exceptions=True)
        after = await b.submit("k", ["ok"], [1])
        await b.stop()
        return log, results, after

    log, results, after = run(main())
    assert any(isinstance(r, RuntimeError) and "exploded" in str(r) for r in results)
    assert all(isinstance(r, RuntimeError) for r in results if r != ["k:xx"])  # none hangs
    assert after == ["k:ok"] and log["made"] == ["k", "k"]


def test_continuous_a_given_up_request_leaves_the_batch_and_keys_have_their_own_streams():
    async def main():
        log = {}
        b = await _continuous(log, max_rows=4, max_wait_ms=0)
        gone = asyncio.ensure_future(b.submit("k", ["z" * 50], [50]))
        await asyncio.sleep(0.02)
        gone.cancel()  # its client went away mid-sentence
        kept = await asyncio.gather(b.submit("k", ["aa"], [2]), b.submit("j", ["b"], [1]))
        await asyncio.sleep(0.02)
        await b.stop()
        return log, kept, b.dropped

    log, kept, dropped = run(main())
    assert kept == [["k:aa"], ["j:b"]] and sorted(log["made"]) == ["j", "k"]
    assert log["dropped"] == ["z" * 50] and dropped == 1

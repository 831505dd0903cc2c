"""DynamicBatcher on a fake model: gathering, budgets, keys, errors, dropped jobs, a full queue."""

import asyncio
import threading
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

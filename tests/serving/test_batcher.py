"""The dynamic batcher on its own, with a recording stand-in for the networks."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import Future, wait

import pytest

from inserve.server.batcher import BatcherClosed, DeadlineExceeded, DynamicBatcher, Overloaded
from inserve.server.config import BatcherConfig, ConfigError


class Recorder:
    """run(jobs): remembers each batch, optionally blocks until released; result = job * 10."""

    def __init__(self, hold: bool = False) -> None:
        self.batches: list[list[tuple[str, int]]] = []
        self.started = threading.Event()
        self.release = threading.Event()
        if not hold:
            self.release.set()

    def __call__(self, jobs: list[tuple[str, int]]) -> list[int]:
        self.batches.append(list(jobs))
        self.started.set()
        self.release.wait(10)
        return [value * 10 for _, value in jobs]


def batcher(run: Recorder, **config: object) -> DynamicBatcher:
    return DynamicBatcher(run, key=lambda job: job[0], config=BatcherConfig(**config))


def test_concurrent_jobs_share_batches_of_at_most_max_batch_per_bucket() -> None:
    run = Recorder()
    b = batcher(run, max_batch=4, max_delay_ms=200, queue_depth=32)
    try:
        futures = b.submit([("land", i) for i in range(6)] + [("port", 100 + i) for i in range(3)])
        assert [f.result(5) for f in futures] == [i * 10 for i in range(6)] + [(100 + i) * 10 for i in range(3)]
    finally:
        b.close()
    assert sorted(len(batch) for batch in run.batches) == [2, 3, 4]
    assert all(len({key for key, _ in batch}) == 1 for batch in run.batches)  # buckets never mix
    assert b.batch_sizes == {4: 1, 3: 1, 2: 1}


def test_a_lone_job_waits_at_most_max_delay() -> None:
    run = Recorder()
    b = batcher(run, max_batch=8, max_delay_ms=50, queue_depth=8)
    try:
        start = time.monotonic()
        (future,) = b.submit([("land", 1)])
        assert future.result(5) == 10
        elapsed = time.monotonic() - start
    finally:
        b.close()
    assert 0.04 <= elapsed < 1.0
    assert run.batches == [[("land", 1)]]


def test_a_full_queue_refuses_new_work_and_recovers() -> None:
    run = Recorder(hold=True)
    b = batcher(run, max_batch=1, max_delay_ms=0, queue_depth=2)
    try:
        (running,) = b.submit([("land", 0)])
        assert run.started.wait(5)  # the runner holds job 0; the queue is empty again
        queued = b.submit([("land", 1), ("land", 2)])
        assert b.depth == 2
        with pytest.raises(Overloaded, match="limit 2"):
            b.submit([("land", 3)])
        run.release.set()
        assert [f.result(5) for f in [running, *queued]] == [0, 10, 20]
        (later,) = b.submit([("land", 4)])
        assert later.result(5) == 40
    finally:
        run.release.set()
        b.close()


def test_wait_blocks_until_there_is_room() -> None:
    run = Recorder(hold=True)
    b = batcher(run, max_batch=1, max_delay_ms=0, queue_depth=1)
    try:
        b.submit([("land", 0)])
        assert run.started.wait(5)
        b.submit([("land", 1)])
        threading.Timer(0.2, run.release.set).start()
        (future,) = b.submit([("land", 2)], wait=True)
        assert future.result(5) == 20
    finally:
        run.release.set()
        b.close()


def test_a_cancelled_job_leaves_the_queue_and_never_runs() -> None:
    run = Recorder(hold=True)
    b = batcher(run, max_batch=1, max_delay_ms=0, queue_depth=3)
    try:
        b.submit([("land", 0)])
        assert run.started.wait(5)
        doomed, kept = b.submit([("land", 1), ("land", 2)])
        assert doomed.cancel()
        assert b.depth == 1  # its place is free at once
        b.submit([("land", 3), ("land", 4)])  # fits only because the cancelled job left
        run.release.set()
        assert kept.result(5) == 20
    finally:
        run.release.set()
        b.close()
    assert ("land", 1) not in [job for batch in run.batches for job in batch]


def test_a_job_past_its_deadline_fails_instead_of_running() -> None:
    run = Recorder(hold=True)
    b = batcher(run, max_batch=1, max_delay_ms=0, queue_depth=4)
    try:
        b.submit([("land", 0)])
        assert run.started.wait(5)
        (late,) = b.submit([("land", 1)], deadline=time.monotonic() + 0.05)
        time.sleep(0.1)
        run.release.set()
        with pytest.raises(DeadlineExceeded):
            late.result(5)
    finally:
        run.release.set()
        b.close()
    assert ("land", 1) not in [job for batch in run.batches for job in batch]


def test_a_failing_batch_fails_its_jobs_only() -> None:
    def run(jobs: list[tuple[str, int]]) -> list[int]:
        if any(value < 0 for _, value in jobs):
            raise RuntimeError("engine failed")
        return [value for _, value in jobs]

    b = DynamicBatcher(run, key=lambda job: job[0], config=BatcherConfig(max_batch=4, max_delay_ms=0))
    try:
        (bad,) = b.submit([("land", -1)])
        with pytest.raises(RuntimeError, match="engine failed"):
            bad.result(5)
        (good,) = b.submit([("land", 7)])
        assert good.result(5) == 7
    finally:
        b.close()


def test_close_runs_what_is_queued_then_refuses() -> None:
    run = Recorder()
    b = batcher(run, max_batch=2, max_delay_ms=10_000, queue_depth=8)
    futures = b.submit([("land", i) for i in range(3)])
    b.close()
    wait(futures, 5)
    assert [f.result() for f in futures] == [0, 10, 20]
    with pytest.raises(BatcherClosed):
        b.submit([("land", 9)])


def test_config_must_let_a_batch_fit_the_queue() -> None:
    with pytest.raises(ConfigError, match="need max_batch <= queue_depth"):
        batcher(Recorder(), max_batch=8, queue_depth=4)


def test_cancelling_the_awaiting_call_frees_its_place_in_the_queue() -> None:
    """What the servicer relies on: a handler awaits its job through asyncio.wrap_future, and gRPC cancels the
    handler when its call is cancelled; the job must then leave the queue at once, not when a runner reaches it."""
    run = Recorder(hold=True)
    b = batcher(run, max_batch=1, max_delay_ms=0, queue_depth=2)

    async def cancel_one() -> Future:
        (future,) = b.submit([("land", 1)])
        awaiting = asyncio.ensure_future(asyncio.wrap_future(future))
        await asyncio.sleep(0.01)
        assert b.depth == 1
        awaiting.cancel()
        await asyncio.sleep(0)
        return future

    try:
        b.submit([("land", 0)])
        assert run.started.wait(5)
        future = asyncio.run(cancel_one())
        assert future.cancelled() and b.depth == 0
        b.submit([("land", 2), ("land", 3)])  # both places are free although the runner is still busy
        run.release.set()
    finally:
        run.release.set()
        b.close()
    assert ("land", 1) not in [job for batch in run.batches for job in batch]


def urgent_batcher(run: Recorder, **config: object) -> DynamicBatcher:
    """Jobs keyed "q..." are searches (urgent)."""
    return DynamicBatcher(run, lambda job: job[0], BatcherConfig(**config), urgent=lambda job: job[0][0] == "q")


def test_searches_batch_apart_and_run_before_older_work() -> None:
    run = Recorder(hold=True)
    b = urgent_batcher(run, max_batch=4, max_delay_ms=1, queue_depth=16, urgent_runners=0)
    try:
        (first,) = b.submit([("land", 1)])
        assert run.started.wait(5)  # running, held
        later = b.submit([("land", 2), ("land", 3)])
        time.sleep(0.05)  # due before the search arrives
        search = b.submit([("q-land", 4)])
        run.release.set()
        assert [f.result(5) for f in [first, *later, *search]] == [10, 20, 30, 40]
    finally:
        b.close()
    assert run.batches == [[("land", 1)], [("q-land", 4)], [("land", 2), ("land", 3)]]


def test_a_search_does_not_wait_for_the_batch_running() -> None:
    run = Recorder(hold=True)
    b = urgent_batcher(run, max_batch=4, max_delay_ms=1, queue_depth=16)  # one urgent runner, the default
    try:
        (describing,) = b.submit([("land", 1)])
        assert run.started.wait(5)
        (search,) = b.submit([("q-land", 2)])
        waited = time.monotonic()
        while len(run.batches) < 2 and time.monotonic() - waited < 5:  # the search's batch started meanwhile
            time.sleep(0.01)
        assert run.batches[1] == [("q-land", 2)] and not describing.done()
        run.release.set()
        assert search.result(5) == 20 and describing.result(5) == 10
    finally:
        b.close()

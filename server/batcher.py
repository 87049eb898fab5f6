"""The dynamic batcher shared by every RPC: jobs wait briefly for company of their shape bucket, then run
together, so concurrent callers share one engine run instead of queueing behind each other.

A batch closes when it holds max_batch jobs or its oldest job has waited max_delay_ms. The queue is
bounded (back-pressure): jobs that do not fit are refused with Overloaded, never buffered. A job whose
future is cancelled leaves the queue at once; one whose deadline passes is failed with
DeadlineExceeded instead of being run.

Urgent jobs (searches) batch only with urgent jobs and run first; `urgent_runners` threads run nothing else,
so a search never waits for a batch of images to describe (seconds of DASR work) to finish.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Hashable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from inserve.server.config import BatcherConfig
from inserve.server.errors import BatcherClosed, DeadlineExceeded, Overloaded

log = logging.getLogger(__name__)

J = TypeVar("J")
R = TypeVar("R")


@dataclass(eq=False)
class _Item(Generic[J, R]):
    job: J
    key: tuple[bool, Hashable]  # (urgent, the job's shape key)
    future: Future = field(default_factory=Future)
    enqueued: float = field(default_factory=time.monotonic)
    deadline: float | None = None  # time.monotonic() seconds


class DynamicBatcher(Generic[J, R]):
    """Runs `run(jobs)` -> results (same order) on batches of jobs with the same `key(job)`."""

    def __init__(
        self,
        run: Callable[[list[J]], list[R]],
        key: Callable[[J], Hashable],
        config: BatcherConfig,
        name: str = "batcher",
        urgent: Callable[[J], bool] = lambda job: False,
    ) -> None:
        self._run = run
        self._key = lambda job: (urgent(job), key(job))
        self.config = config
        self._delay = config.max_delay_ms / 1000.0
        self._queues: dict[Hashable, deque[_Item]] = {}
        self._queued = 0
        self._cond = threading.Condition()
        self._closed = False
        self.batch_sizes: Counter[int] = Counter()  # how many batches of each size ran
        self._threads = [
            threading.Thread(target=self._loop, args=(False,), name=f"{name}-{i}", daemon=True)
            for i in range(config.runners)
        ]
        self._threads += [
            threading.Thread(target=self._loop, args=(True,), name=f"{name}-urgent-{i}", daemon=True)
            for i in range(config.urgent_runners)
        ]
        for thread in self._threads:
            thread.start()

    @property
    def depth(self) -> int:
        """Jobs waiting to run."""
        return self._queued

    def submit(self, jobs: list[J], deadline: float | None = None, wait: bool = False) -> list[Future]:
        """Queue jobs (all or none) and return one future per job.

        Raises Overloaded when they do not fit the queue, unless `wait`: then block until they fit
        (for work already admitted, e.g. the keyframes of a video being indexed) or the deadline passes.
        """
        if len(jobs) > self.config.queue_depth:
            raise ValueError(f"{len(jobs)} jobs at once can never fit a queue of {self.config.queue_depth}")
        items = [_Item(job, self._key(job), deadline=deadline) for job in jobs]
        with self._cond:
            while not self._closed and self._queued + len(items) > self.config.queue_depth:
                if not wait:
                    raise Overloaded(
                        f"server busy: {self._queued} images queued (limit {self.config.queue_depth}); retry later"
                    )
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise DeadlineExceeded("deadline passed while waiting for room in the queue")
                self._cond.wait(remaining)
            if self._closed:
                raise BatcherClosed("the server is stopping")
            now = time.monotonic()
            for item in items:
                item.enqueued = now
                self._queues.setdefault(item.key, deque()).append(item)
            self._queued += len(items)
            self._cond.notify_all()
        for item in items:
            item.future.add_done_callback(lambda future, item=item: self._forget(item) if future.cancelled() else None)
        return [item.future for item in items]

    def _forget(self, item: _Item) -> None:
        """A cancelled job leaves the queue (if it is still there) and frees its place."""
        with self._cond:
            queue = self._queues.get(item.key)
            if queue is not None and item in queue:
                queue.remove(item)
                self._queued -= 1
                if not queue:
                    del self._queues[item.key]
                self._cond.notify_all()

    def _take(self, urgent_only: bool) -> list[_Item] | None:
        """Block until a batch is due, urgent ones first (`urgent_only`: no other); None once closed and
        drained."""
        with self._cond:
            while True:
                urgent = [key for key in self._queues if key[0]]
                queues = urgent or ([] if urgent_only else list(self._queues))
                if not queues:
                    if self._closed and (urgent_only or not self._queues):
                        return None
                    self._cond.wait()
                    continue
                now = time.monotonic()
                full = [key for key in queues if len(self._queues[key]) >= self.config.max_batch]
                candidates = full or queues
                key = min(candidates, key=lambda k: self._queues[k][0].enqueued)
                due = self._queues[key][0].enqueued + self._delay
                if not full and now < due and not self._closed:
                    self._cond.wait(due - now)
                    continue
                queue = self._queues[key]
                batch = [queue.popleft() for _ in range(min(len(queue), self.config.max_batch))]
                if not queue:
                    del self._queues[key]
                self._queued -= len(batch)
                self._cond.notify_all()
                return batch

    def _loop(self, urgent_only: bool) -> None:
        while (batch := self._take(urgent_only)) is not None:
            now = time.monotonic()
            live = []
            for item in batch:
                if item.deadline is not None and now > item.deadline:
                    if item.future.set_running_or_notify_cancel():
                        item.future.set_exception(DeadlineExceeded("deadline passed while queued"))
                elif item.future.set_running_or_notify_cancel():
                    live.append(item)
            if not live:
                continue
            self.batch_sizes[len(live)] += 1
            started = time.monotonic()
            try:
                results = self._run([item.job for item in live])
            except Exception as exc:
                log.exception("batch of %d failed", len(live))
                for item in live:
                    item.future.set_exception(exc)
                continue
            log.debug(
                "batch of %d ran in %.1f ms after waiting %.1f ms (%d queued)",
                len(live),
                1000 * (time.monotonic() - started),
                1000 * (started - min(item.enqueued for item in live)),
                self._queued,
            )
            for item, result in zip(live, results):
                item.future.set_result(result)

    def close(self) -> None:
        """Stop taking jobs, run what is queued, stop the runners."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        for thread in self._threads:
            thread.join()

"""A readers-writer lock: searches read the index together, a write (an image, a video's keyframes, a new
whitening) waits for them and then has it to itself, so that no search sees half of a write."""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager


class ReadWriteLock:
    """Any number of readers, or one writer. A waiting writer holds new readers back, so a stream of searches
    cannot starve indexing. Both sides may nest in one thread, and the writer may read what it writes; a
    reader must not start writing (it would wait for itself)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._readers: Counter[int] = Counter()  # thread -> how deep it is in reading()
        self._writer: int | None = None
        self._depth = 0  # of the writer in writing()
        self._waiting = 0  # writers waiting for the readers to leave

    @contextmanager
    def reading(self) -> Iterator[None]:
        me = threading.get_ident()
        with self._cond:
            if self._writer != me and not self._readers[me]:
                while self._writer is not None or self._waiting:
                    self._cond.wait()
            self._readers[me] += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers[me] -= 1
                if not self._readers[me]:
                    del self._readers[me]
                    self._cond.notify_all()

    @contextmanager
    def writing(self) -> Iterator[None]:
        me = threading.get_ident()
        with self._cond:
            if self._writer != me:
                if self._readers[me]:
                    raise RuntimeError("a reader cannot start writing: it would wait for itself")
                self._waiting += 1
                try:
                    while self._writer is not None or self._readers:
                        self._cond.wait()
                finally:  # interrupted or not, it no longer holds readers back
                    self._waiting -= 1
                    self._cond.notify_all()
                self._writer = me
            self._depth += 1
        try:
            yield
        finally:
            with self._cond:
                self._depth -= 1
                if not self._depth:
                    self._writer = None
                    self._cond.notify_all()

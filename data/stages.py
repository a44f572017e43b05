"""Small stages that jobs compose around the shard readers."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")


def batched(items: Iterable[T], size: int) -> Iterator[list[T]]:
    """Consecutive items in lists of `size` (the last may be shorter): batch boundaries fall
    at fixed positions, so a rerun batches the same way."""
    batch: list[T] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


_END = object()


def ahead(items: Iterable[T], depth: int) -> Iterator[T]:
    """`items` produced on a thread of their own, at most `depth` ahead of the consumer, so
    that producing (reading, decoding) overlaps consuming (the forward pass). An exception
    of the producer is raised here; a consumer that stops early stops the producer, which
    closes its iterator (its files and pending work) on its own thread."""
    buffer: queue.Queue = queue.Queue(depth)
    stop = threading.Event()

    def put(entry: tuple) -> bool:
        while not stop.is_set():
            try:
                buffer.put(entry, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        source = iter(items)
        try:
            for item in source:
                if not put((item, None)):
                    return
            put((_END, None))
        except BaseException as exc:  # handed to the consumer, who raises it
            put((_END, exc))
        finally:
            close = getattr(source, "close", None)
            if close is not None:
                close()

    thread = threading.Thread(target=produce, daemon=True, name="ahead")
    thread.start()
    try:
        while True:
            item, error = buffer.get()
            if item is _END:
                if error is not None:
                    raise error
                return
            yield item
    finally:
        stop.set()
        thread.join()


class Behind:
    """`consume(item)` for each item put, in order, on a thread of its own, at most `depth`
    items behind the producer; its busy seconds are counted. An exception there is raised by
    the next `put` or by `close`, which waits for the last item."""

    def __init__(self, consume: Callable[[T], None], depth: int) -> None:
        self.consume, self.busy_seconds, self.error = consume, 0.0, None
        self.abandoned = False
        self.buffer: queue.Queue = queue.Queue(depth)
        self.thread = threading.Thread(target=self._run, daemon=True, name="behind")
        self.thread.start()

    def _run(self) -> None:
        while True:
            item = self.buffer.get()
            if item is _END:
                return
            if self.error is None and not self.abandoned:
                started = time.monotonic()
                try:
                    self.consume(item)
                except BaseException as exc:  # raised on the producer's thread
                    self.error = exc
                self.busy_seconds += time.monotonic() - started

    def _raise(self) -> None:
        if self.error is not None:
            raise self.error

    def put(self, item: T) -> None:
        self._raise()
        self.buffer.put(item)

    def close(self, abandon: bool = False) -> None:
        """Wait for every item put so far, then raise what failed, if anything did; with
        `abandon`, skip the items still waiting and raise nothing (the producer failed)."""
        self.abandoned = abandon
        self.buffer.put(_END)
        self.thread.join()
        if not abandon:
            self._raise()

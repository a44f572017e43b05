"""Small stages that jobs compose around the shard readers: batching and read-ahead."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")
_DONE = object()


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


def prefetch(items: Iterable[T], depth: int = 2) -> Iterator[T]:
    """Yield what `items` yields, produced by a background thread at most `depth` ahead, so
    decoding overlaps the model's forward pass.

    An exception in the producer is raised in the consumer at the same position.
    """
    buffer: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def produce() -> None:
        try:
            for item in items:
                while not stop.is_set():
                    try:
                        buffer.put((item, None), timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            buffer.put((_DONE, None))
        except BaseException as exc:  # handed to the consumer, not lost in the thread
            buffer.put((_DONE, exc))

    thread = threading.Thread(target=produce, daemon=True)
    thread.start()
    try:
        while True:
            item, exc = buffer.get()
            if item is _DONE:
                if exc is not None:
                    raise exc
                return
            yield item
    finally:
        stop.set()

"""Reading samples from shards, composed from webdataset's own tar stages.

The stages are webdataset's (`tar_file_expander`, `group_by_keys`); what this module adds
is an opener through fsspec (so `gs://` and `s3://` work without shell pipes) and an error
handler that records what was lost instead of stopping the stage.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

import fsspec
from webdataset.tariterators import group_by_keys, tar_file_expander

from data.errors import Drop

ZERO_TAIL = 1024  # a complete tar ends with two 512-byte zero blocks


class _TailReader:
    """Pass-through reader that remembers the last bytes read, to tell a cut tar from a whole one.

    Python's tarfile in stream mode stops silently when a tar is cut at a member boundary;
    the missing end-of-archive blocks are the only trace of the cut.
    """

    def __init__(self, raw) -> None:
        self.raw = raw
        self.tail = b""

    def read(self, size: int = -1) -> bytes:
        data = self.raw.read(size)
        if data:
            self.tail = (self.tail + data)[-ZERO_TAIL:]
        return data

    def finished_whole(self) -> bool:
        while self.read(1 << 20):
            pass
        return len(self.tail) == ZERO_TAIL and not any(self.tail)

    def close(self) -> None:
        self.raw.close()


class _ShardErrors:
    """Turns webdataset's exceptions into one Drop per damaged shard, naming the shard."""

    def __init__(self, on_error: Callable[[Drop], None]) -> None:
        self.on_error = on_error
        self.url = ""
        self.reported = False

    def start(self, url: str) -> None:
        self.url, self.reported = url, False

    def report(self, reason: str, detail: str) -> None:
        if not self.reported:
            self.reported = True
            self.on_error(Drop(self.url, None, reason, detail))

    def __call__(self, exc: Exception) -> bool:
        detail = str(exc.args[0]) if exc.args else repr(exc)
        reason = "duplicate_member" if "duplicate file name" in detail else "truncated_shard"
        self.report(reason, detail)
        return True


def _open_shards(urls: Iterable[str], errors: _ShardErrors) -> Iterator[dict]:
    for url in urls:
        errors.start(url)
        try:
            stream = _TailReader(fsspec.open(url, "rb").open())
        except OSError as exc:
            errors.report("unreadable_shard", str(exc))
            continue
        try:
            yield {"url": url, "stream": stream}
            if not stream.finished_whole():
                errors.report("truncated_shard", "tar ends before its end-of-archive blocks")
        finally:
            stream.close()


def iter_samples(urls: Iterable[str], on_error: Callable[[Drop], None]) -> Iterator[dict]:
    """Yield samples (`__key__`, `__url__`, one bytes value per extension) from shards in order.

    A truncated shard yields every sample before the cut and reports the cut once through
    `on_error`; reading then moves on to the next shard. Samples whose member names are
    absolute or climb out with `..` are dropped, so no stage ever writes them on.
    """
    errors = _ShardErrors(on_error)
    files = tar_file_expander(_open_shards(urls, errors), handler=errors)
    for sample in group_by_keys(files, handler=errors):
        if _escapes(sample["__key__"]):
            on_error(Drop(sample["__url__"], sample["__key__"], "unsafe_member_name"))
            continue
        yield sample


def _escapes(key: str) -> bool:
    """A member name that would land outside the folder a user untars it into."""
    return key.startswith(("/", "\\")) or ".." in key.replace("\\", "/").split("/")


def iter_shard(url: str, on_error: Callable[[Drop], None]) -> Iterator[dict]:
    """Samples of one shard: the unit of work of every Beam stage."""
    return iter_samples([url], on_error)

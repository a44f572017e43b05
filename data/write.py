"""Atomic shard writing: a shard is visible whole under its final name, or not at all."""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import fsspec
from webdataset import TarWriter

FIXED_MTIME = 0  # a fixed whole-second time: reruns are byte-identical and no PAX header is needed


def shard_name(prefix: str, index: int) -> str:
    return f"{prefix}-{index:06d}.tar"


def join(directory: str, name: str) -> str:
    return directory.rstrip("/") + "/" + name


@contextmanager
def naming(url: str) -> Iterator[None]:
    """Give a write error the name of the file being written: a full disk (ENOSPC) or a size
    limit (EFBIG) surfaces from a buffered write or close with no path, which tells the
    user nothing about where."""
    try:
        yield
    except OSError as exc:
        if exc.filename is not None or exc.errno is None:
            raise
        raise OSError(exc.errno, exc.strerror, url) from exc


def shard_exists(url: str) -> bool:
    fs, path = fsspec.core.url_to_fs(url)
    return fs.exists(path)


class AtomicShard:
    """Write samples to a temporary name, then fsync and rename onto the final name.

    On a local disk the rename is atomic; on object stores (gs://, s3://) the object
    only appears when the upload of the temporary one is complete and moved.
    """

    def __init__(self, url: str) -> None:
        self.url = url
        self.fs, self.path = fsspec.core.url_to_fs(url)
        parent = self.path.rsplit("/", 1)[0] if "/" in self.path else "."
        self.fs.makedirs(parent, exist_ok=True)
        self.tmp_path = f"{self.path}.tmp-{uuid.uuid4().hex[:12]}"
        self.file = self.fs.open(self.tmp_path, "wb")
        self.writer = TarWriter(self.file, encoder=False, mtime=FIXED_MTIME)
        self.count = 0

    def write(self, sample: dict) -> None:
        with naming(self.url):
            self.writer.write(sample)
        self.count += 1

    def commit(self) -> None:
        with naming(self.url):
            self.writer.tarstream.close()
            self.file.flush()
            if hasattr(self.file, "fileno"):
                os.fsync(self.file.fileno())
            self.file.close()
        self.fs.mv(self.tmp_path, self.path)

    def abort(self) -> None:
        """Drop the temporary file. Closing can fail again (a full disk fails the flush of
        the tar's end blocks too); that must not keep the file from being removed, nor hide
        the error that made us abort."""
        try:
            try:
                self.writer.tarstream.close()
            finally:
                self.file.close()
        except OSError:
            pass
        if self.fs.exists(self.tmp_path):
            self.fs.rm(self.tmp_path)

    def __enter__(self) -> AtomicShard:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()


def open_shard(url: str) -> AtomicShard | FinishedShard:
    """A shard to fill: a real one, or a stand-in when a previous run already committed it."""
    return FinishedShard() if shard_exists(url) else AtomicShard(url)


def write_atomic(url: str, data: bytes) -> None:
    """Write a small file (manifest, class names) under a temporary name, then rename it."""
    fs, path = fsspec.core.url_to_fs(url)
    parent = path.rsplit("/", 1)[0] if "/" in path else "."
    fs.makedirs(parent, exist_ok=True)
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:12]}"
    try:
        with naming(url), fs.open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            if hasattr(f, "fileno"):
                os.fsync(f.fileno())
    except BaseException:
        if fs.exists(tmp):
            fs.rm(tmp)
        raise
    fs.mv(tmp, path)


def write_json(url: str, value: object) -> None:
    write_atomic(url, (json.dumps(value, indent=2, sort_keys=True) + "\n").encode())


def write_shard(url: str, samples: Iterable[dict]) -> int:
    """Write one whole shard atomically; returns the number of samples written."""
    with AtomicShard(url) as shard:
        for sample in samples:
            shard.write(sample)
    return shard.count


class FinishedShard:
    """Stands in for a shard a previous run already committed: counts, writes nothing."""

    def __init__(self) -> None:
        self.count = 0

    def write(self, sample: dict) -> None:
        self.count += 1

    def commit(self) -> None:
        pass

    def abort(self) -> None:
        pass


class ShardSequence:
    """Spread a stream of samples over `prefix-000000.tar`, `prefix-000001.tar`, ...

    Each shard is committed when full, so a killed run leaves only whole shards. The input
    is deterministic, so a rerun refills the same shards in the same order: shards that
    already exist are passed over, never rewritten.
    """

    def __init__(self, directory: str, prefix: str, max_count: int) -> None:
        if max_count < 1:
            raise ValueError("shard size must be at least 1")
        self.directory, self.prefix, self.max_count = directory, prefix, max_count
        self.current: AtomicShard | FinishedShard | None = None
        self.urls: list[str] = []
        self.skipped = 0

    def write(self, sample: dict) -> None:
        if self.current is None:
            url = join(self.directory, shard_name(self.prefix, len(self.urls)))
            self.current = open_shard(url)
            self.skipped += isinstance(self.current, FinishedShard)
            self.urls.append(url)
        self.current.write(sample)
        if self.current.count >= self.max_count:
            self.current.commit()
            self.current = None

    def close(self) -> list[str]:
        if self.current is not None:
            self.current.commit()
            self.current = None
        return self.urls

    def __enter__(self) -> ShardSequence:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        elif self.current is not None:
            self.current.abort()

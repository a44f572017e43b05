"""Atomic shard writing: a shard is visible whole under its final name, or not at all."""

from __future__ import annotations

import tarfile
from typing import BinaryIO

from rs_pseudolabel.data.errors import UsageError
from rs_pseudolabel.data.storage import AtomicFile, exists, join, naming, size

FIXED_MTIME = 0  # a fixed whole-second time: reruns are byte-identical and no PAX header is needed
RECORD = 20 * 512  # tar's record size: an archive ends on a multiple of it, as tar(1) writes


def _ustar_template() -> bytes:
    info = tarfile.TarInfo("x")
    info.mtime, info.mode, info.uname, info.gname = FIXED_MTIME, 0o444, "bigdata", "bigdata"
    return info.tobuf(tarfile.USTAR_FORMAT)


_TEMPLATE = _ustar_template()
# The checksum of the template with its name and size fields empty (zeros) and the checksum
# field as spaces: a header's checksum is this plus the bytes of its name and size.
_BASE_SUM = sum(_TEMPLATE[100:124]) + sum(_TEMPLATE[136:148]) + 8 * 32 + sum(_TEMPLATE[156:])


def member_header(name: str, size: int) -> bytes:
    """The 512-byte tar header of a regular file; short names (the usual case) are filled
    into a ready-made ustar header, ~20x faster than `tarfile.TarInfo.tobuf`, which still
    writes the rare long name or huge size (as pax records)."""
    raw = name.encode("utf-8", "surrogateescape")
    if len(raw) > 100 or size >= 8**11:
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode = size, FIXED_MTIME, 0o444
        info.uname = info.gname = "bigdata"
        return info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")
    size_field = b"%011o\0" % size
    checksum = b"%06o\0 " % (_BASE_SUM + sum(raw) + sum(size_field))
    return b"".join(
        (raw.ljust(100, b"\0"), _TEMPLATE[100:124], size_field, _TEMPLATE[136:148], checksum,
         _TEMPLATE[156:])
    )  # fmt: skip


class TarWriter:
    """WebDataset samples as tar members (`key.ext`, extensions in sorted order), the layout
    `webdataset.TarWriter` writes; here so that writing shards needs no torch import."""

    def __init__(self, file: BinaryIO) -> None:
        self.file, self.written, self.closed = file, 0, False

    def _put(self, data: bytes) -> None:
        self.file.write(data)
        self.written += len(data)

    def write(self, sample: dict) -> None:
        """One write per sample: per-call overhead (a bucket file's, fsspec's) is paid once."""
        key, parts = sample["__key__"], []
        for ext in sorted(k for k in sample if not k.startswith("_")):
            value = sample[ext]
            value = value.encode() if isinstance(value, str) else value
            parts += [member_header(f"{key}.{ext}", len(value)), value, b"\0" * (-len(value) % 512)]
        self._put(b"".join(parts))

    def close(self) -> None:
        """The end-of-archive blocks, padded to a whole record; a second call does nothing."""
        if not self.closed:
            self.closed = True
            end = 2 * 512
            self._put(b"\0" * (end + (-(self.written + end) % RECORD)))


def shard_name(prefix: str, index: int) -> str:
    return f"{prefix}-{index:06d}.tar"


class AtomicShard:
    """A tar shard that appears under its final name only when committed whole
    (`data.storage.AtomicFile`: temp name and rename on a disk, one upload on a bucket)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.file = AtomicFile(url)
        self.writer = TarWriter(self.file)
        self.count = 0

    def write(self, sample: dict) -> None:
        with naming(self.url):
            self.writer.write(sample)
        self.count += 1

    def close_tar(self) -> int:
        """Write the end-of-archive blocks; returns the shard's final size in bytes."""
        with naming(self.url):
            self.writer.close()
        return self.file.tell()

    def commit(self) -> None:
        self.close_tar()  # a no-op when already closed
        self.file.commit()

    def abort(self) -> None:
        """Drop the shard. Closing the tar can fail again (a full disk fails the flush of
        its end blocks too); that must not keep the file from being discarded, nor hide the
        error that made us abort."""
        try:
            self.writer.close()
        except OSError:
            pass
        self.file.discard()

    def __enter__(self) -> AtomicShard:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()


def open_shard(url: str) -> AtomicShard | FinishedShard:
    """A shard to fill: a real one, or a stand-in when a previous run already committed it."""
    return FinishedShard(url) if exists(url) else AtomicShard(url)


class FinishedShard:
    """Stands in for a shard a previous run already committed: counts, writes nothing."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.count = 0

    def write(self, sample: dict) -> None:
        self.count += 1

    def close_tar(self) -> int:
        return size(self.url)

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
            raise UsageError("shard size must be at least 1")
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

"""Reading samples from shards: the one tar reader of the project, as WebDataset stages.

shard URLs -> open (any fsspec URL; gzip, bzip2 or xz undone by their magic bytes) ->
tar members -> samples grouped by key (WebDataset's layout: `key.ext` members in a row)

The member reader parses tar headers itself instead of going through `tarfile` and
WebDataset's `tar_file_expander`: in stream mode `tarfile` spends ~90 us per member on its
header (most of the cost of reading a 100-byte pseudo-label), and importing `webdataset`
imports torch, seconds that every stage paid at start-up. It reads what tar writers
produce (ustar, GNU long names, pax path and size records) and knows where a shard is cut:
Python's tarfile stops silently when a tar is cut at a member boundary, and the missing
end-of-archive blocks are the only trace of the cut.
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import re
import zlib
from collections.abc import Callable, Iterable, Iterator
from typing import BinaryIO

from rs_pseudolabel.data.errors import Drop
from rs_pseudolabel.data.storage import TIMEOUT_VARIABLE, open_read, request_timeout

BLOCK = 512
_REGULAR = (b"0", b"\0", b"7")
# Compressed shards, told by their first bytes (as tarfile's "r|*" does), not their name.
_DECOMPRESSORS: tuple[tuple[bytes, Callable[[BinaryIO], BinaryIO]], ...] = (
    (b"\x1f\x8b", lambda raw: gzip.GzipFile(fileobj=raw)),
    (b"BZh", lambda raw: bz2.BZ2File(raw)),
    (b"\xfd7zXZ\x00", lambda raw: lzma.LZMAFile(raw)),
)
_STREAM_ERRORS = (OSError, EOFError, lzma.LZMAError, zlib.error)
_KEY_EXT = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # WebDataset's split: key, extensions


class ShardFault(Exception):
    """A shard that cannot be read to its end: `reason` is what the drop record says."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


class StorageError(OSError):
    """Reading a shard failed in the storage (a time-out, a lost connection, a server error
    after the client's retries), not in the shard's bytes: an error of the run, never a
    dropped shard, since every later shard would be dropped the same way."""


def _storage_error(url: str, exc: OSError) -> StorageError:
    detail = str(exc) or type(exc).__name__
    if isinstance(exc, TimeoutError):
        detail += (
            f" (no answer within {request_timeout():g} s, after the storage client's retries; "
            f"{TIMEOUT_VARIABLE} sets the time-out)"
        )
    return StorageError(f"reading {url}: {detail}")


def _is_damage(exc: BaseException, compressed: bool) -> bool:
    """Whether an error while reading is the shard's own damage (a compressed stream cut or
    corrupt) rather than the storage failing under it."""
    if isinstance(exc, (EOFError, zlib.error, lzma.LZMAError, gzip.BadGzipFile)):
        return True
    return compressed and type(exc) is OSError and exc.errno is None  # bz2: "Invalid data"


class _Prepended:
    """A reader that gives back `head` before the rest of `raw` (after a peek)."""

    def __init__(self, head: bytes, raw: BinaryIO) -> None:
        self.head, self.raw = head, raw

    def read(self, size: int) -> bytes:
        if not self.head:
            return self.raw.read(size)
        data, self.head = self.head[:size], self.head[size:]
        if len(data) < size:
            data += self.raw.read(size - len(data))
        return data


def _decompressed(raw: BinaryIO) -> BinaryIO:
    magic = raw.read(6)
    stream = _Prepended(magic, raw)
    for prefix, opener in _DECOMPRESSORS:
        if magic.startswith(prefix):
            return opener(stream)
    if raw.seekable():  # a plain tar that can seek: member data can be skipped, not read
        raw.seek(0)
        return raw
    return stream


def _read_exactly(stream: BinaryIO, size: int) -> bytes:
    data = stream.read(size)
    while len(data) < size:
        more = stream.read(size - len(data))
        if not more:
            break
        data += more
    return data


def _number(field: bytes) -> int:
    """A size field: octal digits, or base-256 (first byte 0x80) for huge members."""
    if field[:1] == b"\x80":
        return int.from_bytes(field[1:], "big")
    digits = field.split(b"\0", 1)[0].strip()
    try:
        return int(digits, 8) if digits else 0
    except ValueError:  # the checksum covers the header, not whether its fields are numbers
        raise ShardFault("unreadable_shard", f"tar header size field {digits[:12]!r}") from None


def _checksum_ok(header: bytes) -> bool:
    stored = header[148:156].split(b"\0", 1)[0].strip()
    try:
        expected = int(stored, 8)
    except ValueError:
        return False
    unsigned = sum(header[:148]) + sum(header[156:]) + 8 * 32  # the field counts as spaces
    return expected == unsigned


def _pax_records(data: bytes) -> dict[str, str]:
    """`length key=value\\n` records of a pax extended header."""
    records, pos = {}, 0
    while pos < len(data):
        try:
            space = data.index(b" ", pos)
            length = int(data[pos:space])
        except ValueError:
            raise ShardFault("unreadable_shard", "damaged pax extended header") from None
        if length <= space - pos:
            raise ShardFault("unreadable_shard", "damaged pax extended header")
        key, _, value = data[space + 1 : pos + length - 1].partition(b"=")
        records[key.decode("utf-8", "surrogateescape")] = value.decode("utf-8", "surrogateescape")
        pos += length
    return records


def tar_members(
    stream: BinaryIO, skip_data: bool | Callable[[str], bool] = False
) -> Iterator[tuple[str, bytes]]:
    """(name, bytes) of every regular file in an uncompressed tar stream, in order; with
    `skip_data` (True, or true of the member's name) the bytes are b"" and, on a stream that
    can seek, never read.

    Raises ShardFault when the stream is not a tar at all (`not_a_tar`, at the first
    header) or ends before its end-of-archive blocks (`truncated_shard`), after every whole
    member before the cut was yielded."""
    long_name, pax = None, {}
    first = True
    while True:
        header = _read_exactly(stream, BLOCK)
        if len(header) < BLOCK:
            raise ShardFault("truncated_shard", "tar ends before its end-of-archive blocks")
        if not any(header):
            return
        if not _checksum_ok(header):
            if first:
                raise ShardFault("not_a_tar", "not a tar archive (no valid tar header)")
            raise ShardFault("truncated_shard", "a tar header is damaged")
        first = False
        size = int(pax.get("size", _number(header[124:136])))
        typeflag = header[156:157]
        pad = -size % BLOCK
        name = long_name or pax.get("path") or _header_name(header)
        skip = skip_data(name) if callable(skip_data) else skip_data
        if skip and typeflag in _REGULAR and stream.seekable():
            stream.seek(size + pad, 1)
            data = b""
        else:
            data = _read_exactly(stream, size)
            if len(data) < size or len(_read_exactly(stream, pad)) < pad:
                raise ShardFault("truncated_shard", "tar ends in the middle of a member")
            if skip and typeflag in _REGULAR:
                data = b""
        if typeflag == b"L":
            long_name = data.rstrip(b"\0").decode("utf-8", "surrogateescape")
            continue
        if typeflag == b"x":
            pax = _pax_records(data)
            continue
        if typeflag == b"g":
            continue
        long_name, pax = None, {}
        if typeflag in _REGULAR:
            yield name, data


def _header_name(header: bytes) -> str:
    name = header[:100].split(b"\0", 1)[0]
    if header[257:262] == b"ustar":
        prefix = header[345:500].split(b"\0", 1)[0]
        if prefix:
            name = prefix + b"/" + name
    return name.decode("utf-8", "surrogateescape")


def _shard_samples(url: str, on_error: Callable[[Drop], None]) -> Iterator[dict]:
    """Samples of one shard; what is lost is reported once, as a shard-level Drop."""
    try:
        raw = open_read(url)
    except (FileNotFoundError, PermissionError, IsADirectoryError) as exc:
        on_error(Drop(url, None, "unreadable_shard", str(exc)))
        return
    except OSError as exc:
        raise _storage_error(url, exc) from exc
    sample: dict | None = None
    duplicate_reported = False
    stream = raw
    try:
        stream = _decompressed(raw)
        for name, data in tar_members(stream):
            match = _KEY_EXT.match(name)
            if not match:
                continue
            key, ext = match.group(1), match.group(2).lower()
            if sample is None or key != sample["__key__"]:
                if sample is not None:
                    yield sample
                sample = {"__key__": key, "__url__": url}
            if ext in sample:
                if not duplicate_reported:
                    duplicate_reported = True
                    on_error(Drop(url, None, "duplicate_member", f"{name}: a second member"))
                continue
            sample[ext] = data
        if sample is not None:
            yield sample
    except ShardFault as fault:
        if sample is not None:
            yield sample
        on_error(Drop(url, None, fault.reason, str(fault)))
    except _STREAM_ERRORS as exc:
        compressed = stream is not raw and not isinstance(stream, _Prepended)
        if not _is_damage(exc, compressed):
            raise _storage_error(url, exc) from exc
        if sample is not None:  # the compressed stream itself is cut or damaged
            yield sample
        on_error(Drop(url, None, "truncated_shard", str(exc) or type(exc).__name__))
    finally:
        raw.close()


def member_names(url: str) -> list[str]:
    """The member names of a shard, from its headers alone: on a plain local tar the data is
    seeked past, so counting the samples of ImageNet costs seconds, not a read of it all."""
    with open_read(url) as raw:
        return [name for name, _ in tar_members(_decompressed(raw), skip_data=True)]


def small_members(url: str, read: Callable[[str], bool]) -> list[tuple[str, bytes]]:
    """(name, bytes) of a shard's members, the bytes read only of those `read` is true of
    (a sample's few-byte `.cls`), the others seeked past as `member_names` does."""
    with open_read(url) as raw:
        return list(tar_members(_decompressed(raw), skip_data=lambda name: not read(name)))


def iter_samples(urls: Iterable[str], on_error: Callable[[Drop], None]) -> Iterator[dict]:
    """Yield samples (`__key__`, `__url__`, one bytes value per extension) from shards in order.

    A truncated shard yields every sample before the cut and reports the cut once through
    `on_error`; reading then moves on to the next shard. Samples whose member names are
    absolute or climb out with `..` are dropped, so no stage ever writes them on.
    """
    for url in urls:
        for sample in _shard_samples(url, on_error):
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

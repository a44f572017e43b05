"""Every read, write, listing and publish of the project, on a local disk or an object store.

A writer's output is visible whole under its final name, or not at all:
- local disk: a temporary name in the same folder, fsync, then an atomic rename;
- object stores (gs://, s3://, any other fsspec URL): one upload that only becomes visible
  when it completes (a single PUT, or a resumable / multipart upload that is finalised at
  the end). No temporary object, no rename copy, nothing to fsync; a failed write is
  discarded, and a killed writer leaves no object behind.

Listings never come from fsspec's directory cache, which on gcsfs and s3fs does not see
objects another machine wrote: the launcher of a job watches what its workers publish.
"""

from __future__ import annotations

import functools
import io
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import BinaryIO

import fsspec
from fsspec.implementations.local import LocalFileSystem

from rs_pseudolabel.data.errors import UsageError

TEMP_MARK = ".tmp-"  # local temporary files: NAME.tmp-<12 hex>
SPOOL_BYTES = 64 << 20  # an object-store write is held in memory up to this size, then on disk
READ_BLOCK = 16 << 20  # a remote read fetches this much per request: few GETs per shard
COPY_CHUNK = 8 << 20
# Seconds an object-store request may wait for a connection or for the next bytes of its
# answer before the client retries it (gcsfs 6 times, s3fs 5, with back-off) and then fails:
# a lost answer is an error, never a wait for ever. gcsfs sets no limit of its own.
TIMEOUT_VARIABLE = "PIPELINE_STORAGE_TIMEOUT"
DEFAULT_TIMEOUT_S = 60.0


def request_timeout() -> float:
    value = os.environ.get(TIMEOUT_VARIABLE, "")
    try:
        seconds = float(value) if value else DEFAULT_TIMEOUT_S
    except ValueError:
        seconds = -1.0
    if not seconds > 0:
        raise UsageError(f"{TIMEOUT_VARIABLE}={value!r}: give a number of seconds above 0")
    return seconds


def _client_options(protocol: str | None) -> dict:
    """The request time-outs of the object-store clients, under any the user set in
    fsspec's own configuration (which win)."""
    own = fsspec.config.conf.get(protocol or "", {})
    if protocol in ("gs", "gcs"):
        if "requests_timeout" in own:
            return {}
        import aiohttp

        seconds = request_timeout()
        return {"requests_timeout": aiohttp.ClientTimeout(sock_connect=seconds, sock_read=seconds)}
    if protocol in ("s3", "s3a"):
        _check_s3_credentials()
        seconds = request_timeout()
        config = {"connect_timeout": seconds, "read_timeout": seconds}
        return {"config_kwargs": config | own.get("config_kwargs", {})}
    return {}


@functools.cache
def _check_s3_credentials() -> None:
    """One line before any request when boto finds no credentials, where botocore's
    NoCredentialsError would surface from the first request as a traceback, in a launcher or
    a worker alike. Credentials given to fsspec itself (or anonymous access) need no check."""
    own = fsspec.config.conf.get("s3", {})
    if own.get("anon") or own.get("key") or own.get("profile"):
        return
    import botocore.session

    if botocore.session.get_session().get_credentials() is None:
        raise UsageError(
            "s3://: no AWS credentials found (AWS_PROFILE, AWS_ACCESS_KEY_ID and "
            "AWS_SECRET_ACCESS_KEY, ~/.aws/credentials, or an instance role); for a public "
            "bucket set FSSPEC_S3_ANON=true"
        )


def filesystem(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem of `url` and the path within it, with listing caches off and every
    request under a time-out."""
    if "://" not in url or url.startswith("file://"):
        return fsspec.core.url_to_fs(url)
    try:
        options = _client_options(_protocol(url))
        return fsspec.core.url_to_fs(url, use_listings_cache=False, **options)
    except ValueError as exc:  # fsspec's "Protocol not known: gss", say
        raise UsageError(f"{url}: {exc}") from None


def is_local(url: str) -> bool:
    return isinstance(filesystem(url)[0], LocalFileSystem)


def _protocol(url: str) -> str | None:
    return url.split("://", 1)[0] if "://" in url else None


def _with_protocol(original: str, path: str) -> str:
    """fsspec strips the protocol from listings; put it back so the URL reopens anywhere."""
    protocol = _protocol(original)
    if protocol and "://" not in path:
        return f"{protocol}://{path}"
    return path


def join(directory: str, *names: str) -> str:
    url = directory.rstrip("/")
    for name in names:
        url += "/" + name.strip("/")
    return url


def basename(url: str) -> str:
    return url.rstrip("/").rsplit("/", 1)[-1]


def parent(url: str) -> str:
    return url.rstrip("/").rsplit("/", 1)[0] if "/" in url.rstrip("/") else "."


def absolute(url: str) -> str:
    """A URL that means the same thing from any working directory: local paths are made
    absolute (and lose a `file://` prefix), remote URLs are returned as they are."""
    if url.startswith("file://"):
        url = url[len("file://") :]
    if "://" in url:
        return url
    return os.path.abspath(os.path.expanduser(url))


def exists(url: str) -> bool:
    fs, path = filesystem(url)
    return fs.exists(path)


def is_dir(url: str) -> bool:
    fs, path = filesystem(url)
    return fs.isdir(path)


def size(url: str) -> int:
    fs, path = filesystem(url)
    return int(fs.size(path))


@dataclass(frozen=True, slots=True)
class Entry:
    """One listed file: its URL (with protocol) and size in bytes. Slotted: a launcher holds
    one per shard, 130,000 of them."""

    url: str
    size: int

    @property
    def name(self) -> str:
        return basename(self.url)


def _entries(original: str, infos: list[dict]) -> list[Entry]:
    return sorted(
        (
            Entry(_with_protocol(original, info["name"]), int(info.get("size") or 0))
            for info in infos
            if info.get("type") == "file"
        ),
        key=lambda e: e.url,
    )


def list_dir(url: str) -> list[Entry]:
    """The files directly in a folder (not below it), sorted by name; [] when there is no
    such folder. One listing: on an object store a request per thousand names. A local
    writer's temporary file (NAME.tmp-...) is no file yet and is left out, as an unfinished
    upload is no object."""
    fs, path = filesystem(url)
    if isinstance(fs, LocalFileSystem):
        return _local_entries(url, path)
    try:
        infos = fs.ls(path, detail=True)
    except FileNotFoundError:
        return []
    return _entries(url, [i for i in infos if i["name"].rstrip("/") != path.rstrip("/")])


def _local_entries(url: str, path: str) -> list[Entry]:
    """A local folder's files from one scandir, an entry at a time, where fsspec's listing
    first holds a dict of ten stat fields per file (about 0.8 KB a shard)."""
    prefix = _with_protocol(url, path.rstrip("/") + "/")
    try:
        with os.scandir(path) as found:
            entries = [
                Entry(prefix + item.name, item.stat().st_size)
                for item in found
                if item.is_file(follow_symlinks=False) and TEMP_MARK not in item.name
            ]
    except (FileNotFoundError, NotADirectoryError):
        return []
    entries.sort(key=lambda e: e.url)
    return entries


def glob(pattern: str) -> list[Entry]:
    fs, path = filesystem(pattern)
    return _entries(pattern, list(fs.glob(path, detail=True).values()))


def open_read(url: str) -> BinaryIO:
    """A binary stream of the whole file, read in large blocks."""
    fs, path = filesystem(url)
    if isinstance(fs, LocalFileSystem):
        # The plain buffered file: fsspec's wrapper adds a Python call to each of a tar's
        # many small reads (three per member).
        return open(path, "rb")  # noqa: SIM115 - the caller closes it
    return fs.open(path, "rb", block_size=READ_BLOCK, cache_type="readahead")


def read_bytes(url: str) -> bytes:
    fs, path = filesystem(url)
    return fs.cat_file(path)


def read_json(url: str) -> object | None:
    """The JSON value of a file, or None when there is no such file."""
    try:
        data = read_bytes(url)
    except FileNotFoundError:
        return None
    try:  # apart from the read: its own errors (no credentials) are no verdict on the file
        return json.loads(data)
    except ValueError as exc:  # not JSON (or not UTF-8): a file damaged or edited by hand
        raise UsageError(f"{url} is not valid JSON ({exc}): restore it or write it again") from None


class AtomicFile:
    """A file being written that appears under its name only at `commit()`.

    Use as a context manager (commit on success, discard on error) or call the two
    yourself. On an object store the bytes are spooled (memory, then a local temporary
    file) and uploaded at commit, so a failure anywhere before leaves nothing behind.
    """

    def __init__(self, url: str) -> None:
        self.url = url
        self.fs, self.path = filesystem(url)
        self.local = isinstance(self.fs, LocalFileSystem)
        if self.local:
            folder = os.path.dirname(self.path) or "."
            os.makedirs(folder, exist_ok=True)
            self.tmp_path = f"{self.path}{TEMP_MARK}{uuid.uuid4().hex[:12]}"
            self.file: BinaryIO = open(self.tmp_path, "wb")  # noqa: SIM115
        else:
            self.file = io.BytesIO()
        self.done = False

    def write(self, data: bytes) -> int:
        with naming(self.url):
            written = self.file.write(data)
            if isinstance(self.file, io.BytesIO) and self.file.tell() > SPOOL_BYTES:
                spool = tempfile.TemporaryFile()  # noqa: SIM115 - unlinked: a kill leaves nothing
                spool.write(self.file.getbuffer())
                self.file = spool
            return written

    def flush(self) -> None:
        self.file.flush()

    def tell(self) -> int:
        return self.file.tell()

    def commit(self) -> None:
        with naming(self.url):
            if self.local:
                self.file.flush()
                os.fsync(self.file.fileno())
                self.file.close()
                try:
                    os.replace(self.tmp_path, self.path)
                except OSError as exc:  # a folder in its place: said of the file, none left
                    os.unlink(self.tmp_path)
                    raise OSError(exc.errno, exc.strerror, self.path) from exc
                _fsync_dir(os.path.dirname(self.path) or ".")
            else:
                self._upload()
                self.file.close()
        self.done = True

    def _upload(self) -> None:
        if isinstance(self.file, io.BytesIO):  # small: one PUT
            self.fs.pipe_file(self.path, self.file.getvalue())
            return
        self.file.seek(0)
        out = self.fs.open(self.path, "wb")
        try:
            shutil.copyfileobj(self.file, out, COPY_CHUNK)
        except BaseException:
            _discard_upload(out)
            raise
        out.close()

    def discard(self) -> None:
        """Drop what was written. Closing can fail again (a full disk fails the last flush
        too): that must not keep the temporary file from being removed, nor hide the error
        that made us discard."""
        if self.done:
            return
        self.done = True
        try:
            self.file.close()
        except OSError:
            pass
        if self.local and os.path.exists(self.tmp_path):
            os.remove(self.tmp_path)

    def __enter__(self) -> AtomicFile:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.discard()


def _discard_upload(out: BinaryIO) -> None:
    """Abort an object-store upload, and mark the file closed so that not even its
    finaliser (`close()` on garbage collection) completes it."""
    discard = getattr(out, "discard", None)
    if discard is not None:
        discard()
    try:
        out.closed = True
    except AttributeError:
        pass


def _fsync_dir(folder: str) -> None:
    """The rename itself survives a power cut only once the folder is synced."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def naming(url: str) -> Iterator[None]:
    """Give a write error the name of the file being written: a full disk (ENOSPC) or a
    size limit (EFBIG) surfaces from a buffered write or close with no path, which tells
    the user nothing about where."""
    try:
        yield
    except FileNotFoundError as exc:
        bucket = _missing_bucket(url)
        if bucket is None:
            raise
        raise FileNotFoundError(
            f"{url}: there is no bucket {bucket!r} at this endpoint; create it or fix the URL"
        ) from exc
    except OSError as exc:
        if exc.filename is not None or exc.errno is None:
            raise
        raise OSError(exc.errno, exc.strerror, url) from exc


def _missing_bucket(url: str) -> str | None:
    """The bucket of `url` when the store says it does not exist (asked only once a write
    failed for want of it: the store's own error names a request, not the bucket)."""
    if is_local(url):
        return None
    fs, path = filesystem(url)
    bucket = path.split("/", 1)[0]
    try:
        fs.info(bucket)
    except FileNotFoundError:
        return bucket
    except Exception:  # no right to look (a write-only role), or no answer: say nothing
        return None
    return None


def write_bytes(url: str, data: bytes) -> None:
    """Publish a small file (manifest, report, class names) whole."""
    with AtomicFile(url) as f:
        f.write(bytes(data))


def write_json(url: str, value: object) -> None:
    write_bytes(url, (json.dumps(value, indent=2, sort_keys=True) + "\n").encode())


def remove(url: str) -> None:
    """Remove a file, or a folder and everything below it; nothing there is no error."""
    fs, path = filesystem(url)
    try:
        fs.rm(path, recursive=True)
    except FileNotFoundError:
        pass


def walk_entries(url: str) -> tuple[list[Entry], list[str]]:
    """Every file below a folder (sorted), and the names of the folders directly in it
    (empty ones too, where the store has folders); one recursive listing."""
    fs, path = filesystem(url)
    try:
        found = fs.find(path, withdirs=True, detail=True)
    except FileNotFoundError:
        return [], []
    root = path.rstrip("/")
    folders = sorted(
        name.rstrip("/").rsplit("/", 1)[-1]
        for name, info in found.items()
        if info.get("type") == "directory" and name.rstrip("/").rsplit("/", 1)[0] == root
    )
    return _entries(url, list(found.values())), folders


def walk_files(url: str) -> list[str]:
    """Every file below a folder, as URLs."""
    return [e.url for e in walk_entries(url)[0]]


def remove_temporaries(folder: str) -> int:
    """Delete the temporary files that killed local writers left below `folder`; returns how
    many. Object stores hold none: an unfinished upload is never an object."""
    if not is_local(folder):
        return 0
    removed = 0
    for url in walk_files(folder):
        if TEMP_MARK in basename(url):
            try:
                os.remove(filesystem(url)[1])
                removed += 1
            except FileNotFoundError:
                pass
    return removed

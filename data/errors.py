"""What goes wrong: a dropped sample (a reason, never a crash), or a mistake the user can fix."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Drop:
    """One dropped sample (or, with key None, a part of a shard that could not be read)."""

    shard: str
    key: str | None
    reason: str
    detail: str = ""

    def to_json(self) -> dict:
        # Built by hand: dataclasses.asdict deep-copies, and a job logs millions of drops.
        return {"shard": self.shard, "key": self.key, "reason": self.reason, "detail": self.detail}


class UsageError(ValueError):
    """A mistake in the command line or its inputs that the user can fix: reported as one
    line and exit status 2, wherever it is raised (the launcher, or a worker through its
    failure record)."""


# What the user can fix, wherever it is met: a mistake raised deliberately as UsageError,
# or the machine and its storage (a missing file, a full disk, a lost server): one line and
# exit status 2 at the command line; a Beam worker records it for its launcher instead of
# crashing. Anything else is a bug in this project: exit status 1 and its traceback kept.
USER_ERRORS = (UsageError, OSError)


class PeerFailed(UsageError):
    """This rank stopped because another rank of its job failed first: that rank's own line
    says why, and this one only that it followed."""


class WorkerBug(Exception):
    """A bug a worker met, raised again by the launcher: its traceback is kept at `where`."""

    def __init__(self, message: str, where: str, trace: str) -> None:
        super().__init__(message)
        self.where, self.trace = where, trace


def _wrong_kind(exc: BaseException) -> str | None:
    """A path of the wrong kind in words, whichever command met it: the file that stands
    where a folder is expected (a shard given as an output folder, or as a folder to read a
    manifest from), or the folder where a file is expected; None for any other error."""
    name = getattr(exc, "filename", None)
    if not isinstance(name, str):
        return None
    if isinstance(exc, IsADirectoryError):
        return f"{name} is a folder where a file is expected"
    if isinstance(exc, NotADirectoryError | FileExistsError):
        path = Path(name)
        for above in (path, *path.parents):
            if above.is_file():
                return f"{above} is a file where a folder is expected"
    return None


def in_words(exc: BaseException) -> str:
    """A user error's one line: a path of the wrong kind said as such, else the error."""
    return _wrong_kind(exc) or str(exc)

"""The project's progress bar: one per stage, redrawn in place in a terminal, and in a log
(stderr is a file or a pipe, as under a scheduler) a plain line every few seconds.

tqdm redraws with carriage returns as often as every step; written into a log that is one
endless line, or hundreds of them. Every long stage builds its bar here instead.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Iterable
from typing import TextIO

from tqdm import tqdm

LOG_INTERVAL_S = 10.0  # seconds between two lines of a bar written into a log
_CURSOR_MOVES = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


class _Lines:
    """A text stream for tqdm that turns each redraw into one line of its own."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream

    def write(self, text: str) -> int:
        for part in re.split(r"[\r\n]", _CURSOR_MOVES.sub("", text)):
            if part.strip():
                self.stream.write(part.rstrip() + "\n")
        return len(text)

    def flush(self) -> None:
        self.stream.flush()

    def isatty(self) -> bool:
        return False


def say(text: str, stream: TextIO | None = None) -> None:
    """Write `text` and its newline in one call, flushed: the ranks of a job (and the
    processes of a pipe) share one stderr, and Python writes `print`'s text and its end
    separately when unbuffered (PYTHONUNBUFFERED=1), so another process's line could land
    in the middle of ours."""
    stream = stream or sys.stderr
    stream.write(text + "\n")
    stream.flush()


def _is_terminal(stream: TextIO) -> bool:
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


def progress_bar(iterable: Iterable | None = None, **options: object) -> tqdm:
    """tqdm with the project's settings; `options` are tqdm's (`total`, `desc`, `unit`, ...).

    Into a log the bar is also left in place at the end: its last line is the stage's count.
    """
    stream = options.pop("file", None) or sys.stderr
    if _is_terminal(stream):
        options["file"] = stream
    else:
        options |= {"file": _Lines(stream), "mininterval": LOG_INTERVAL_S, "leave": True}
    options.setdefault("dynamic_ncols", True)
    return tqdm(iterable, **options)

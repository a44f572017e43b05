"""The project's progress bars: live in a terminal, a line every few seconds in a log."""

from __future__ import annotations

import sys

from tqdm import tqdm

LOG_INTERVAL = 10.0  # seconds between lines when the output is a file or a pipe


def progress_bar(total: int | None = None, desc: str = "", unit: str = "it", **kwargs) -> tqdm:
    """A tqdm bar that redraws in place on a terminal, and otherwise prints a line only every
    LOG_INTERVAL seconds, so a job's log holds a readable trace instead of every step."""
    interactive = sys.stderr.isatty()
    return tqdm(
        total=total,
        desc=desc,
        unit=unit,
        dynamic_ncols=interactive,
        mininterval=0.1 if interactive else LOG_INTERVAL,
        maxinterval=LOG_INTERVAL,
        **kwargs,
    )

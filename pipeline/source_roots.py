"""Where a label output's source shards are now: --source-root OLD=NEW, for the filter and
for stats' sample sheets, which both read images through a sidecar's recorded source."""

from __future__ import annotations

from collections.abc import Iterable

from rs_pseudolabel.data.errors import UsageError
from rs_pseudolabel.data.storage import absolute, is_dir

Roots = tuple[tuple[str, str], ...]


def source_roots(items: Iterable[str]) -> Roots:
    """--source-root OLD=NEW pairs as absolute folders, longest OLD first (the most specific
    wins). NEW must exist: a typo would otherwise fail every chunk."""
    pairs = []
    for item in items:
        old, sep, new = item.partition("=")
        if not sep or not old or not new:
            raise UsageError(f"--source-root expects OLD=NEW (two folders), got {item!r}")
        old, new = absolute(old).rstrip("/"), absolute(new).rstrip("/")
        if not is_dir(new):
            raise UsageError(f"--source-root {item}: {new} is not a folder")
        pairs.append((old, new))
    return tuple(sorted(pairs, key=lambda p: -len(p[0])))


def relocated(source: str, roots: Roots) -> str:
    """Where the source shard labeling read as `source` is now."""
    for old, new in roots:
        if source == old or source.startswith(old + "/"):
            return new + source[len(old) :]
    return source

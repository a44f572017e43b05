"""Shard specifications: a directory, a glob, brace notation, local or any fsspec URL.

A spec is resolved with listings only, one per folder it names, never a call per shard: at
130,000 shards on a bucket, per-shard existence checks would cost hours before a job starts.
Local paths come back absolute, so what a stage records means the same from any folder.
"""

from __future__ import annotations

from collections.abc import Sequence

import braceexpand

from rs_pseudolabel.data.errors import UsageError
from rs_pseudolabel.data.storage import (
    Entry,
    absolute,
    basename,
    exists,
    glob,
    is_dir,
    list_dir,
    parent,
)

SHARD_SUFFIXES = (".tar", ".tar.gz", ".tgz")


class ShardSpecError(UsageError):
    """A shard argument that names no readable shard."""


def is_shard_name(name: str) -> bool:
    return name.endswith(SHARD_SUFFIXES)


def _is_glob(path: str) -> bool:
    return any(c in path for c in "*?[")


def is_pattern(spec: str) -> bool:
    """Whether a spec names shards by a pattern (a glob or braces) rather than one folder or
    shard: a pattern has no manifest of its own."""
    return _is_glob(spec) or "{" in spec


def _shards(entries: list[Entry]) -> list[Entry]:
    return [e for e in entries if is_shard_name(e.name)]


def _expand_one(spec: str) -> list[Entry]:
    if _is_glob(spec):
        found = _shards(glob(spec))
        if not found:
            raise ShardSpecError(f"no shards match {spec}")
        return found
    inside = list_dir(spec)
    if inside or is_dir(spec):
        found = _shards(inside)
        if not found:
            raise ShardSpecError(f"no .tar shards in directory {spec}")
        return found
    if not is_shard_name(spec) and not exists(spec):
        raise ShardSpecError(f"shard not found: {spec} is neither a folder nor a shard")
    return _named([spec])


def _named(urls: list[str]) -> list[Entry]:
    """Shards named one by one (brace notation, single files): one listing per folder."""
    listings: dict[str, dict[str, Entry]] = {}
    found = []
    for url in urls:
        if not is_shard_name(url):
            raise ShardSpecError(f"{url} is not a tar shard (.tar, .tar.gz or .tgz)")
        folder = parent(url)
        if folder not in listings:
            listings[folder] = {e.name: e for e in list_dir(folder)}
        entry = listings[folder].get(basename(url))
        if entry is None:
            raise ShardSpecError(f"shard not found: {url}")
        found.append(Entry(url, entry.size))
    return found


def shard_entries(spec: str | Sequence[str]) -> list[Entry]:
    """The shards a spec names, with their sizes, in the order every stage iterates them.

    Order matters: sidecar shards are matched to their sources by position and name, so
    the list is sorted within a directory or glob and kept as written otherwise.
    """
    specs = [spec] if isinstance(spec, str) else list(spec)
    entries: list[Entry] = []
    for item in specs:
        try:
            expanded = [absolute(u) for u in braceexpand.braceexpand(item)]
        except ValueError as exc:  # unbalanced braces
            raise ShardSpecError(f"{item}: {exc}") from None
        if len(expanded) == 1:
            entries.extend(_expand_one(expanded[0]))
            continue
        # Braces over shard names (one listing per folder), over folders or over globs
        # ('{A,B}/*.tar'), in the order written.
        names: list[str] = []
        for url in expanded:
            if is_shard_name(url) and not _is_glob(url):
                names.append(url)
                continue
            entries.extend(_named(names))
            names = []
            entries.extend(_expand_one(url))
        entries.extend(_named(names))
    if not entries:
        raise ShardSpecError("no shards given")
    seen: set[str] = set()
    for entry in entries:
        if entry.url in seen:
            raise ShardSpecError(f"shard listed twice: {entry.url}")
        seen.add(entry.url)
    return entries


def expand_shards(spec: str | Sequence[str]) -> list[str]:
    """The URLs of the shards a spec names (see `shard_entries`)."""
    return [e.url for e in shard_entries(spec)]

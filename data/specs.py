"""Shard specifications: a directory, a glob, brace notation, local or any fsspec URL."""

from __future__ import annotations

from collections.abc import Sequence

import braceexpand
import fsspec

SHARD_SUFFIXES = (".tar", ".tar.gz", ".tgz")


class ShardSpecError(ValueError):
    """A shard argument that names no readable shard."""


def _is_glob(path: str) -> bool:
    return any(c in path for c in "*?[")


def _with_protocol(fs: fsspec.AbstractFileSystem, original: str, found: str) -> str:
    """fsspec strips the protocol from listings; put it back so the URL reopens anywhere."""
    if "://" in original and "://" not in found:
        protocol = original.split("://", 1)[0]
        return f"{protocol}://{found}"
    return found


def _expand_one(spec: str) -> list[str]:
    fs, path = fsspec.core.url_to_fs(spec)
    if _is_glob(path):
        found = sorted(p for p in fs.glob(path) if p.endswith(SHARD_SUFFIXES))
        if not found:
            raise ShardSpecError(f"no shards match {spec}")
        return [_with_protocol(fs, spec, p) for p in found]
    if fs.isdir(path):
        found = sorted(p for p in fs.ls(path, detail=False) if p.endswith(SHARD_SUFFIXES))
        if not found:
            raise ShardSpecError(f"no .tar shards in directory {spec}")
        return [_with_protocol(fs, spec, p) for p in found]
    if not fs.exists(path):
        raise ShardSpecError(f"shard not found: {spec}")
    return [spec]


def expand_shards(spec: str | Sequence[str]) -> list[str]:
    """Turn shard arguments into the ordered list of shard URLs every stage iterates over.

    Order matters: sidecar shards are matched to their sources by position and name, so
    the list is sorted within a directory or glob and kept as written otherwise.
    """
    specs = [spec] if isinstance(spec, str) else list(spec)
    urls: list[str] = []
    for item in specs:
        for expanded in braceexpand.braceexpand(item):
            urls.extend(_expand_one(expanded))
    if not urls:
        raise ShardSpecError("no shards given")
    seen: set[str] = set()
    duplicates = [u for u in urls if u in seen or seen.add(u)]
    if duplicates:
        raise ShardSpecError(f"shard listed twice: {duplicates[0]}")
    return urls

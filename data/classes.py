"""`classes.json`: the class names written beside a set of shards, one list in class-id order.

`pipeline data digits` and `pipeline data ingest` write it; the trainer (which sizes its
classifier from it), `pipeline stats` and the sample sheet read it, all through here.
"""

from __future__ import annotations

from collections.abc import Sequence

from rs_pseudolabel.data.errors import UsageError
from rs_pseudolabel.data.storage import join, parent, read_json, write_json

CLASSES_FILE = "classes.json"


def write_class_names(folder: str, names: Sequence[str]) -> None:
    write_json(join(folder, CLASSES_FILE), list(names))


def read_class_names(urls: Sequence[str]) -> list[str] | None:
    """The names in `classes.json` beside the first shard, or None when there is none."""
    url = join(parent(urls[0]), CLASSES_FILE)
    names = read_json(url)
    if names is None:
        return None
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise UsageError(f"{url} should hold a list of class names")
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:  # two class ids under one name could never be told apart downstream
        raise UsageError(
            f"{url} names {len(twice)} class{'es' if len(twice) > 1 else ''} twice "
            f"({', '.join(map(repr, twice[:5]))}): each class needs a name of its own"
        )
    return names

"""A job's units of work, kept out of its Beam graph.

A job over 130,000 shards that carried its (shard, output) pairs in `beam.Create` would put
them into the job graph (over 10 MB of it, near what Dataflow accepts) and, on the local
runner, hold them several times over in the launcher: measured, +91 MiB of launcher peak
from 20,000 to 80,000 shards. Instead the launcher writes the list once, as one JSON file
under the output's `_work/`, named by its content's digest so that a rerun with other work
never reads an old list, and the job carries only (start, stop) spans of it: at most SPANS
elements, one unit each while there are fewer. Each worker process reads the file once.
"""

from __future__ import annotations

import hashlib
import json
import threading

from rs_pseudolabel.data.storage import join, read_bytes, remove, write_bytes

WORK = "_work"  # a stage's working files under its output folder
SPANS = 4096  # Beam elements of a job at most: enough to spread over any number of workers

_loaded: dict[str, list] = {}
_lock = threading.Lock()


class WorkList:
    """The units of one job (JSON values), the file they go to, and the spans the job runs."""

    def __init__(self, out_dir: str, step: str, units: list) -> None:
        data = json.dumps(units, separators=(",", ":")).encode()
        self.url = join(out_dir, WORK, f"{step}-{hashlib.sha256(data).hexdigest()[:16]}.json")
        self._data = data
        count = min(len(units), SPANS)
        self.spans = [
            (k * len(units) // count, (k + 1) * len(units) // count) for k in range(count)
        ]

    def __enter__(self) -> WorkList:
        """Written before the job starts; removed once it has run (kept if it fails, for the
        rerun that may need it while a remote job still runs)."""
        write_bytes(self.url, self._data)
        self._data = b""
        return self

    def __exit__(self, kind: type | None, *_: object) -> None:
        if kind is None:
            remove(self.url)


def units(url: str, span: tuple[int, int]) -> list:
    """The units of one span, from the list this worker process read once."""
    with _lock:
        if url not in _loaded:
            _loaded.clear()  # one job's list at a time
            _loaded[url] = json.loads(read_bytes(url))
        found = _loaded[url]
    return found[span[0] : span[1]]

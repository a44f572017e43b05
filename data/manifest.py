"""Stage manifests: `OUTPUT/manifest.json` and `OUTPUT/errors.jsonl` (SPEC section 5)."""

from __future__ import annotations

import json
import platform
import time
from collections import Counter
from collections.abc import Iterable
from importlib import metadata

import fsspec

from data.errors import Drop
from data.write import write_atomic, write_json

_VERSIONED = ("rs-pseudolabel", "torch", "torchvision", "apache-beam", "webdataset", "faiss-cpu")


def versions() -> dict[str, str]:
    found = {}
    for name in _VERSIONED:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    found["python"] = platform.python_version()
    return found


def write_report(
    out_dir: str,
    stage: str,
    args: dict,
    samples_in: int,
    samples_out: int,
    drops: Iterable[Drop],
    **extra: object,
) -> dict:
    """Write errors.jsonl and manifest.json; the manifest is written last, as the mark of a
    finished stage."""
    drops = list(drops)
    lines = "".join(json.dumps(d.to_json(), sort_keys=True) + "\n" for d in drops)
    write_atomic(out_dir.rstrip("/") + "/errors.jsonl", lines.encode())
    sample_drops = Counter(d.reason for d in drops if d.key is not None)
    shard_faults = Counter(d.reason for d in drops if d.key is None)
    manifest = {
        "stage": stage,
        "samples_in": samples_in,
        "samples_out": samples_out,
        "dropped": sum(sample_drops.values()),
        "drops": dict(sorted(sample_drops.items())),
        "shard_faults": dict(sorted(shard_faults.items())),
        "args": args,
        "versions": versions(),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **extra,
    }
    write_json(out_dir.rstrip("/") + "/manifest.json", manifest)
    return manifest


def read_manifest(out_dir: str) -> dict | None:
    fs, path = fsspec.core.url_to_fs(out_dir.rstrip("/") + "/manifest.json")
    if not fs.exists(path):
        return None
    with fs.open(path, "rb") as f:
        return json.load(f)

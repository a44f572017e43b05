"""What an output folder holds: `OUTPUT/manifest.json` and `OUTPUT/errors.jsonl` (SPEC 5, 8).

A stage claims its output folder before it writes anything in it: the manifest is written
first, in state "running", with a fingerprint of what defines the output (the stage, its
arguments, its inputs resolved to absolute URLs with a digest of their listing, the
teacher). A rerun with the same fingerprint resumes, or returns at once when the work is
done; a rerun with another one is refused, naming the difference, unless `--overwrite`
clears the folder first. So old work never mixes with new, and a manifest never claims
settings its shards were not made with. At the end the manifest is rewritten in state
"done" with the counts; `errors.jsonl` lists every dropped sample, written as a stream.
"""

from __future__ import annotations

import hashlib
import json
import platform
import time
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from importlib import metadata

from rs_pseudolabel.data.errors import Drop, UsageError
from rs_pseudolabel.data.storage import (
    AtomicFile,
    Entry,
    absolute,
    exists,
    join,
    read_json,
    remove,
    remove_temporaries,
    walk_files,
    write_json,
)

MANIFEST = "manifest.json"
ERRORS = "errors.jsonl"
RUNNING, DONE = "running", "done"
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


def listing_digest(entries: Sequence[Entry]) -> str:
    """Names and sizes of a set of files in one short string: an input that gains, loses or
    rewrites a file gets another digest."""
    digest = hashlib.sha256()
    for entry in entries:
        digest.update(f"{entry.url}\t{entry.size}\n".encode())
    return digest.hexdigest()[:16]


def inputs_record(spec: str, entries: Sequence[Entry]) -> dict:
    """How a fingerprint names an input: where, how many files, and their digest."""
    return {"spec": spec, "files": len(entries), "digest": listing_digest(entries)}


def difference(
    new: object, old: object, path: str = "", defaults: Mapping[str, object] | None = None
) -> str | None:
    """The first key (dotted path) whose value differs, said as a user reads it; or None.
    `defaults`: keys added to fingerprints after some outputs were written, with the value
    such an output had: an old fingerprint that lacks one is read as holding it, so an
    upgrade neither strands nor mixes old outputs."""
    if isinstance(new, dict) and isinstance(old, dict):
        for key in sorted(set(new) | set(old)):
            was = old.get(key, (defaults or {}).get(key))
            found = difference(new.get(key), was, f"{path}.{key}" if path else key, defaults)
            if found:
                return found
        return None
    if new != old:
        return f"{path} is {json.dumps(new)} now but {json.dumps(old)} there"
    return None


def read_manifest(out_dir: str) -> dict | None:
    value = read_json(join(out_dir, MANIFEST))
    return value if isinstance(value, dict) else None


def finished_manifest(out_dir: str, stage: str) -> dict:
    """The manifest of a finished stage's output, or one line saying why it is not one."""
    found = read_json(join(out_dir, MANIFEST))
    wanted = f"pass the output folder of `pipeline {stage}`"
    if found is None:
        there = "holds no manifest.json" if exists(out_dir) else "does not exist"
        raise UsageError(f"{out_dir} {there}: {wanted}")
    if not isinstance(found, dict) or not isinstance(found.get("fingerprint"), dict):
        raise UsageError(
            f"{join(out_dir, MANIFEST)} was edited or damaged (not the record a stage writes): "
            f"rerun `pipeline {stage}` into a new folder"
        )
    manifest = found
    if manifest.get("stage") != stage:
        other = manifest.get("stage")
        raise UsageError(f"{out_dir} holds the output of `pipeline {other}`: {wanted}")
    if manifest.get("state") != DONE:
        raise UsageError(
            f"{out_dir}: `pipeline {stage}` has not finished there; rerun it to completion first"
        )
    return manifest


def check_apart(out_dir: str, inputs: Iterable[str]) -> None:
    """Refuse an output folder that is, contains or lies inside an input folder: writing there
    would replace or mix with what the stage reads (`--output D --input D` once replaced a
    corpus with its sidecars)."""
    out = absolute(out_dir).rstrip("/")
    for item in inputs:
        folder = absolute(item).rstrip("/")
        if out == folder or out.startswith(folder + "/") or folder.startswith(out + "/"):
            where = (
                "is" if out == folder else "lies inside" if out.startswith(folder) else "contains"
            )
            raise UsageError(
                f"the output folder {out_dir} {where} the input folder {item}: "
                "choose an output folder apart from every input"
            )


class StageOutput:
    """An output folder claimed by one stage with one fingerprint."""

    def __init__(
        self,
        out_dir: str,
        stage: str,
        fingerprint: dict,
        inputs: Iterable[str] = (),
        overwrite: bool = False,
        defaults: Mapping[str, object] | None = None,
    ) -> None:
        self.out_dir, self.stage, self.overwrite = absolute(out_dir), stage, overwrite
        self.fingerprint = {"stage": stage, **fingerprint}
        self.defaults = defaults  # fingerprint keys added later: see `difference`
        self.inputs = list(inputs)
        self.fresh = False  # whether open() made the folder (abandon() may remove it)

    def open(self) -> dict | None:
        """The finished manifest when this very work is already done (nothing to do); else
        None, after making the folder ours: new, resumed, or cleared with `overwrite`."""
        check_apart(self.out_dir, self.inputs)
        existing = read_manifest(self.out_dir)
        if existing is not None and "fingerprint" in existing:
            refused = self.refusal(existing["fingerprint"])
            if refused is not None:
                if not self.overwrite:
                    raise UsageError(refused)
                remove(self.out_dir)
            elif difference(self.fingerprint, existing["fingerprint"], "", self.defaults) is None:
                if existing.get("state") == DONE:
                    return existing
                remove_temporaries(self.out_dir)
                return None
            # else the same work, continued with what `refusal` lets change: recorded anew
        else:
            remove_temporaries(self.out_dir)
            self.check_unclaimed()
        self.fresh = True
        write_json(
            join(self.out_dir, MANIFEST),
            {
                "stage": self.stage,
                "state": RUNNING,
                "fingerprint": self.fingerprint,
                "started": _now(),
            },
        )
        return None

    def refusal(self, old: dict) -> str | None:
        """Why work with fingerprint `old` in the folder cannot be continued by this one, or
        None: a stage continues its own work (and returns it when done), nothing else."""
        changed = difference(self.fingerprint, old, "", self.defaults)
        if changed is None:
            return None
        return (
            f"{self.out_dir} holds other `pipeline {old.get('stage')}` output: {changed}. "
            "Use another output folder, or --overwrite to replace it"
        )

    def check_unclaimed(self) -> None:
        """Refuse a folder no stage claimed that holds files: they are someone else's."""
        if any(True for _ in walk_files(self.out_dir)):
            raise UsageError(
                f"{self.out_dir} already holds files that no pipeline stage wrote "
                "(no manifest.json): choose a new or empty output folder"
            )

    def abandon(self) -> None:
        """Give back a folder this run made and found it has nothing to write into: a rerun
        with other settings then starts afresh instead of meeting a foreign fingerprint."""
        if self.fresh:
            remove(self.out_dir)

    def finish(
        self,
        samples_in: int,
        samples_out: int,
        drops: Counter,
        shard_faults: Counter,
        args: dict,
        **extra: object,
    ) -> dict:
        """The manifest of the finished stage, written last: its state says "done"."""
        manifest = {
            "stage": self.stage,
            "state": DONE,
            "fingerprint": self.fingerprint,
            "samples_in": samples_in,
            "samples_out": samples_out,
            "dropped": sum(drops.values()),
            "drops": dict(sorted(drops.items())),
            "shard_faults": dict(sorted(shard_faults.items())),
            "args": args,
            "versions": versions(),
            "finished": _now(),
            **extra,
        }
        write_json(join(self.out_dir, MANIFEST), manifest)
        return manifest


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


class ErrorLog:
    """`errors.jsonl`, written as a stream while the counts per reason are kept: memory
    does not grow with the number of drops, and the file appears whole at `close()`."""

    def __init__(self, out_dir: str) -> None:
        self.file = AtomicFile(join(out_dir, ERRORS))
        self.drops: Counter = Counter()  # samples, by reason
        self.shard_faults: Counter = Counter()  # parts of shards that could not be read

    def add(self, drop: Drop) -> None:
        self.file.write((json.dumps(drop.to_json(), sort_keys=True) + "\n").encode())
        (self.drops if drop.key is not None else self.shard_faults)[drop.reason] += 1

    def __enter__(self) -> ErrorLog:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.file.__exit__(exc_type, exc, tb)


def write_drops(out_dir: str, drops: Iterable[Drop]) -> ErrorLog:
    """errors.jsonl for a stage that kept its drops itself (data digits, ingest)."""
    with ErrorLog(out_dir) as log:
        for drop in drops:
            log.add(drop)
    return log

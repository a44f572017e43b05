"""Per-shard reports: how a Beam stage accounts for every sample, knows what is done, and
hears of a worker's failure, on any runner.

Each worker writes `OUTPUT/_reports/<output>.json` just before it commits its output. The
launcher lists `_reports/` (and the outputs) once to find what is done, counts reports to
show progress, and at the end streams over them into manifest.json and errors.jsonl. A
mistake the user must fix, met by a worker (no GPU for `--device cuda`, unreadable weights,
an output it cannot write), is recorded in `OUTPUT/_failures/` instead of crashing the
worker; the launcher raises the first one as one line. Storage calls are listings, a handful
per job, plus one read per report: never a call per shard on the launcher before the job.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import traceback
from collections import Counter
from collections.abc import Callable, Collection, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from dataclasses import fields as dataclass_fields
from typing import TypeVar

from rs_pseudolabel.data.errors import USER_ERRORS, Drop, UsageError, WorkerBug
from rs_pseudolabel.data.manifest import ErrorLog, StageOutput
from rs_pseudolabel.data.progress import progress_bar
from rs_pseudolabel.data.read import StorageError
from rs_pseudolabel.data.storage import (
    is_local,
    join,
    list_dir,
    read_bytes,
    read_json,
    remove,
    write_bytes,
)

REPORTS = "_reports"
FAILURES = "_failures"
T = TypeVar("T")
READ_AHEAD = 32  # reports fetched at once while merging: latency hidden, memory bounded
TIME_SPLIT = (  # where a unit's time went, summed into the manifest
    "seconds",
    "input_wait_seconds",
    "forward_seconds",
    "output_seconds",
    "read_seconds",
    "decode_seconds",
    "write_seconds",
    "on_device",
    "on_cpu",
    "decode_calls",
    "jpeg",
)
MAX_POLL_SHARE = 0.05  # a progress poll may cost at most this share of the time between polls
SAMPLED_PER_POLL = 8  # reports a poll reads for the bar's rates: its cost stays bounded


@dataclass
class ShardReport:
    source: str
    output: str
    samples_in: int = 0
    samples_out: int = 0
    drops: list[Drop] = field(default_factory=list)
    seconds: float = 0.0  # wall time of the unit, on the thread that drives the device:
    input_wait_seconds: float = 0.0  # waiting for the next decoded batch
    forward_seconds: float = 0.0  # the forward pass and what runs on the device with it
    output_seconds: float = 0.0  # opening the output, handing to the writer, its last records
    read_seconds: float = 0.0  # busy times beside it: reading and hashing,
    decode_seconds: float = 0.0  # decoding and cropping (summed over the decode processes),
    write_seconds: float = 0.0  # and encoding and writing the records
    on_device: int = 0  # images decoded on the teacher's device
    on_cpu: int = 0  # and by the CPU decoder
    decode_calls: int = 0  # calls of the device decoder (a refused JPEG adds ~2 log2 n)
    jpeg: int = 0  # images that are JPEGs (the device's format), whichever way they decoded
    first_forward_at: float = 0.0  # wall clock at the end of the first forward pass
    last_forward_at: float = 0.0  # and of the last: between the two, a job's steady state
    stats: dict = field(default_factory=dict)  # additive summaries: histograms, counts by class
    worker: str = field(default_factory=lambda: f"{socket.gethostname()}:{os.getpid()}")

    def to_json(self) -> dict:
        fields = {f.name: getattr(self, f.name) for f in dataclass_fields(self)}
        return {**fields, "drops": [d.to_json() for d in self.drops]}

    @classmethod
    def from_json(cls, value: dict) -> ShardReport:
        return cls(**{**value, "drops": [Drop(**d) for d in value["drops"]]})


def report_url(out_dir: str, output_name: str) -> str:
    return join(out_dir, REPORTS, output_name + ".json")


def write_shard_report(out_dir: str, report: ShardReport, name: str) -> None:
    write_bytes(report_url(out_dir, name), json.dumps(report.to_json()).encode())


def reported(out_dir: str) -> set[str]:
    """Names of the outputs with a report: one listing."""
    return {e.name.removesuffix(".json") for e in list_dir(join(out_dir, REPORTS))}


def done_outputs(out_dir: str) -> set[str]:
    """Outputs whose report and file both exist: two listings, whatever the shard count."""
    present = {e.name for e in list_dir(out_dir)}
    return reported(out_dir) & present


def add_into(total: dict, part: dict) -> dict:
    """Sum nested summaries: numbers add, lists add element-wise, dicts add key by key."""
    for key, value in part.items():
        if isinstance(value, dict):
            add_into(total.setdefault(key, {}), value)
        elif isinstance(value, list):
            have = total.setdefault(key, [0] * len(value))
            have.extend([0] * (len(value) - len(have)))
            for i, v in enumerate(value):
                have[i] += v
        else:
            total[key] = total.get(key, 0) + value
    return total


@dataclass
class Merged:
    """What the reports of a job add up to; the drops themselves went to errors.jsonl."""

    shards: int = 0
    samples_in: int = 0
    samples_out: int = 0
    fresh_samples_out: int = 0  # of the units this run did (not an earlier one)
    time_split: Counter = field(default_factory=Counter)  # the reports' *_seconds and counts
    drops: Counter = field(default_factory=Counter)
    shard_faults: Counter = field(default_factory=Counter)
    stats: dict = field(default_factory=dict)


def _fetch(urls: list[str], ahead: int) -> Iterator[bytes]:
    """The files in order, `ahead` at a time: on a bucket each read is a round trip."""
    with ThreadPoolExecutor(min(8, ahead)) as pool:
        for start in range(0, len(urls), ahead):
            yield from pool.map(read_bytes, urls[start : start + ahead])


def merge_reports(
    out_dir: str,
    names: list[str],
    log: ErrorLog,
    fresh: Collection[str] = (),
    ahead: int = READ_AHEAD,
) -> Merged:
    """Stream the named reports (in the given order) into `log` and one `Merged`; `fresh`
    names the units this run did, for its rate. `ahead` reports are read at once: fewer
    where each report is big (a filter chunk's lists up to 64 sidecars' drops)."""
    merged = Merged()
    urls = [report_url(out_dir, n) for n in names]
    for name, data in zip(names, _fetch(urls, ahead), strict=True):
        report = ShardReport.from_json(json.loads(data))
        merged.shards += 1
        merged.samples_in += report.samples_in
        merged.samples_out += report.samples_out
        if name in fresh:
            merged.fresh_samples_out += report.samples_out
        for key in TIME_SPLIT:
            merged.time_split[key] += getattr(report, key)
        for drop in report.drops:
            log.add(drop)
        add_into(merged.stats, report.stats)
    merged.drops, merged.shard_faults = log.drops, log.shard_faults
    return merged


def finish_stage(out: StageOutput, merged: Merged, args: dict, **extra: object) -> dict:
    """The stage's finished manifest: the merged counts, the arguments, what else it keeps."""
    return out.finish(
        merged.samples_in, merged.samples_out, merged.drops, merged.shard_faults, args, **extra
    )


def record_failure(out_dir: str, name: str, exc: BaseException) -> None:
    """What a worker could not do, kept for the launcher to raise: a user's mistake as its
    line, a bug with its formatted traceback (the worker's frames, which the launcher's
    re-raise does not have)."""
    record = {"unit": name, "type": type(exc).__name__, "message": str(exc)}
    if not isinstance(exc, USER_ERRORS):
        record["traceback"] = "".join(traceback.format_exception(exc))
    write_bytes(join(out_dir, FAILURES, name + ".json"), json.dumps(record).encode())


_lost_storage: list[StorageError] = []  # this worker process's first storage failure
_unrecorded: list[OSError] = []  # and the failure to record one in the output folder


def unit_of_work(out_dir: str, name: str, work: Callable[[], T]) -> T | None:
    """`work()` for one unit, or None with its failure recorded for the launcher: a user's
    line, or a bug's traceback, never the runner's retries. Once a read failed in the storage
    after the client's retries, this worker's later units fail at once with that error: each
    would wait out the same retries against a server that is gone, and a rerun does them."""
    try:
        if _lost_storage:
            raise StorageError(f"not tried after the storage failed: {_lost_storage[0]}")
        return work()
    except Exception as exc:
        if isinstance(exc, StorageError) and not _lost_storage:
            _lost_storage.append(exc)
        if _unrecorded:  # the output's storage is gone: each try waits out the retries
            return None
        try:
            record_failure(out_dir, name, exc)
        except OSError as lost:
            # The output's storage is gone too: nothing can be recorded, and raising would
            # only have the runner retry and print its tracebacks. The launcher finds the
            # output unreadable and says so (`output_lost`); this worker tries no more units.
            if is_local(out_dir):
                raise
            _unrecorded.append(lost)
            if not _lost_storage:
                _lost_storage.append(StorageError(f"writing to {out_dir}: {lost}"))
        return None


@contextmanager
def output_lost(out_dir: str) -> Iterator[None]:
    """A job whose output storage stops answering ends in one line naming the folder and
    what the storage said, never a client's traceback or a bare "Cannot connect"."""
    try:
        yield
    except UsageError:
        raise
    except OSError as exc:
        if is_local(out_dir):
            raise
        said = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise UsageError(
            f"the storage of {out_dir} stopped answering during the job ({said}): what was "
            "finished is kept; run the same command again once it answers"
        ) from None


def clear_failures(out_dir: str) -> None:
    """A job starts afresh: no failure recorded, no storage failure remembered."""
    _lost_storage.clear()
    _unrecorded.clear()
    remove(join(out_dir, FAILURES))


def raise_failures(out_dir: str) -> None:
    """One line for the first failure workers recorded, with how many units failed."""
    failed = list_dir(join(out_dir, FAILURES))
    if not failed:
        return
    records = [(e.url, read_json(e.url) or {}) for e in failed]
    bugs = [(url, r) for url, r in records if "traceback" in r]
    url, first = bugs[0] if bugs else records[0]
    message = first.get("message", "a worker failed")
    if bugs:
        message = f"{first.get('type')}: {message} (unit {first.get('unit')})"
    if len(failed) > 1:
        # Where they are kept, unless no unit finished: then the folder goes (`given_back`).
        where = f" (see {join(out_dir, FAILURES)})" if bugs or reported(out_dir) else ""
        message = f"{len(failed)} units failed{where}; the first: {message}"
    if bugs:
        raise WorkerBug(message, url, first["traceback"])
    raise UsageError(message)


class ReportProgress:
    """A progress bar fed by the reports workers write, whatever runner they run on.

    Each poll is a listing of `_reports/`, whose cost grows with the shard count; the
    interval grows with it, so that polling never costs more than a small share of the
    time (at 130,000 reports on a bucket, a poll every minute or so). With `rates`, each poll
    also reads a few of the new reports (at most SAMPLED_PER_POLL) and the bar shows the
    images per second and the share of time the forward pass waited for input."""

    def __init__(
        self,
        out_dir: str,
        total: int,
        desc: str,
        done_before: int,
        interval: float = 1.0,
        rates: bool = False,
    ) -> None:
        self.out_dir, self.interval, self.done_before = out_dir, interval, done_before
        self.rates, self.seen, self.started = rates, set(), time.monotonic()
        self.sampled = Counter()
        self.bar = progress_bar(total=total, desc=desc, unit="shard")
        self.lost: OSError | None = None  # the storage did not answer a poll: polls end
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._poll, daemon=True)

    def _update(self) -> float:
        started = time.monotonic()
        names = {e.name for e in list_dir(join(self.out_dir, REPORTS))}
        done = len(names) - self.done_before
        if self.rates and done > 0:
            self._sample(names, done)
        self.bar.update(min(done, self.bar.total) - self.bar.n)
        return time.monotonic() - started

    def _sample(self, names: set[str], done: int) -> None:
        new = sorted(names - self.seen)
        self.seen |= names
        for name in new[:SAMPLED_PER_POLL]:
            report = read_json(join(self.out_dir, REPORTS, name)) or {}
            self.sampled["shards"] += 1
            for key in ("samples_out", "seconds", "input_wait_seconds"):
                self.sampled[key] += report.get(key, 0)
        if self.sampled["shards"] and self.sampled["seconds"]:
            per_shard = self.sampled["samples_out"] / self.sampled["shards"]
            rate = per_shard * done / max(time.monotonic() - self.started, 1e-9)
            wait = self.sampled["input_wait_seconds"] / self.sampled["seconds"]
            self.bar.set_postfix_str(f"{rate:,.0f} img/s, waiting for input {wait:.0%}")

    def _poll(self) -> None:
        wait = self.interval
        while not self.stop.wait(wait):
            try:
                wait = max(self.interval, self._update() / MAX_POLL_SHARE)
            except OSError as exc:  # after the client's retries: no poll waits them again
                self.lost = exc
                return

    def raise_lost(self) -> None:
        """After the job: the storage that stopped answering a poll is the job's error (the
        failures the workers could not record there either are not waited for again)."""
        self.stop.set()
        self.thread.join()
        if self.lost is not None:
            raise self.lost

    def __enter__(self) -> ReportProgress:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()
        if self.lost is None:
            try:
                self._update()
            except OSError as exc:  # the bar stays as last seen; the job's check says why
                self.lost = exc
        self.bar.close()


@contextmanager
def given_back(out: StageOutput) -> Iterator[None]:
    """A job refused for the user's mistake before its first unit finished leaves the
    output as it found it: the folder this run claimed is removed, so the corrected command
    (`--device cpu` after `--device cuda`) is not refused as other settings' output."""
    try:
        yield
    except UsageError:
        if not reported(out.out_dir):
            out.abandon()
        raise

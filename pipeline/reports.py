"""Per-shard reports: how a Beam stage accounts for every sample and knows what is done.

Each worker writes `OUTPUT/_reports/<shard>.json` just before it commits the shard itself.
The driver treats a shard as done when both exist, shows progress by counting reports
(this works the same on a laptop and on Dataflow with a gs:// output), and merges them
into the stage's manifest.json and errors.jsonl at the end.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import asdict, dataclass, field

import fsspec
from tqdm import tqdm

from data.errors import Drop
from data.manifest import write_report
from data.write import join, shard_exists, write_atomic

REPORTS = "_reports"


@dataclass
class ShardReport:
    source: str
    output: str
    samples_in: int = 0
    samples_out: int = 0
    drops: list[Drop] = field(default_factory=list)
    seconds: float = 0.0
    forward_seconds: float = 0.0
    groups: dict[str, int] = field(default_factory=dict)  # filter: copies per output group
    classes: dict[str, int] = field(default_factory=dict)  # filter: copies per class

    def to_json(self) -> dict:
        return {**asdict(self), "drops": [d.to_json() for d in self.drops]}

    @classmethod
    def from_json(cls, value: dict) -> ShardReport:
        return cls(**{**value, "drops": [Drop(**d) for d in value["drops"]]})


def _name(output_url: str) -> str:
    return output_url.rsplit("/", 1)[-1]


def report_url(out_dir: str, output_url: str) -> str:
    return join(join(out_dir, REPORTS), _name(output_url) + ".json")


def write_shard_report(out_dir: str, report: ShardReport) -> None:
    write_atomic(report_url(out_dir, report.output), json.dumps(report.to_json()).encode())


def is_done(out_dir: str, output_url: str) -> bool:
    return shard_exists(output_url) and shard_exists(report_url(out_dir, output_url))


def read_reports(out_dir: str) -> list[ShardReport]:
    fs, path = fsspec.core.url_to_fs(join(out_dir, REPORTS))
    if not fs.exists(path):
        return []
    reports = []
    for name in sorted(fs.ls(path, detail=False)):
        if name.endswith(".json"):
            with fs.open(name, "rb") as f:
                reports.append(ShardReport.from_json(json.load(f)))
    return reports


def write_stage_manifest(
    out_dir: str, stage: str, args: dict, reports: list[ShardReport], **extra: object
) -> dict:
    drops = [d for r in sorted(reports, key=lambda r: r.source) for d in r.drops]
    return write_report(
        out_dir,
        stage,
        args,
        samples_in=sum(r.samples_in for r in reports),
        samples_out=sum(r.samples_out for r in reports),
        drops=drops,
        shards=len(reports),
        **extra,
    )


class ReportProgress:
    """A progress bar fed by the reports workers write, whatever runner they run on."""

    def __init__(self, out_dir: str, total_shards: int, desc: str, interval: float = 1.0) -> None:
        self.out_dir, self.interval = out_dir, interval
        self.bar = tqdm(total=total_shards, desc=desc, unit="shard", dynamic_ncols=True)
        self.start_reports = len([n for n in self._names() if n.endswith(".json")])
        self.started = time.monotonic()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._poll, daemon=True)

    def _names(self) -> list[str]:
        fs, path = fsspec.core.url_to_fs(join(self.out_dir, REPORTS))
        return fs.ls(path, detail=False) if fs.exists(path) else []

    def _update(self) -> None:
        done = len([n for n in self._names() if n.endswith(".json")]) - self.start_reports
        self.bar.update(done - self.bar.n)

    def _poll(self) -> None:
        while not self.stop.wait(self.interval):
            self._update()

    def __enter__(self) -> ReportProgress:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()
        self._update()
        self.bar.close()

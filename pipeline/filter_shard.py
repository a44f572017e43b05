"""The work of `pipeline filter` on one shard or one output group.

Pass 1 (`class_histograms`) counts confidences per class; pass 2 (`SelectShardFn`) decides
for every pseudo-label whether and how often it is kept, and spills the kept copies, image
bytes included, into one small tar per (input shard, output group); pass 3
(`WriteGroupFn`) deals each group's copies over its output shards at even sizes, copies of
one image on different shards where there are enough, shuffled within each shard. Every
pass streams: memory depends on shard and buffer sizes, never on the corpus.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass

import apache_beam as beam
import fsspec
import numpy as np
from apache_beam.utils.shared import Shared

from data.decode import find_image
from data.errors import Drop
from data.read import iter_samples, iter_shard
from data.records import PseudoLabel, encode_pseudo, read_pseudo_shard, shard_header
from data.stages import batched
from data.write import AtomicShard, join, open_shard, shard_name
from pipeline.dedup import EvalIndex
from pipeline.filter_rules import BINS, ClassRule, conf_bin, unit_draw
from pipeline.reports import ShardReport, write_shard_report

WORK = "_work"
SHUFFLE_BUFFER = 64


@dataclass(frozen=True)
class FilterPlan:
    """Everything a worker needs, small enough to pickle into the job graph."""

    out_dir: str
    strategy: str  # "threshold" or "topk"
    top_p: int
    hard: bool
    groups: int
    shard_size: int
    eval_dir: str | None
    dedup_threshold: float | None
    teacher: str

    def spill_url(self, group: int, sidecar_url: str) -> str:
        return join(
            join(self.out_dir, f"{WORK}/spill/g{group:05d}"), sidecar_url.rsplit("/", 1)[-1]
        )

    def group_name(self, group: int) -> str:
        return f"train-{group:05d}"


_shared_eval = Shared()


def load_eval_index(plan: FilterPlan) -> EvalIndex | None:
    """The evaluation index, built once per worker process and shared by its threads."""
    if plan.eval_dir is None:
        return None
    return _shared_eval.acquire(
        lambda: EvalIndex.from_sidecars(plan.eval_dir, plan.dedup_threshold), tag=plan.eval_dir
    )


def _eval_matches(index: EvalIndex | None, labels: list[PseudoLabel]) -> list:
    if index is None:
        return [None] * len(labels)
    embeddings = None
    if labels and labels[0].embedding is not None:
        embeddings = np.stack([lab.embedding.astype(np.float32) for lab in labels])
    return index.matches([lab.content_hash for lab in labels], embeddings)


def _entries(label: PseudoLabel, plan: FilterPlan) -> list[tuple[int, float]]:
    """(class, probability) pairs a label is ranked under: its top-1, or its top-P."""
    if plan.strategy == "topk":
        return [
            (int(c), float(p))
            for c, p in zip(label.indices[: plan.top_p], label.probs[: plan.top_p], strict=True)
        ]
    return [(label.top1, label.confidence)]


class HistogramFn(beam.DoFn):
    """Pass 1: per-class confidence histograms of one sidecar shard, eval duplicates left out."""

    def __init__(self, plan: FilterPlan) -> None:
        self.plan = plan

    def setup(self) -> None:
        self.eval_index = load_eval_index(self.plan)

    def process(self, url: str) -> Iterator[tuple[int, np.ndarray]]:
        hists: dict[int, np.ndarray] = {}
        for chunk in batched(read_pseudo_shard(url, lambda d: None), 256):
            for label, match in zip(chunk, _eval_matches(self.eval_index, chunk), strict=True):
                if match is not None:
                    continue
                for cls, prob in _entries(label, self.plan):
                    hists.setdefault(cls, np.zeros(BINS, np.int64))[conf_bin(prob)] += 1
        yield from hists.items()


class _Aligned:
    """Finds each pseudo-label's source sample: the sidecar keeps the source's order, less
    the samples labeling dropped, so one forward walk over the source shard suffices."""

    def __init__(self, source: str) -> None:
        # What cannot be read from the source (a cut, an unsafe member name) was listed by
        # `pipeline label`, and never became a pseudo-label; listing it again here would count
        # a drop against no input record. A record whose source is gone is `missing_source`.
        self.samples = iter_shard(source, lambda drop: None)

    def find(self, key: str) -> dict | None:
        for sample in self.samples:
            if sample["__key__"] == key:
                return sample
        return None


def _training_label(label: PseudoLabel, cls: int, plan: FilterPlan) -> PseudoLabel:
    if plan.hard or plan.strategy == "topk":
        return PseudoLabel(
            label.key, np.array([cls]), np.array([1.0], np.float16), 1.0, 0.0, label.content_hash
        )
    return PseudoLabel(
        label.key, label.indices, label.probs, label.confidence, label.entropy, label.content_hash
    )


class SelectShardFn(beam.DoFn):
    """Pass 2: keep, cut or copy every pseudo-label of one sidecar; spill the copies by group."""

    def __init__(self, plan: FilterPlan, rules: dict[int, ClassRule]) -> None:
        self.plan, self.rules = plan, rules

    def setup(self) -> None:
        self.eval_index = load_eval_index(self.plan)

    def _selections(self, label: PseudoLabel) -> tuple[list[int], str | None]:
        """Classes the label is kept under (one entry per copy), or the reason it is not."""
        kept: list[int] = []
        for cls, prob in _entries(label, self.plan):
            rule = self.rules.get(cls)
            salt = f"{label.key}/{cls}" if self.plan.strategy == "topk" else label.key
            if rule is not None and rule.keeps(int(conf_bin(prob)), salt):
                kept += [cls] * rule.copies(label.key)
        if kept:
            return kept, None
        if self.plan.strategy == "topk":
            return [], "not_in_top_k"
        rule = self.rules.get(label.top1)
        if rule is None or not rule.keeps(int(conf_bin(label.confidence)), label.key):
            return [], "below_threshold"
        return [], "balanced_out"

    def process(self, url: str) -> Iterator[dict]:
        report = ShardReport(source=url, output=url.rsplit("/", 1)[-1])
        spills: dict[int, AtomicShard] = {}
        aligned = None
        try:
            for chunk in batched(read_pseudo_shard(url, report.drops.append), 256):
                report.samples_in += len(chunk)
                aligned = aligned or _Aligned(chunk[0].source)
                for label, match in zip(chunk, _eval_matches(self.eval_index, chunk), strict=True):
                    self._select(label, match, aligned, url, spills, report)
            report.groups = {str(g): s.count for g, s in sorted(spills.items())}
            for shard in spills.values():
                shard.commit()
        except BaseException:
            for shard in spills.values():
                shard.abort()
            raise
        write_shard_report(join(self.plan.out_dir, f"{WORK}/select"), report)
        yield report.to_json()

    def _select(
        self, label, match, aligned: _Aligned, url: str, spills: dict, report: ShardReport
    ) -> None:
        source = label.source
        if match is not None:
            report.drops.append(Drop(source, label.key, match[0], f"matches {match[1]}"))
            return
        classes, reason = self._selections(label)
        if reason is not None:
            report.drops.append(Drop(source, label.key, reason))
            return
        sample = aligned.find(label.key)
        if sample is None or find_image(sample) is None:
            report.drops.append(Drop(source, label.key, "missing_source"))
            return
        self._spill(label, sample, classes, url, spills)
        report.samples_out += len(classes)
        for cls in classes:
            report.classes[str(cls)] = report.classes.get(str(cls), 0) + 1

    def _spill(
        self, label: PseudoLabel, sample: dict, classes: list[int], url: str, spills: dict
    ) -> None:
        ext, image = find_image(sample)
        first = int(unit_draw(label.key, "group") * self.plan.groups)
        for copy, cls in enumerate(classes):
            group = (first + copy) % self.plan.groups
            if group not in spills:
                spills[group] = AtomicShard(self.plan.spill_url(group, url))
            spills[group].write(
                {
                    "__key__": f"{label.key}_c{copy:03d}",
                    ext: image,
                    "cls": str(cls).encode(),
                    "pl": encode_pseudo(_training_label(label, cls, self.plan)),
                }
            )


class _ShuffledShard:
    """One output shard filled through a small shuffle buffer that never puts two copies
    of one image side by side when it can help it."""

    def __init__(self, shard, capacity: int, seed: str) -> None:
        self.shard, self.capacity, self.received = shard, capacity, 0
        self.buffer: list[dict] = []
        self.rng = random.Random(seed)
        self.last_image = None

    @property
    def full(self) -> bool:
        return self.received >= self.capacity

    def add(self, sample: dict) -> None:
        self.received += 1
        self.buffer.append(sample)
        if len(self.buffer) > SHUFFLE_BUFFER:
            self._emit()

    def _emit(self) -> None:
        i = self.rng.randrange(len(self.buffer))
        for step in range(len(self.buffer)):
            j = (i + step) % len(self.buffer)
            if _image_of(self.buffer[j]) != self.last_image:
                i = j
                break
        self.buffer[i], self.buffer[-1] = self.buffer[-1], self.buffer[i]
        sample = self.buffer.pop()
        self.last_image = _image_of(sample)
        self.shard.write(sample)

    def close(self) -> None:
        while self.buffer:
            self._emit()
        self.shard.commit()


def _image_of(sample: dict) -> str:
    return sample["__key__"].rsplit("_c", 1)[0]


class WriteGroupFn(beam.DoFn):
    """Pass 3: deal one group's spilled copies over its `count` output shards, sizes within
    one of each other (the driver picks `count` so sizes match across groups too)."""

    def __init__(self, plan: FilterPlan) -> None:
        self.plan = plan

    def process(self, item: tuple[int, int, int]) -> Iterator[dict]:
        group, total, count = item
        name = self.plan.group_name(group)
        report = ShardReport(source=name, output=name, samples_in=total)
        spill_dir = join(self.plan.out_dir, f"{WORK}/spill/g{group:05d}")
        fs, path = fsspec.core.url_to_fs(spill_dir)
        spills = (
            sorted(p for p in fs.ls(path, detail=False) if p.endswith(".tar"))
            if fs.exists(path)
            else []
        )
        sizes = [total // count + (k < total % count) for k in range(count)]
        shards = []
        for k, size in enumerate(sizes):
            target = open_shard(join(self.plan.out_dir, shard_name(name, k)))
            target.write(shard_header(teacher=self.plan.teacher, group=group, index=k))
            shards.append(_ShuffledShard(target, size, f"{name}/{k}"))
        for sample in iter_samples(
            [_with_protocol(spill_dir, p) for p in spills], report.drops.append
        ):
            first = int(unit_draw(_image_of(sample), "shard") * count)
            copy = int(sample["__key__"].rsplit("_c", 1)[1])
            for step in range(count):
                shard = shards[(first + copy + step) % count]
                if not shard.full:
                    shard.add(
                        {
                            k: v
                            for k, v in sample.items()
                            if not k.startswith("__") or k == "__key__"
                        }
                    )
                    break
        for shard in shards:
            shard.close()
        report.samples_out = sum(s.received for s in shards)
        write_shard_report(self.plan.out_dir, report)
        yield report.to_json()


def _with_protocol(directory: str, path: str) -> str:
    if "://" in directory and "://" not in path:
        return directory.split("://", 1)[0] + "://" + path
    return path

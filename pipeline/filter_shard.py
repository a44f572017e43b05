"""The work of `pipeline filter` on one sidecar (pass 1) or one chunk of sidecars (pass 2).

Pass 1 (`HistogramFn`) counts confidences per class, sparsely: (class, {bin: count}).
Pass 2 (`WriteChunkFn`) takes a chunk of sidecars (a seeded random draw of the input), decides
for every pseudo-label whether and how often it is kept, walks the source shards for the
images (checking each against the content hash the label stored), and deals the copies
straight into the chunk's own training shards: sizes within one of each other, copies of
one image on different shards, each shard shuffled through a small buffer. No spill, no
second copy of the images: objects written are the training shards and one report per
chunk, and memory depends on the chunk, never on the corpus.
"""

from __future__ import annotations

import hashlib
import random
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial

import apache_beam as beam
import numpy as np
from apache_beam.utils.shared import Shared

from rs_pseudolabel.data.decode import find_image
from rs_pseudolabel.data.errors import Drop, UsageError
from rs_pseudolabel.data.read import iter_shard
from rs_pseudolabel.data.records import (
    PSEUDO_EXT,
    PseudoLabel,
    content_hash,
    decode_pseudo,
    encode_pseudo,
    read_pseudo_shard,
)
from rs_pseudolabel.data.stages import batched
from rs_pseudolabel.data.storage import exists, join, parent
from rs_pseudolabel.data.write import open_shard
from rs_pseudolabel.pipeline.confidence import conf_bin
from rs_pseudolabel.pipeline.dedup import EvalIndex
from rs_pseudolabel.pipeline.reports import ShardReport, unit_of_work, write_shard_report
from rs_pseudolabel.pipeline.source_roots import Roots, relocated
from rs_pseudolabel.pipeline.strategies import Rules, Strategy, unit_draw
from rs_pseudolabel.pipeline.summaries import LabelSummary
from rs_pseudolabel.pipeline.worklist import units

SHUFFLE_BUFFER = 64


@dataclass(frozen=True)
class FilterPlan:
    """Everything a worker needs, small enough to pickle into the job graph."""

    out_dir: str
    strategy: Strategy
    eval_dir: str | None
    dedup_threshold: float | None
    source_roots: Roots = ()  # (recorded folder, where it is now)
    keep_selection: str | None = None  # a previous filter's output whose choices are kept

    def where(self, source: str) -> str:
        """Where the source shard labeling read as `source` is now (--source-root)."""
        return relocated(source, self.source_roots)


def chunk_name(index: int) -> str:
    return f"train-{index:05d}"


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


def _labels_with_matches(url: str, index: EvalIndex | None, on_error) -> Iterator[tuple]:
    for chunk in batched(read_pseudo_shard(url, on_error), 256):
        yield from zip(chunk, _eval_matches(index, chunk), strict=True)


class HistogramFn(beam.DoFn):
    """Pass 1: per-class confidence histograms of a span of the job's sidecars, evaluation
    copies left out, as sparse {bin: count} maps (at 1,000 classes most bins are empty)."""

    def __init__(self, plan: FilterPlan, work_url: str) -> None:
        self.plan, self.work_url = plan, work_url

    def setup(self) -> None:
        self.eval_index = load_eval_index(self.plan)

    def process(self, span: tuple[int, int]) -> Iterator[tuple[int, dict[int, int]]]:
        hists: dict[int, Counter] = {}
        for url in units(self.work_url, span):
            for label, match in _labels_with_matches(url, self.eval_index, lambda d: None):
                if match is None:
                    for cls, prob in self.plan.strategy.ranked(label):
                        hists.setdefault(cls, Counter())[conf_bin(prob)] += 1
        for cls, counts in hists.items():
            yield cls, dict(counts)


def merge_sparse(parts: list[dict[int, int]]) -> dict[int, int]:
    total: Counter = Counter()
    for part in parts:
        total.update(part)
    return dict(total)


class _Aligned:
    """Finds each pseudo-label's source sample: the sidecar keeps the source's order, less
    the samples labeling dropped, so one forward walk over the source shard suffices."""

    def __init__(self, source: str, at: str) -> None:
        # What cannot be read from the source (a cut, an unsafe member name) was listed by
        # `pipeline label`, and never became a pseudo-label; listing it again here would count
        # a drop against no input record. A record whose sample is gone is `missing_source`;
        # a whole shard gone is a mistake of where, not a loss: the chunk fails, and a rerun
        # with --source-root writes it. Asked only when the shard could not be read: no
        # request more per source shard.
        def gone(drop: Drop) -> None:
            if drop.key is None and not exists(at):
                moved = f" (nor at {at})" if at != source else ""
                raise UsageError(
                    f"the source shard {source} that labeling read is not there{moved}: if "
                    f"the shards moved, pass --source-root {parent(source)}=WHERE_THEY_ARE_NOW"
                )

        self.source, self.at = source, at
        self.samples = iter_shard(at, gone)
        self.read = self.wanted = self.matched = 0  # samples read, kept labels, found alike

    def find(self, key: str) -> dict | None:
        for sample in self.samples:
            self.read += 1
            if sample["__key__"] == key:
                return sample
        return None


def _check_matched(sources: list[_Aligned]) -> None:
    """A chunk whose readable source shards give none of its kept labels their image holds
    other images than those labeled (another corpus under the same shard names, a wrong
    --source-root): it fails in one line rather than writing a selection of nothing. One
    shard rewritten among others is a loss of its samples only (`source_changed`)."""
    wanted = sum(a.wanted for a in sources)
    if wanted and not any(a.matched for a in sources) and any(a.read for a in sources):
        first = sources[0]
        moved = f" (read at {first.at})" if first.at != first.source else ""
        raise UsageError(
            f"the source shards labeling read hold other images than those labeled: none of "
            f"the {wanted} kept labels of this chunk finds its image (same key, same content "
            f"hash), e.g. in {first.source}{moved}; point --source-root at the shards "
            "labeling read"
        )


class Selection:
    """The strategy's rules applied to one pseudo-label: the classes it is kept under, one
    entry per copy, or the reason it is not kept."""

    def __init__(self, plan: FilterPlan, rules: Rules) -> None:
        self.strategy, self.rules = plan.strategy, rules

    def __call__(self, label: PseudoLabel) -> tuple[list[int], str | None]:
        return self.strategy.select(label, self.rules)

    def check_all_found(self, chunk: str) -> None:
        """Nothing to check: the rules decide each label on its own."""


class KeptSelection:
    """Another filter's choices applied to new pseudo-labels of the same images (Noisy
    Student selects once, then relabels): an image is kept, with as many copies, when that
    filter kept it, whatever its new confidence; every copy's class is the new label's
    top-1 under every strategy (the new teacher's label, soft or one-hot). Built from that
    filter's training shards of the same chunk, so it holds one chunk's choices, never the
    corpus's."""

    def __init__(self, plan: FilterPlan, previous: list[str]) -> None:
        self.strategy = plan.strategy
        self.chosen: dict[tuple[str, bytes], list[tuple[int, int]]] = {}

        def damaged(drop: Drop) -> None:
            raise UsageError(
                f"--keep-selection: cannot read {drop.shard}: {drop.reason} {drop.detail}"
            )

        for url in previous:
            for sample in iter_shard(url, damaged):
                key, _, copy = sample["__key__"].rpartition("_c")
                label = decode_pseudo(key, sample[PSEUDO_EXT])
                self.chosen.setdefault((key, label.content_hash), []).append(
                    (int(copy), int(sample["cls"]))
                )

    def __call__(self, label: PseudoLabel) -> tuple[list[int], str | None]:
        # a key the chunk shared between two source shards carries its source's tag
        for key in (label.key, f"{label.key}_{source_tag(label.source)}"):
            copies = self.chosen.pop((key, label.content_hash), None)
            if copies is not None:
                return [self.strategy.kept_class(label, cls) for _, cls in sorted(copies)], None
        return [], "not_selected"

    def check_all_found(self, chunk: str) -> None:
        """Every image the previous filter kept must be among the new labels: one missing
        means they label another corpus (or another labeling of it) and the selection
        cannot be kept."""
        if self.chosen:
            (key, _), *_ = self.chosen
            raise UsageError(
                f"--keep-selection: {len(self.chosen)} images the previous filter kept in "
                f"{chunk} (e.g. {key}) are not among the pseudo-labels of --input, or their "
                "image changed: label the same unlabeled shards that filter's labels came from"
            )


class _ShuffledShard:
    """One output shard filled through a small shuffle buffer that never puts two copies of
    one image side by side when it can help it: each sample leaves the buffer at random
    among those of another image than the last one written, and when the buffer drains at
    the end, the image with the most copies left goes first (the greedy order that keeps
    equal neighbours apart whenever any order can)."""

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
            self._emit(draining=False)

    def _emit(self, draining: bool) -> None:
        start = self.rng.randrange(len(self.buffer))
        order = [(start + step) % len(self.buffer) for step in range(len(self.buffer))]
        others = [j for j in order if self.buffer[j]["__image__"] != self.last_image] or order
        if draining:
            left = Counter(sample["__image__"] for sample in self.buffer)
            others.sort(key=lambda j: -left[self.buffer[j]["__image__"]])  # stable: ties random
        i = others[0]
        self.buffer[i], self.buffer[-1] = self.buffer[-1], self.buffer[i]
        sample = self.buffer.pop()
        self.last_image = sample.pop("__image__")
        self.shard.write(sample)

    def close(self) -> int:
        """Commit the shard; returns its size in bytes."""
        while self.buffer:
            self._emit(draining=True)
        size = self.shard.close_tar()
        self.shard.commit()
        return size

    def abort(self) -> None:
        self.shard.abort()


class WriteChunkFn(beam.DoFn):
    """Pass 2: a span of the job's chunks of sidecars in; per chunk, its training shards
    (`train-CHUNK-K.tar`) and one report out. A rerun after a kill passes over the chunk's
    shards that were committed: the chunk's choices are fixed by the keys, so it refills the
    rest exactly."""

    def __init__(self, plan: FilterPlan, size: float, work_url: str) -> None:
        self.plan, self.size, self.work_url = plan, size, work_url

    def setup(self) -> None:
        self.eval_index = load_eval_index(self.plan)

    def process(self, span: tuple[int, int], rules: dict) -> Iterator[dict]:
        for index, sidecars, previous in units(self.work_url, span):
            name = chunk_name(index)
            select = (
                partial(KeptSelection, self.plan, previous)
                if self.plan.keep_selection
                else partial(Selection, self.plan, rules)
            )
            report = unit_of_work(
                self.plan.out_dir, name, partial(self._write, name, sidecars, select)
            )
            if report is None:
                continue
            yield {"chunk": name, "samples_out": report.samples_out}

    def _choose(
        self, sidecars: list[str], select: Selection | KeptSelection, report: ShardReport
    ) -> list:
        """Every kept label with its classes (one per copy), in sidecar order."""
        kept = []

        def lost(drop: Drop) -> None:  # a damaged record is a sample in, and dropped
            report.samples_in += drop.key is not None
            report.drops.append(drop)

        for url in sidecars:
            for label, match in _labels_with_matches(url, self.eval_index, lost):
                report.samples_in += 1
                if match is not None:
                    report.drops.append(
                        Drop(label.source, label.key, match[0], f"matches {match[1]}")
                    )
                    continue
                classes, reason = select(label)
                if reason is not None:
                    report.drops.append(Drop(label.source, label.key, reason))
                else:
                    kept.append((label, classes))
        return kept

    def _write(
        self,
        name: str,
        sidecars: list[str],
        make_selection: Callable[[], Selection | KeptSelection],
    ) -> ShardReport:
        report = ShardReport(source=name, output=name)
        select = make_selection()
        kept = self._choose(sidecars, select, report)
        select.check_all_found(name)
        total = sum(len(classes) for _, classes in kept)
        count = max(1, round(total / self.size)) if total else 0
        sizes = [total // count + (k < total % count) for k in range(count)] if count else []
        shards = []
        try:
            for k, size in enumerate(sizes):
                target = open_shard(join(self.plan.out_dir, f"{name}-{k:03d}.tar"))
                shards.append(_ShuffledShard(target, size, f"{name}/{k}"))
            stats = self._deal(kept, shards, report)
            stats["bytes"] = sum(shard.close() for shard in shards)
        except BaseException:
            for shard in shards:
                shard.abort()
            raise
        report.stats = stats
        write_shard_report(self.plan.out_dir, report, name)
        return report

    def _deal(self, kept: list, shards: list[_ShuffledShard], report: ShardReport) -> dict:
        """Copies into the shards; returns what stats reads: classes, copies per image, and
        the soft labels' confidence and entropy, as the training samples hold them."""
        classes_out: Counter = Counter()
        copies_per_image: Counter = Counter()
        labels = LabelSummary()
        aligned: _Aligned | None = None
        read: list[_Aligned] = []
        shared = _shared_keys(kept)
        for label, classes in kept:
            source = label.source
            if aligned is None or aligned.source != source:  # kept labels come source by source
                aligned = _Aligned(source, self.plan.where(source))
                read.append(aligned)
            aligned.wanted += 1
            sample = aligned.find(label.key)
            found = find_image(sample) if sample is not None else None
            if found is None:
                report.drops.append(Drop(source, label.key, "missing_source"))
                continue
            ext, image = found
            if content_hash(image) != label.content_hash:
                report.drops.append(
                    Drop(source, label.key, "source_changed", "image differs from the labeled one")
                )
                continue
            aligned.matched += 1
            first = int(unit_draw(label.key, "shard") * len(shards))
            key = f"{label.key}_{source_tag(source)}" if label.key in shared else label.key
            written = 0
            for copy, cls in enumerate(classes):
                target = self.plan.strategy.training_label(label, cls)
                for step in range(len(shards)):
                    shard = shards[(first + copy + step) % len(shards)]
                    if not shard.full:
                        shard.add(
                            {
                                "__key__": f"{key}_c{copy:03d}",
                                "__image__": key,
                                ext: image,
                                "cls": str(cls).encode(),
                                PSEUDO_EXT: encode_pseudo(target),
                            }
                        )
                        written += 1
                        classes_out[cls] += 1
                        labels.add(
                            target.top1, *np.float16([target.confidence, target.entropy]).tolist()
                        )
                        break
            report.samples_out += written
            copies_per_image[str(written)] += 1
        _check_matched(read)
        return {
            **labels.to_json(),
            "classes": {str(c): n for c, n in classes_out.items()},
            "copies": dict(copies_per_image),
        }


def _shared_keys(kept: list) -> set[str]:
    """Keys that more than one source shard of a chunk holds (two folders ingested apart
    both have an `img000007`): their training keys carry their source's tag, so no shard
    holds one key twice and a keyed reader loses nothing."""
    sources: dict[str, str] = {}
    shared = set()
    for label, _ in kept:
        if sources.setdefault(label.key, label.source) != label.source:
            shared.add(label.key)
    return shared


def source_tag(source: str) -> str:
    """Eight hex digits naming a source shard by the URL it was labeled at."""
    return hashlib.blake2b(source.encode(), digest_size=4).hexdigest()

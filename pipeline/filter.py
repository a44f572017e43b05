"""`pipeline filter`: pseudo-labels -> balanced, deduplicated, shuffled training shards.

pass 1: sidecars -> per-class confidence histograms -> summed
rules:  per class a threshold and a copy rate (Noisy Student) or a top-K cut (Yalniz)
pass 2: sidecars + source shards -> keep / cut / copy each image -> spill by output group
pass 3: output groups -> training shards of even size, copies spread, shuffled
"""

from __future__ import annotations

import io
import math
import time
from dataclasses import asdict, dataclass

import apache_beam as beam
import fsspec
import numpy as np

from data.manifest import read_manifest
from data.records import shard_info
from data.specs import expand_shards
from data.write import join, write_atomic
from pipeline.beam_options import beam_options
from pipeline.cli_errors import UsageError
from pipeline.dedup import EvalIndex
from pipeline.filter_rules import BINS, threshold_rules, topk_rules
from pipeline.filter_shard import WORK, FilterPlan, HistogramFn, SelectShardFn, WriteGroupFn
from pipeline.reports import ReportProgress, read_reports, write_stage_manifest

SHARDS_PER_GROUP = 16


@dataclass
class FilterArgs:
    input: str
    output: str
    threshold: float = 0.3
    per_class: int = 130_000
    strategy: str = "threshold"
    top_p: int = 1
    dedup_against: str | None = None
    dedup_threshold: float | None = None  # None: calibrated on the evaluation set
    dedup_fpr: float = 0.005
    hard: bool = False
    shard_size: int = 1000
    runner: str | None = None


def _histograms(sidecars: list[str], plan: FilterPlan, options) -> np.ndarray:
    with beam.Pipeline(options=options) as p:
        hists = (
            p
            | "ListSidecars" >> beam.Create(sidecars)
            | "SpreadShards" >> beam.Reshuffle()
            | "CountConfidences" >> beam.ParDo(HistogramFn(plan))
            | "SumPerClass" >> beam.CombinePerKey(sum)
            | "Collect" >> beam.combiners.ToList()
        )
        hists | "Save" >> beam.Map(_save_histograms, join(plan.out_dir, f"{WORK}/histograms.npz"))
    with fsspec.open(join(plan.out_dir, f"{WORK}/histograms.npz"), "rb") as f:
        return np.load(f)["hist"]


def _save_histograms(pairs: list[tuple[int, np.ndarray]], url: str) -> None:
    classes = 1 + max((c for c, _ in pairs), default=-1)
    hist = np.zeros((classes, BINS), np.int64)
    for cls, counts in pairs:
        hist[cls] = counts
    buffer = io.BytesIO()
    np.savez(buffer, hist=hist)
    write_atomic(url, buffer.getvalue())  # whole or absent: a full disk leaves no torn file


def _eval_embeddings(args: FilterArgs, label_manifest: dict, options_args: list[str]) -> str:
    """Label the evaluation shards with the same teacher, with embeddings (resumable)."""
    from pipeline.label import LabelArgs
    from pipeline.label import run as label

    eval_dir = join(args.output, f"{WORK}/eval")
    teacher_args = label_manifest["args"]
    label(
        LabelArgs(
            teacher=teacher_args["teacher"],
            weights=teacher_args.get("weights"),
            input=args.dedup_against,
            output=eval_dir,
            embed=True,
            device=teacher_args.get("device", "auto"),
            runner=args.runner,
        ),
        options_args,
    )
    return eval_dir


def run(args: FilterArgs, beam_args: list[str]) -> dict:
    if not 0 <= args.threshold < 1:
        raise UsageError(f"--threshold must be in [0, 1), got {args.threshold}")
    options = beam_options(args.runner, beam_args)
    label_manifest = read_manifest(args.input)
    if label_manifest is None or label_manifest.get("stage") != "label":
        raise UsageError(
            f"{args.input} holds no finished `pipeline label` output (no manifest.json)"
        )
    settings = {k: v for k, v in asdict(args).items() if k != "runner"}
    done = read_manifest(args.output)
    if done is not None and done.get("args") == settings:
        return done
    sidecars = expand_shards(args.input)
    header = shard_info(sidecars[0])
    eval_dir, dedup_threshold = None, args.dedup_threshold
    if args.dedup_against:
        if not header.get("embed"):
            raise UsageError("--dedup-against needs embeddings: run `pipeline label` with --embed")
        eval_dir = _eval_embeddings(args, label_manifest, beam_args)
        if dedup_threshold is None:
            dedup_threshold = EvalIndex.from_sidecars(eval_dir, None, args.dedup_fpr).threshold
    started = time.monotonic()
    plan = FilterPlan(
        args.output,
        args.strategy,
        args.top_p if args.strategy == "topk" else 1,
        args.hard,
        1,
        args.shard_size,
        eval_dir,
        dedup_threshold,
        header.get("teacher", ""),
    )
    hist = _histograms(sidecars, plan, options)
    if args.strategy == "topk":
        rules = topk_rules(hist, args.per_class)
        expected = sum(min(args.per_class, int(hist[c].sum())) for c in rules)
    else:
        rules = threshold_rules(hist, args.threshold, args.per_class)
        expected = args.per_class * len(rules)
    groups = max(1, math.ceil(expected / (args.shard_size * SHARDS_PER_GROUP)))
    plan = FilterPlan(**{**asdict(plan), "groups": groups})

    select_dir = join(args.output, f"{WORK}/select")
    finished = {r.source for r in read_reports(select_dir)}
    todo = [u for u in sidecars if u not in finished]
    if todo:
        with (
            ReportProgress(select_dir, len(todo), "filter: select"),
            beam.Pipeline(options=options) as p,
        ):
            (
                p
                | "ListSidecars" >> beam.Create(todo)
                | "SpreadShards" >> beam.Reshuffle()
                | "SelectAndSpill" >> beam.ParDo(SelectShardFn(plan, rules))
            )
    selected = [r for r in read_reports(select_dir) if r.source in set(sidecars)]
    totals = {g: sum(r.groups.get(str(g), 0) for r in selected) for g in range(groups)}
    written = {r.source for r in read_reports(args.output)}
    todo_groups = [
        (g, n, m)
        for g, (n, m) in _shard_counts(totals, args.shard_size).items()
        if plan.group_name(g) not in written
    ]
    if todo_groups:
        with (
            ReportProgress(args.output, len(todo_groups), "filter: write"),
            beam.Pipeline(options=options) as p,
        ):
            (
                p
                | "ListGroups" >> beam.Create(todo_groups)
                | "SpreadGroups" >> beam.Reshuffle()
                | "WriteTrainingShards" >> beam.ParDo(WriteGroupFn(plan))
            )
    out_reports = read_reports(args.output)
    classes: dict[str, int] = {}
    for r in selected:
        for cls, n in r.classes.items():
            classes[cls] = classes.get(cls, 0) + n
    manifest = write_stage_manifest(
        args.output,
        "filter",
        settings,
        selected,
        teacher=plan.teacher,
        samples_written=sum(r.samples_out for r in out_reports),
        images_kept=sum(r.samples_in for r in selected)
        - sum(1 for r in selected for d in r.drops if d.key),
        class_counts=dict(sorted(classes.items(), key=lambda kv: int(kv[0]))),
        class_thresholds={str(c): rule.min_bin / BINS for c, rule in rules.items()},
        class_rates={str(c): round(rule.rate, 4) for c, rule in rules.items()},
        dedup_threshold=dedup_threshold,
        output_shards=len(_shards_in(args.output)),
        seconds=round(time.monotonic() - started, 2),
    )
    _remove(join(args.output, f"{WORK}/spill"))
    return manifest


def _shard_counts(totals: dict[int, int], shard_size: int) -> dict[int, tuple[int, int]]:
    """Output shards per group so that every shard, in every group, holds about the same
    number of samples: the corpus-wide size total / ceil(total / shard_size)."""
    total = sum(totals.values())
    size = total / max(1, math.ceil(total / shard_size))
    return {g: (n, max(1, round(n / size))) for g, n in totals.items() if n}


def _shards_in(url: str) -> list[str]:
    fs, path = fsspec.core.url_to_fs(url)
    return fs.glob(path.rstrip("/") + "/*.tar")


def _remove(url: str) -> None:
    """The spill is a full copy of the kept images: gone once the training shards are whole."""
    fs, path = fsspec.core.url_to_fs(url)
    if fs.exists(path):
        fs.rm(path, recursive=True)


def summary(manifest: dict) -> str:
    drops = ", ".join(f"{n} {reason}" for reason, n in manifest["drops"].items()) or "none"
    counts = list(manifest["class_counts"].values())
    spread = (
        f"{min(counts)}..{max(counts)} per class over {len(counts)} classes"
        if counts
        else "no classes"
    )
    if manifest.get("dedup_threshold") is not None:
        drops += f" (near-copy cosine >= {manifest['dedup_threshold']:.3f})"
    return (
        f"Filtered {manifest['samples_in']} pseudo-labels: kept {manifest['images_kept']} images as "
        f"{manifest['samples_written']} training samples ({spread}) in {manifest['output_shards']} shards "
        f"in {manifest['seconds']} s. Dropped: {drops}. Manifest and errors.jsonl are in {manifest['args']['output']}."
    )

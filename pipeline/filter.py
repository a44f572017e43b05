"""`pipeline filter`: pseudo-labels -> balanced, deduplicated, shuffled training shards.

pass 1: sidecars -> per-class confidence histograms (sparse) -> summed
rules:  per class a threshold and a copy rate (Noisy Student) or a top-K cut (Yalniz)
pass 2: chunks of sidecars + their source shards -> keep / cut / copy each image (checked
        against its content hash) -> the chunk's training shards, even sizes, shuffled
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass

import apache_beam as beam

from rs_pseudolabel.data.classes import CLASSES_FILE, write_class_names
from rs_pseudolabel.data.errors import UsageError
from rs_pseudolabel.data.manifest import (
    ErrorLog,
    StageOutput,
    finished_manifest,
    inputs_record,
    read_manifest,
)
from rs_pseudolabel.data.records import FORMAT_VERSION
from rs_pseudolabel.data.specs import is_pattern, is_shard_name, shard_entries
from rs_pseudolabel.data.storage import (
    Entry,
    absolute,
    is_dir,
    join,
    list_dir,
    parent,
    read_json,
    write_json,
)
from rs_pseudolabel.pipeline.beam_options import (
    beam_options,
    describe_job,
    dry_run_summary,
    is_dry_run,
    run_pipeline,
)
from rs_pseudolabel.pipeline.confidence import (
    CLASS_CONFIDENCES,
    bin_floor,
    load_histograms,
    save_histograms,
)
from rs_pseudolabel.pipeline.dedup import EvalIndex
from rs_pseudolabel.pipeline.filter_shard import (
    FilterPlan,
    HistogramFn,
    WriteChunkFn,
    chunk_name,
    merge_sparse,
)
from rs_pseudolabel.pipeline.options import (
    RECORD_FORMAT,
    FilterArgs,
    LabelArgs,
    fingerprint,
    fingerprint_defaults,
    manifest_args,
)
from rs_pseudolabel.pipeline.reports import (
    ReportProgress,
    clear_failures,
    finish_stage,
    given_back,
    merge_reports,
    output_lost,
    raise_failures,
    reported,
)
from rs_pseudolabel.pipeline.source_roots import Roots, source_roots
from rs_pseudolabel.pipeline.strategies import expected_copies, strategy_of
from rs_pseudolabel.pipeline.worklist import WORK, WorkList

SHARDS_PER_CHUNK = 16  # training shards one chunk writes: copies of an image spread over them
# Sidecars one chunk reads at most: a worker holds a chunk's kept labels and drops, so this
# bounds its memory whatever the corpus size and however few images the rules keep.
SIDECARS_PER_CHUNK = 64
CHUNK_SEED = 0
HISTOGRAMS = "histograms.npy"  # pass 1's counts, under _work/


def _label_folder(args: FilterArgs) -> tuple[dict, list[str]]:
    """The label output's finished manifest and its sidecars (one listing)."""
    if is_pattern(args.input):
        raise UsageError(
            f"--input {args.input}: filter reads the output folder of `pipeline label` "
            "(it holds manifest.json), not a shard pattern; pass that folder"
        )
    manifest = finished_manifest(args.input, "label")
    written = manifest.get("fingerprint", {}).get(RECORD_FORMAT, 1)
    if written != FORMAT_VERSION:
        raise UsageError(
            f"{args.input} holds pseudo-labels of record format {written}; this release "
            f"reads format {FORMAT_VERSION}: label the corpus again with this release"
        )
    sidecars = [e for e in list_dir(args.input) if is_shard_name(e.name)]
    if len(sidecars) != manifest.get("shards"):
        raise UsageError(
            f"{args.input} holds {len(sidecars)} sidecar shards but its manifest counts "
            f"{manifest.get('shards')}: the folder changed after labeling; relabel it"
        )
    return manifest, [e.url for e in sidecars]


def _check_roots(roots: Roots, label_manifest: dict) -> None:
    """Each --source-root OLD must name where the labeled shards were read: one that names
    no source would be ignored, and the chunks would fail or keep nothing."""
    recorded = (label_manifest.get("fingerprint") or {}).get("input")
    # The label stage records {spec, files, digest}; a manifest written otherwise (by hand, a
    # tool of the user's) may hold the spec alone, or nothing this check can use.
    spec = recorded.get("spec") if isinstance(recorded, dict) else recorded
    if not isinstance(spec, str) or not spec:
        return
    fixed = spec[: min((spec.find(c) for c in "*?[{" if c in spec), default=len(spec))]
    fixed = fixed.rstrip("/") if not is_pattern(spec) else fixed.rsplit("/", 1)[0]
    for old, _ in roots:
        if not (old == fixed or fixed.startswith(old + "/") or old.startswith(fixed + "/")):
            raise UsageError(
                f"--source-root {old}=...: the labels were read from {spec}, which is not "
                f"in {old}: OLD is the folder labeling read the shards from"
            )


def _check_dedup_source(spec: str) -> None:
    """Refuse a label output folder (sidecars, no images) before anything is labeled: the
    near-copy search needs the images of the evaluation set."""
    if is_pattern(spec) or not is_dir(spec):
        return
    found = read_manifest(spec)
    if found is not None and found.get("stage") == "label":
        raise UsageError(
            f"--dedup-against {spec} is the output of `pipeline label` and holds no images: "
            f"pass the evaluation set's image shards ({found.get('args', {}).get('input')})"
        )


def _eval_embeddings(args: FilterArgs, output: str, label_manifest: dict, beam_args) -> str:
    """Label the evaluation shards as the corpus was labeled (its manifest's arguments), with
    embeddings (resumable). The label stage (and with it torch, seconds of start-up) is
    imported only here: a filter without --dedup-against runs no model."""
    from rs_pseudolabel.pipeline.label import run as label

    eval_dir = join(output, WORK, "eval")
    label(
        LabelArgs.from_record(
            label_manifest["args"],
            input=args.dedup_against,
            output=eval_dir,
            embed=True,
            runner=args.runner,
            overwrite=False,
            describe_job=None,
        ),
        beam_args,
    )
    return eval_dir


def _histograms(
    label_dir: str, sidecars: list[str], plan: FilterPlan, options, url: str
) -> tuple[dict, str]:
    """The per-class confidence counts the rules need, and where they came from. Ranking by
    top-1 without deduplication counts what the label stage already counted while labeling:
    its class_confidences.npy is read, and no pass reads the sidecars for it. Otherwise
    pass 1 counts them, saved under _work/ so a rerun after a kill skips it."""
    if plan.eval_dir is None and plan.strategy.ranks_top1:
        counted = load_histograms(join(label_dir, CLASS_CONFIDENCES))
        if counted is not None:
            return counted, "label"
    counted = load_histograms(url)
    if counted is None:
        with WorkList(plan.out_dir, "count", sidecars) as work:
            run_pipeline(options, lambda p: _count(p, work, plan, url))
        counted = load_histograms(url)
    return counted, "pass 1"


def _count(p: beam.Pipeline, work: WorkList, plan: FilterPlan, url: str):
    return (
        p
        | "ListSidecars" >> beam.Create(work.spans)
        | "SpreadShards" >> beam.Reshuffle()
        | "CountConfidences" >> beam.ParDo(HistogramFn(plan, work.url))
        | "SumPerClass" >> beam.CombinePerKey(merge_sparse)
        | "Collect" >> beam.combiners.ToList()
        | "Save" >> beam.Map(_save_counts, url)
    )


def _save_counts(pairs: list[tuple[int, dict[int, int]]], url: str) -> None:
    save_histograms(url, dict(pairs))


def _write(p: beam.Pipeline, work: WorkList, plan: FilterPlan, size: float, rules: dict):
    rule_table = p | "Rules" >> beam.Create([rules])
    return (
        p
        | "ListChunks" >> beam.Create(work.spans)
        | "SpreadChunks" >> beam.Reshuffle()
        | "WriteTrainingShards"
        >> beam.ParDo(WriteChunkFn(plan, size, work.url), beam.pvalue.AsSingleton(rule_table))
    )


def chunks(
    sidecars: list[str], expected: float, shard_size: int, workers: int, count: int = 0
) -> list:
    """Sidecars dealt into chunks of nearly equal size, in a seeded random order: each chunk
    mixes images from all over the corpus, writes about SHARDS_PER_CHUNK training shards
    (fewer when the rules keep little), reads at most SIDECARS_PER_CHUNK sidecars, and there
    are enough chunks for every worker. A `count` of another filter's chunks over sidecars
    of the same names deals them as that filter did."""
    wanted = max(
        workers,
        round(expected / (SHARDS_PER_CHUNK * shard_size)),
        math.ceil(len(sidecars) / SIDECARS_PER_CHUNK),
    )
    count = count or max(1, min(len(sidecars), wanted))
    order = list(sidecars)
    random.Random(CHUNK_SEED).shuffle(order)
    return [(i, order[i::count]) for i in range(count)]


def _kept_selection(args: FilterArgs, sidecars: list[str]) -> tuple[dict, dict[int, list]]:
    """The finished filter whose choices --keep-selection keeps, and its training shards by
    chunk: each new chunk reads the same sidecars as that filter's chunk of the same number
    and keeps what that chunk kept."""
    if args.dedup_against:
        raise UsageError(
            "--keep-selection keeps a selection its own filter already deduplicated: "
            "drop --dedup-against"
        )
    if absolute(args.keep_selection) == absolute(args.output):
        raise UsageError("--keep-selection names --output itself: pass the previous round's")
    try:
        previous = finished_manifest(args.keep_selection, "filter")
    except UsageError as exc:
        raise UsageError(f"--keep-selection: {exc}") from None
    if previous.get("input_sidecars", len(sidecars)) != len(sidecars):
        raise UsageError(
            f"--keep-selection {args.keep_selection} filtered {previous['input_sidecars']} "
            f"sidecars, --input holds {len(sidecars)}: label the same unlabeled shards"
        )
    by_chunk: dict[int, list] = {}
    for entry in list_dir(args.keep_selection):
        if is_shard_name(entry.name) and entry.name.startswith("train-"):
            by_chunk.setdefault(int(entry.name.split("-")[1]), []).append(entry.url)
    return previous, by_chunk


def _workers(options) -> int:
    values = options.get_all_options()
    return int(values.get("direct_num_workers") or values.get("num_workers") or 1)


@dataclass
class FilterInputs:
    """What a filter job reads, resolved once before anything is written: the label
    output (its manifest and sidecars), where its sources are now, the evaluation shards to
    deduplicate against, and the previous filter whose selection is kept."""

    roots: Roots
    label_manifest: dict
    sidecars: list[str]
    dedup_entries: list[Entry]
    previous: dict | None  # --keep-selection's finished manifest
    previous_shards: dict[int, list]  # and its training shards by chunk

    @property
    def teacher(self) -> str:
        return self.label_manifest.get("teacher", "")


@dataclass
class Selection:
    """What the job keeps: the confidence histograms and the rules drawn from them (none
    for a kept selection), and the training samples expected."""

    hist: dict
    counted_by: str
    rules: dict
    expected: int


def run(args: FilterArgs, beam_args: list[str]) -> dict:
    """The filter, as its steps: resolve the inputs, claim the output, index the
    evaluation set (--dedup-against), select (or keep --keep-selection's choices), write the
    chunks, and record the manifest."""
    # One local thread by default: the filter's work is pure Python under one GIL, so a
    # second thread adds no speed, only a second chunk's memory (bench_filter.py).
    options = beam_options(args.runner, beam_args, local_workers=1)
    inputs = _resolve_inputs(args)
    out = StageOutput(  # the claim: what later steps write under, and what defines it
        args.output,
        "filter",
        _fingerprint(args, inputs),
        inputs=[args.input, *sorted({parent(e.url) for e in inputs.dedup_entries})],
        overwrite=args.overwrite,
        defaults=fingerprint_defaults(type(args)),
    )
    if is_dry_run(options):
        return _dry_run(args, options, inputs.sidecars, inputs.teacher)
    done = out.open()
    if done is not None:
        return {**done, "already_done": True}
    output = out.out_dir
    with output_lost(output):  # a storage lost mid-job: one line naming the folder
        with given_back(out):  # a refusal before the first chunk leaves no claim
            started = time.monotonic()
            eval_dir, dedup_threshold = _dedup_index(args, out, inputs, beam_args)
            plan = FilterPlan(
                output,
                strategy_of(args),
                eval_dir,
                dedup_threshold,
                inputs.roots,
                absolute(args.keep_selection) if inputs.previous is not None else None,
            )
            if inputs.previous is not None:  # the choices are made: no histograms, no rules
                selection = Selection({}, "kept selection", {}, inputs.previous["samples_written"])
            else:
                selection = _select(args, inputs, plan, options, out)
            work = _chunk_work(args, inputs, selection, options)
            _write_chunks(output, work, plan, selection, args.shard_size, options)
        with ErrorLog(output) as log:
            merged = merge_reports(output, [chunk_name(i) for i, *_ in work], log, ahead=2)
    return _finish(args, beam_args, out, inputs, plan, selection, merged, len(work), started)


def _resolve_inputs(args: FilterArgs) -> FilterInputs:
    roots = source_roots(args.source_root)
    label_manifest, sidecars = _label_folder(args)
    _check_roots(roots, label_manifest)
    if args.dedup_against:
        _check_dedup_source(args.dedup_against)
    dedup_entries = shard_entries(args.dedup_against) if args.dedup_against else []
    previous, previous_shards = (
        _kept_selection(args, sidecars) if args.keep_selection else (None, {})
    )
    return FilterInputs(roots, label_manifest, sidecars, dedup_entries, previous, previous_shards)


def _fingerprint(args: FilterArgs, inputs: FilterInputs) -> dict[str, object]:
    """What defines the output: the options, and what each input is."""
    dedup = (
        inputs_record(absolute(args.dedup_against), inputs.dedup_entries)
        if args.dedup_against
        else None
    )
    kept = inputs.previous and {
        "folder": absolute(args.keep_selection),
        "fingerprint": inputs.previous["fingerprint"],
    }
    label = {"folder": absolute(args.input), "fingerprint": inputs.label_manifest["fingerprint"]}
    return fingerprint(args, input=label, dedup_against=dedup, keep_selection=kept)


def _dedup_index(
    args: FilterArgs, out: StageOutput, inputs: FilterInputs, beam_args: list[str]
) -> tuple[str | None, float | None]:
    """--dedup-against: the evaluation set labeled as the corpus was (its embeddings), and
    the near-copy threshold (given, or calibrated on it); else (None, the given one)."""
    if not args.dedup_against:
        return None, args.dedup_threshold
    if not inputs.label_manifest["fingerprint"].get("embed"):
        raise UsageError("--dedup-against needs embeddings: run `pipeline label` with --embed")
    eval_dir = _eval_embeddings(args, out.out_dir, inputs.label_manifest, beam_args)
    embedded = read_manifest(eval_dir) or {}
    if not embedded.get("samples_out"):
        out.abandon()
        drops = ", ".join(f"{n} {r}" for r, n in embedded.get("drops", {}).items())
        raise UsageError(
            f"--dedup-against {args.dedup_against} holds no images the teacher could "
            f"read ({embedded.get('samples_in', 0)} samples; dropped: {drops or 'none'}): "
            "pass the evaluation set's image shards"
        )
    if args.dedup_threshold is not None:
        return eval_dir, args.dedup_threshold
    return eval_dir, EvalIndex.from_sidecars(eval_dir, None, args.dedup_fpr).threshold


def _select(
    args: FilterArgs, inputs: FilterInputs, plan: FilterPlan, options, out: StageOutput
) -> Selection:
    """Pass 1: the confidence histograms per class, and the strategy's rules from them."""
    hist, counted_by = _histograms(
        args.input, inputs.sidecars, plan, options, join(out.out_dir, WORK, HISTOGRAMS)
    )
    rules = plan.strategy.rules(hist)
    if not rules:
        out.abandon()
        raise UsageError(plan.strategy.nothing_kept(hist))
    return Selection(hist, counted_by, rules, expected_copies(hist, rules))


def _chunk_work(
    args: FilterArgs, inputs: FilterInputs, selection: Selection, options
) -> list[tuple[int, list[str], list]]:
    """(chunk number, its sidecars, the kept selection's shards of that chunk), for all."""
    previous = inputs.previous
    return [
        (i, urls, inputs.previous_shards.get(i, []))
        for i, urls in chunks(
            inputs.sidecars,
            selection.expected,
            args.shard_size,
            _workers(options),
            previous["chunks"] if previous is not None else 0,
        )
    ]


def _write_chunks(
    output: str, work: list, plan: FilterPlan, selection: Selection, shard_size: int, options
) -> None:
    """Pass 2: the chunks not yet written, as one Beam job."""
    expected = selection.expected
    size = expected / max(1, math.ceil(expected / shard_size))
    clear_failures(output)
    finished = reported(output)
    todo = [c for c in work if chunk_name(c[0]) not in finished]
    if not todo:
        return
    with (
        WorkList(output, "chunks", todo) as chunk_list,
        ReportProgress(output, len(todo), "filter", done_before=len(finished)) as progress,
    ):
        rules = selection.rules
        run_pipeline(options, lambda p: _write(p, chunk_list, plan, size, rules))
        progress.raise_lost()
    raise_failures(output)


def _finish(
    args: FilterArgs,
    beam_args: list[str],
    out: StageOutput,
    inputs: FilterInputs,
    plan: FilterPlan,
    selection: Selection,
    merged,
    chunk_count: int,
    started: float,
) -> dict:
    """The manifest: what was kept of each class and by which rule, and what was not."""
    output = out.out_dir
    class_names = read_json(join(args.input, CLASSES_FILE))
    if class_names is not None:
        write_class_names(output, class_names)
    classes = merged.stats.get("classes", {})
    rules = selection.rules
    return finish_stage(
        out,
        merged,
        manifest_args(args, beam_args),
        teacher=inputs.teacher,
        samples_written=merged.samples_out,
        images_kept=merged.samples_in - merged.drops.total(),
        class_counts=dict(sorted(classes.items(), key=lambda kv: int(kv[0]))),
        empty_classes=[
            f"{i} ({name})" for i, name in enumerate(class_names or []) if str(i) not in classes
        ],
        class_thresholds={str(c): bin_floor(rule.min_bin) for c, rule in rules.items()},
        class_rates={str(c): round(rule.rate, 4) for c, rule in rules.items()},
        capped_classes=[str(c) for c in plan.strategy.capped(selection.hist, rules)],
        dedup_threshold=plan.dedup_threshold,
        confidences_counted_by=selection.counted_by,
        output_shards=len([e for e in list_dir(output) if is_shard_name(e.name)]),
        chunks=chunk_count,
        input_sidecars=len(inputs.sidecars),
        seconds=round(time.monotonic() - started, 2),
        summary={k: v for k, v in merged.stats.items() if k != "classes"},
    )


def _dry_run(args: FilterArgs, options, sidecars: list[str], teacher: str) -> dict:
    plan = FilterPlan(absolute(args.output), strategy_of(args), None, None)
    work = [(i, urls, []) for i, urls in chunks(sidecars, 0, args.shard_size, _workers(options))]
    hist_url = join(plan.out_dir, WORK, HISTOGRAMS)
    steps, descriptions = [], []
    for build in (
        lambda p: _count(p, WorkList(plan.out_dir, "count", sidecars), plan, hist_url),
        lambda p: _write(p, WorkList(plan.out_dir, "chunks", work), plan, args.shard_size, {}),
    ):
        description = describe_job(run_pipeline(options, build), options)
        steps += description.get("steps", [])
        descriptions.append(description)
    job = {**descriptions[-1], "steps": steps, "stage": "filter", "input_shards": len(sidecars)}
    if args.describe_job:
        write_json(args.describe_job, job)
    return {"dry_run": job}


def summary(manifest: dict) -> str:
    if "dry_run" in manifest:
        return dry_run_summary(manifest["dry_run"], "filter jobs", "sidecars")
    if manifest.get("already_done"):
        return (
            f"Nothing to do: {manifest['args']['output']} already holds this filter's output "
            f"({manifest['samples_written']} training samples)."
        )
    drops = ", ".join(f"{n} {reason}" for reason, n in manifest["drops"].items()) or "none"
    counts = list(manifest["class_counts"].values())
    spread = (
        f"{min(counts)}..{max(counts)} per class over {len(counts)} classes"
        if counts
        else "no classes"
    )
    if manifest.get("dedup_threshold") is not None:
        drops += f" (near-copy cosine >= {manifest['dedup_threshold']:.3f})"
    capped = manifest.get("capped_classes") or []
    kept = manifest["args"].get("keep_selection")
    return (
        (f"Kept the selection of {kept}, relabeled. " if kept else "")
        + f"Filtered {manifest['samples_in']} pseudo-labels: kept {manifest['images_kept']} images as "
        f"{manifest['samples_written']} training samples ({spread}) in {manifest['output_shards']} shards "
        f"in {manifest['seconds']} s. Dropped: {drops}."
        + (
            f" {len(capped)} classes had too few images for --per-class and were capped at "
            f"--max-copies {manifest['args']['max_copies']:g} copies per image."
            if capped
            else ""
        )
        + _empty_words(manifest.get("empty_classes") or [])
        + f" Manifest and errors.jsonl are in {manifest['args']['output']}."
    )


def _empty_words(empty: list[str]) -> str:
    """Classes of classes.json that kept no image: a student never sees them as
    pseudo-labeled, said rather than found by their accuracy."""
    if not empty:
        return ""
    shown = ", ".join(empty[:10]) + (" ..." if len(empty) > 10 else "")
    classes = "class" if len(empty) == 1 else "classes"
    return f" {len(empty)} {classes} kept no image: {shown} (all listed in manifest.json)."

"""`pipeline label`: the teacher labels an unlabeled corpus, as an Apache Beam job.

shards -> spread over workers -> label each shard (decode, eval transform, batched
forward, top-k) -> one sidecar shard per input shard -> manifest

The launcher lists the inputs and the output folder (a few listings, whatever the number of
shards), reads only the teacher's metadata, and leaves the model, the device and the
shards to the workers.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from functools import partial

import apache_beam as beam
import torch
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.utils.shared import Shared

from rs_pseudolabel.data.classes import write_class_names
from rs_pseudolabel.data.device import worker_devices
from rs_pseudolabel.data.errors import UsageError
from rs_pseudolabel.data.manifest import ERRORS, ErrorLog, StageOutput, inputs_record
from rs_pseudolabel.data.read import iter_samples
from rs_pseudolabel.data.records import SHARD_HEADER_KEY
from rs_pseudolabel.data.specs import shard_entries
from rs_pseudolabel.data.storage import absolute, exists, join, open_read, parent, write_json
from rs_pseudolabel.pipeline.beam_options import (
    beam_options,
    describe_job,
    dry_run_summary,
    is_direct,
    is_dry_run,
    run_pipeline,
    workers_in_process,
)
from rs_pseudolabel.pipeline.confidence import CLASS_CONFIDENCES, save_histograms, sparse_from_json
from rs_pseudolabel.pipeline.imported import (
    LISTED,
    ImportedLabels,
    common_topk,
    predictions_id,
    read_predictions,
)
from rs_pseudolabel.pipeline.label_decode import default_processes, warm_pool
from rs_pseudolabel.pipeline.label_shard import (
    Teacher,
    Teachers,
    default_batch,
    ensemble_id,
    label_shard,
    sidecar_names,
    teacher_shares,
    teacher_sources,
)
from rs_pseudolabel.pipeline.options import (
    LabelArgs,
    fingerprint,
    fingerprint_defaults,
    manifest_args,
    worker_spec,
)
from rs_pseudolabel.pipeline.reports import (
    ReportProgress,
    clear_failures,
    done_outputs,
    finish_stage,
    given_back,
    merge_reports,
    output_lost,
    raise_failures,
    reported,
    unit_of_work,
)
from rs_pseudolabel.pipeline.worklist import WorkList, units
from rs_pseudolabel.teachers import describe_teacher, is_run_dir


class LabelShardFn(beam.DoFn):
    """Beam's unit of work: a span of the job's (shard URL, sidecar name) list, each shard
    labeled and reported on its own (a span is one shard unless the job has thousands). The
    teachers (one per device the worker sees) and the decode processes are set up once per
    worker process and shared by its threads, which are spread over the devices. A mistake
    the user can fix is recorded for the launcher, not raised: one line for the user, instead
    of a retried, failing job."""

    def __init__(
        self, args: LabelArgs, teacher_id: str, threads: int | None, work_url: str
    ) -> None:
        self.args, self.teacher_id, self.threads = args, teacher_id, threads
        self.work_url = work_url
        self.shared = Shared()

    def _teachers(self) -> Teachers:
        args = self.args
        processes = default_processes(args.decode_processes)
        if args.from_predictions:
            path, topk, made_by = args.from_predictions, args.topk, self.teacher_id
            return Teachers(lambda _: ImportedLabels(path, topk, processes, made_by), ["cpu"], None)

        def load(where: str) -> Teacher:
            return Teacher.load(
                args.teacher, args.weights, where, self.teacher_id, args.decode, processes,
                args.compile, args.teacher_weights, args.tta,
            )  # fmt: skip

        return Teachers(load, worker_devices(args.device), args.forwards_per_device)

    def setup(self) -> None:
        if self.threads:
            torch.set_num_threads(self.threads)
        # Threads of one worker process share its teachers when they would set them up alike.
        spec = (*worker_spec(self.args), self.teacher_id)
        tag = hashlib.sha1(repr(spec).encode()).hexdigest()
        self.teacher, self.slot, self.failure = None, None, None
        try:
            self.teacher, self.slot = self.shared.acquire(self._teachers, tag=tag).assign()
        except Exception as exc:  # recorded per unit: a user's line, or a bug's traceback
            self.failure, self.failure_trace = exc, exc.__traceback__

    def _label(self, url: str, name: str):
        if self.failure is not None:  # the set-up's own frames, not one more per unit
            raise self.failure.with_traceback(self.failure_trace)
        args = self.args
        batch = args.batch_size or default_batch(self.teacher.device)
        return label_shard(
            url, name, args.output, self.teacher, batch, args.topk, args.embed, self.slot
        )

    def process(self, span: tuple[int, int]) -> Iterator[dict]:
        for url, name in units(self.work_url, span):
            report = unit_of_work(self.args.output, name, partial(self._label, url, name))
            if report is None:
                continue
            beam.metrics.Metrics.counter("label", "images").inc(report.samples_out)
            yield {"output": name, "samples_out": report.samples_out}


def _threads_per_worker(options) -> int | None:
    """On the local runner, split the cores between workers instead of oversubscribing them."""
    if not is_direct(options):
        return None
    workers = options.get_all_options().get("direct_num_workers")
    return max(1, (os.cpu_count() or 1) // max(1, workers or 1))


@dataclass(frozen=True)
class MadeBy:
    """What labels a job, as the launcher resolves it: its id, its classes, the arguments
    the workers get (paths made absolute), the run directories it reads, and for imported
    labels the file's keys."""

    teacher_id: str
    class_names: list[str] | None
    args: LabelArgs
    reads: list[str]
    predicted: frozenset[str] | None = None


def _by_teachers(args: LabelArgs) -> MadeBy:
    if not args.teacher:
        raise UsageError("give --teacher (a model name or run directory) or --from-predictions")
    sources = [
        (absolute(t) if is_run_dir(t) else t, absolute(w) if w else None)
        for t, w in teacher_sources(args.teacher, args.weights)
    ]
    described = [describe_teacher(t, w) for t, w in sources]
    shares = teacher_shares(args.teacher_weights, len(sources))
    resolved = replace(
        args,
        teacher=tuple(t for t, _ in sources),
        weights=tuple(w for _, w in sources if w),
        output=absolute(args.output),
    )
    return MadeBy(
        ensemble_id([i for i, _ in described], shares, args.tta),
        _class_names(described),
        resolved,
        [t for t, w in sources if w is None],
    )


def _by_predictions(args: LabelArgs) -> MadeBy:
    """Imported labels: refused with any option of a teacher, read once here so that a bad
    row is said before any work."""
    given = [
        flag
        for flag, value in (
            ("--teacher", args.teacher), ("--weights", args.weights),
            ("--teacher-weights", args.teacher_weights), ("--tta", args.tta != "none"),
            ("--embed", args.embed), ("--compile", args.compile),
        )
        if value
    ]  # fmt: skip
    if given:
        raise UsageError(
            f"--from-predictions brings labels made elsewhere: {given[0]} has nothing to act on"
        )
    path = absolute(args.from_predictions)
    predictions = read_predictions(path, args.topk)
    resolved = replace(
        args,
        from_predictions=path,
        topk=common_topk(predictions, args.topk),
        output=absolute(args.output),
    )
    return MadeBy(predictions_id(path), None, resolved, [], frozenset(predictions))


def _unmatched(predicted: frozenset[str], output: str, names: list[str]) -> dict:
    """The file's rows whose key no image of the corpus has: counted, the first named."""
    matched = {
        s["__key__"]
        for s in iter_samples([join(output, n) for n in names], lambda drop: None)
        if s["__key__"] != SHARD_HEADER_KEY
    }
    errors = join(output, ERRORS)
    if exists(errors):
        with open_read(errors) as f:
            matched |= {e["key"] for e in map(json.loads, f) if e.get("reason") != "no_prediction"}
    unmatched = sorted(predicted - matched)
    return {
        "rows": len(predicted),
        "unmatched": len(unmatched),
        "unmatched_keys": unmatched[:LISTED],
    }


def run(args: LabelArgs, beam_args: list[str]) -> dict:
    """The label job, as its steps: what labels (teachers or imported predictions) and over
    which shards, the output claimed, the shards not yet labeled labeled, the manifest."""
    options = beam_options(args.runner, beam_args)
    made = _by_predictions(args) if args.from_predictions else _by_teachers(args)
    entries = shard_entries(args.input)
    shards = [e.url for e in entries]
    job = LabelJob(
        made,
        list(zip(shards, sidecar_names(shards), strict=True)),
        options,
        partial(_job, made.args, made.teacher_id, _threads_per_worker(options)),
        args.decode_processes,
        manifest_args(args, beam_args),
    )
    if is_dry_run(options):
        return _dry_run(job, args.describe_job)
    out = StageOutput(
        args.output,
        "label",
        fingerprint(
            args, input=inputs_record(absolute(args.input), entries), teacher=made.teacher_id
        ),
        inputs=sorted({parent(u) for u in shards}) + made.reads,
        overwrite=args.overwrite,
        defaults=fingerprint_defaults(type(args)),
    )
    done = out.open()
    if done is not None:
        return {**done, "already_done": True}
    with output_lost(out.out_dir):  # a storage lost mid-job: one line naming the folder
        todo = _label_shards(job, out)
        with ErrorLog(out.out_dir) as log:
            merged = merge_reports(out.out_dir, job.names, log, {n for _, n in todo.shards})
    if not merged.samples_in and merged.shard_faults:  # not an empty corpus: a lost one
        faults = ", ".join(f"{n} {r}" for r, n in sorted(merged.shard_faults.items()))
        out.abandon()  # nothing of it is worth keeping: the rerun starts afresh
        raise UsageError(
            f"no sample of {args.input} could be read: its shards are damaged ({faults}): "
            "restore them and rerun"
        )
    return _finish(job, out, merged, todo)


def _job(resolved: LabelArgs, teacher_id: str, threads: int, work: WorkList):
    """The Beam job over the shards of `work`: spread over the workers, each labeled."""
    return lambda p: (
        p
        | "ListShards" >> beam.Create(work.spans)
        | "SpreadShards" >> beam.Reshuffle()
        | "LabelShards" >> beam.ParDo(LabelShardFn(resolved, teacher_id, threads, work.url))
    )


@dataclass(frozen=True)
class LabelJob:
    """One label run as the launcher resolves it, before anything is written: what labels,
    the (shard, sidecar name) pairs, the runner's options, the Beam job over a work list,
    and the manifest's record of the arguments. The steps after the claim read this rather
    than the command's arguments."""

    made: MadeBy
    every: list[tuple[str, str]]
    options: PipelineOptions
    build: Callable[[WorkList], Callable]
    decode_processes: int | None
    manifest_args: dict

    @property
    def names(self) -> list[str]:
        return [n for _, n in self.every]


@dataclass
class Todo:
    """The (shard, sidecar name) pairs this run labeled, and the seconds it took."""

    shards: list[tuple[str, str]]
    seconds: float


def _label_shards(job: LabelJob, out: StageOutput) -> Todo:
    """The shards whose sidecars are not yet written, labeled as one job."""
    output = out.out_dir
    clear_failures(output)
    finished = done_outputs(output)
    todo = [(u, n) for u, n in job.every if n not in finished]
    started = time.monotonic()
    if todo:
        if workers_in_process(job.options):
            warm_pool(default_processes(job.decode_processes))
        before = len(reported(output))
        with given_back(out):
            with (
                WorkList(output, "label", todo) as work,
                ReportProgress(
                    output, len(todo), "label", done_before=before, rates=True
                ) as progress,
            ):
                run_pipeline(job.options, job.build(work))
                progress.raise_lost()
            raise_failures(output)
    return Todo(todo, time.monotonic() - started)


def _finish(job: LabelJob, out: StageOutput, merged, todo: Todo) -> dict:
    """classes.json, the class confidence histograms, and the manifest written last."""
    output, made = out.out_dir, job.made
    if made.class_names is not None:
        write_class_names(output, made.class_names)
    counted = sparse_from_json(merged.stats.pop("class_confidences", {}))
    save_histograms(join(output, CLASS_CONFIDENCES), counted)
    seconds, fresh = todo.seconds, len(todo.shards)
    return finish_stage(
        out,
        merged,
        job.manifest_args,
        teacher=made.teacher_id,
        shards=merged.shards,
        shards_done_before=len(job.every) - fresh,
        seconds=round(seconds, 2),
        images_per_second=round(merged.fresh_samples_out / max(seconds, 1e-9), 2) if fresh else 0.0,
        time_split={k: round(v, 3) for k, v in merged.time_split.items()},
        summary=merged.stats,
        **(
            {}
            if made.predicted is None
            else {"predictions": _unmatched(made.predicted, output, job.names)}
        ),
    )


def _class_names(described: list[tuple[str, list[str] | None]]) -> list[str] | None:
    """The classes the teachers' records name; teachers naming other classes are refused."""
    named = [(i, names) for i, names in described if names is not None]
    for teacher_id, names in named[1:]:
        if names != named[0][1]:
            raise UsageError(
                f"the teachers {named[0][0]} and {teacher_id} name other classes: an "
                "ensemble averages one set of classes"
            )
    return named[0][1] if named else None


def _dry_run(job: LabelJob, describe_to: str | None) -> dict:
    """The job Beam would run over every shard, built and described, nothing labeled."""
    result = run_pipeline(
        job.options, job.build(WorkList(job.made.args.output, "label", job.every))
    )
    description = {
        **describe_job(result, job.options),
        "stage": "label",
        "input_shards": len(job.every),
    }
    if describe_to:
        write_json(describe_to, description)
    return {"dry_run": description}


def summary(manifest: dict) -> str:
    if "dry_run" in manifest:
        return dry_run_summary(manifest["dry_run"], "label job", "shards")
    drops = ", ".join(f"{n} {reason}" for reason, n in manifest["drops"].items()) or "none"
    faults = ", ".join(f"{n} {r}" for r, n in manifest["shard_faults"].items())
    if manifest.get("already_done"):
        return (
            f"Nothing to do: {manifest['args']['output']} already holds these labels "
            f"({manifest['samples_out']} of {manifest['samples_in']} samples, teacher "
            f"{manifest['teacher']})."
        )
    return (
        f"Labeled {manifest['samples_out']} of {manifest['samples_in']} samples from "
        f"{manifest['shards']} shards with teacher {manifest['teacher']} in {manifest['seconds']} s "
        f"({manifest['images_per_second']} images/s; {manifest['shards_done_before']} shards were "
        f"already done). Dropped: {drops}."
        + (f" Damaged shards: {faults}." if faults else "")
        + _unmatched_words(manifest.get("predictions"))
        + f" Pseudo-labels, manifest.json and errors.jsonl are in {manifest['args']['output']}."
    )


def _unmatched_words(predictions: dict | None) -> str:
    if not predictions or not predictions["unmatched"]:
        return ""
    return (
        f" {predictions['unmatched']} of the {predictions['rows']} predictions name a key no "
        f"image has (first: {', '.join(predictions['unmatched_keys'][:3])}; all counted in "
        "manifest.json)."
    )

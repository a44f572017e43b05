"""`pipeline label`: the teacher labels an unlabeled corpus, as an Apache Beam job.

shards -> spread over workers -> label each shard (decode, eval transform, batched
forward, top-k) -> one sidecar shard per input shard -> manifest
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import apache_beam as beam

from data.specs import expand_shards
from pipeline.beam_options import beam_options
from pipeline.cli_errors import UsageError
from pipeline.label_shard import LabelShardFn, sidecar_url
from pipeline.reports import ReportProgress, is_done, read_reports, write_stage_manifest
from teachers import load_teacher


@dataclass
class LabelArgs:
    teacher: str
    input: str
    output: str
    weights: str | None = None
    batch_size: int = 32
    topk: int = 16
    embed: bool = False
    device: str = "auto"
    runner: str | None = None


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda was asked for, but no CUDA device is available")
    return device


def _threads_per_worker(options) -> int | None:
    """On the local runner, split the cores between workers instead of oversubscribing them."""
    direct = options.get_all_options()
    if direct.get("runner") not in ("DirectRunner", "direct"):
        return None
    return max(1, (os.cpu_count() or 1) // max(1, direct.get("direct_num_workers") or 1))


def run(args: LabelArgs, beam_args: list[str]) -> dict:
    if not os.path.isdir(args.teacher) and args.weights is None:
        raise UsageError(
            f"--weights FILE is required with a model name ({args.teacher}); "
            "or pass a run directory as --teacher"
        )
    options = beam_options(args.runner, beam_args)
    device = resolve_device(args.device)
    _, info = load_teacher(args.teacher, args.weights)  # bad weights fail here, not in a worker
    shards = expand_shards(args.input)
    todo = [u for u in shards if not is_done(args.output, sidecar_url(args.output, u))]
    label = LabelShardFn(
        args.teacher,
        args.weights,
        args.output,
        args.batch_size,
        args.topk,
        args.embed,
        device,
        _threads_per_worker(options),
    )
    started = time.monotonic()
    if todo:
        with ReportProgress(args.output, len(todo), "label"), beam.Pipeline(options=options) as p:
            (
                p
                | "ListShards" >> beam.Create(todo)
                | "SpreadShards" >> beam.Reshuffle()
                | "LabelShards" >> beam.ParDo(label)
            )
    seconds = time.monotonic() - started
    reports = [r for r in read_reports(args.output) if r.source in set(shards)]
    manifest = write_stage_manifest(
        args.output,
        "label",
        {**vars(args), "beam_args": beam_args},
        reports,
        teacher=info.teacher_id,
        shards_done_before=len(shards) - len(todo),
        seconds=round(seconds, 2),
        images_per_second=round(
            sum(r.samples_out for r in reports if r.source in todo) / max(seconds, 1e-9), 2
        ),
    )
    return manifest


def summary(manifest: dict) -> str:
    drops = ", ".join(f"{n} {reason}" for reason, n in manifest["drops"].items()) or "none"
    faults = ", ".join(f"{n} {r}" for r, n in manifest["shard_faults"].items())
    return (
        f"Labeled {manifest['samples_out']} of {manifest['samples_in']} samples from "
        f"{manifest['shards']} shards with teacher {manifest['teacher']} in {manifest['seconds']} s "
        f"({manifest['images_per_second']} images/s; {manifest['shards_done_before']} shards were "
        f"already done). Dropped: {drops}."
        + (f" Damaged shards: {faults}." if faults else "")
        + f" Pseudo-labels, manifest.json and errors.jsonl are in {manifest['args']['output']}."
    )

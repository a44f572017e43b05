"""The options of `pipeline label` and `pipeline filter`: two frozen dataclasses, one field per
option (data/options.py: its flag and its check), from which the stage's fingerprint, the
`args` of its manifest and the label workers' spec also derive. Adding an option is one
field here and its use.

No torch and no Beam here: `pipeline --help` builds its flags from this module alone.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from dataclasses import MISSING, asdict, dataclass, fields, replace

from rs_pseudolabel.data.decode import DECODERS
from rs_pseudolabel.data.errors import UsageError
from rs_pseudolabel.data.options import DEVICES, POSITIONAL, Options, add_flags, flag, option
from rs_pseudolabel.data.records import FORMAT_VERSION, MAX_TOPK
from rs_pseudolabel.pipeline.strategies import BALANCES, STRATEGIES

# Images per forward pass by the device's kind when --batch-size is not given: an H100 is
# launch-bound at 32, a CPU gains nothing past it.
LABEL_BATCH = {"cuda": 256, "cpu": 32}
TTA = ("none", "flip")
RECORD_FORMAT = "record_format"  # the fingerprint's key for data.records.FORMAT_VERSION


OVERWRITE = "clear an output folder made with other settings instead of refusing it"


@dataclass(frozen=True, kw_only=True)
class JobArgs(Options):
    """What every Beam stage takes besides its own options; none of it changes the output."""

    runner: str | None = option("Beam runner (DirectRunner, workers = cores)", None)
    describe_job: str | None = option(
        "write what the runner was given (steps, worker image, service options, experiments) "
        "as JSON; with Beam's --dry_run=True that is all that happens",
        None,
        metavar="FILE",
    )
    overwrite: bool = option(OVERWRITE, False)


@dataclass(frozen=True, kw_only=True)
class LabelArgs(JobArgs):
    """`pipeline label`: which teacher labels which shards, and how the workers run it."""

    teacher: tuple[str, ...] = option(
        "model name (rs-152, timm:NAME) or run directory; repeat it for an ensemble, whose "
        "probabilities are averaged",
        (),
        fingerprint=True,
        worker=True,
    )
    from_predictions: str | None = option(
        "labels made elsewhere, in place of --teacher: a .jsonl or .parquet file of "
        "predictions by key (see pipeline/imported.py or the README)",
        None,
        worker=True,
        metavar="FILE",
    )
    weights: tuple[str, ...] = option(
        "state dict (.pth/.safetensors) of a teacher given by model name (its hash is in the "
        "teacher's id); one per model name, in the teachers' order",
        (),
        worker=True,
    )
    teacher_weights: str | None = option(
        "the teachers' shares of the average, comma-separated (default: equal)",
        None,
        worker=True,
        metavar="W1,W2,...",
    )
    tta: str = option(
        "views averaged per image: none, or flip (the image and its mirror); in the teacher's id",
        "none",
        choices=TTA,
        worker=True,
    )
    input: str = option("unlabeled shards: dir, glob or braces", fingerprint=True)
    output: str = option("folder for the pseudo-label shards")
    batch_size: int | None = option(
        "images per forward pass (default: "
        + ", ".join(
            f"{n} on {'a GPU' if d == 'cuda' else 'the CPU'}" for d, n in LABEL_BATCH.items()
        )
        + ")",
        None,
        low=1,
        fingerprint=True,
    )
    topk: int = option(
        "classes kept per image; at most a record's limit", 16, low=1, high=MAX_TOPK,
        fingerprint=True,
    )  # fmt: skip
    embed: bool = option("store an embedding for dedup", False, fingerprint=True)
    device: str = option(
        "where the teacher runs, decided on each worker (auto: CUDA if it has a GPU)",
        "auto",
        choices=DEVICES,
        fingerprint=True,
        worker=True,
    )
    decode: str = option(
        "where JPEGs are decoded: device is torchvision's decoder on the teacher's device "
        "(nvJPEG on a GPU; gpu is its old name), cpu is Pillow in decode processes (auto: "
        "device on a GPU, else cpu); what the device path does not take goes the cpu way",
        "auto",
        choices=DECODERS,
        fingerprint=True,
        worker=True,
    )
    decode_processes: int | None = option(
        "decode processes per worker (default: its cores; 0 decodes in the worker)",
        None,
        low=0,
        worker=True,
    )
    forwards_per_device: int | None = option(
        "forward passes in flight at once on each device, whatever the worker threads "
        "(default: 1 on a GPU, no bound on the CPU)",
        None,
        low=1,
        worker=True,
    )
    compile: bool = option(
        "run the teacher through torch.compile (the first batches pay for compiling)",
        False,
        worker=True,
    )

    @classmethod
    def from_record(cls, record: Mapping[str, object], **changes: object) -> LabelArgs:
        """The arguments a label manifest recorded (its `args`), with `changes`: how the
        filter labels its evaluation set as the corpus was labeled."""
        known = {f.name for f in fields(cls)}
        values = {k: _frozen(v) for k, v in record.items() if k in known}
        return replace(cls(**values), **changes)


@dataclass(frozen=True, kw_only=True)
class FilterArgs(JobArgs):
    """`pipeline filter`: which pseudo-labels become training samples, and how many of each."""

    input: str = option("output folder of `pipeline label`", fingerprint="labels")
    output: str = option("folder for the training shards")
    strategy: str = option(
        "; ".join(f"{name}: {' '.join(kind.__doc__.split())}" for name, kind in STRATEGIES.items()),
        "threshold",
        choices=tuple(STRATEGIES),
        fingerprint=True,
    )
    threshold: float = option("lowest confidence kept", 0.3, low=0, below=1, fingerprint=True)
    per_class: int = option("images per class", 130_000, low=1, fingerprint=True)
    top_p: int = option(
        "with --strategy topk: classes each image is ranked under", 10, low=1, fingerprint=True
    )
    max_copies: float = option(
        "at most this many copies of one image, for classes with too few images",
        32.0,
        low=1,
        fingerprint=True,
    )
    balance: str = option(
        "how a class with more than --per-class images above --threshold is cut: top, its "
        "most confident (Noisy Student); sample, a draw fixed by each image's key, so that "
        "less confident images stay in too",
        "top",
        choices=BALANCES,
        fingerprint=True,
    )
    hard: bool = option("one-hot labels instead of soft ones", False, fingerprint=True)
    dedup_against: str | None = option(
        "evaluation shards whose copies are dropped", None, fingerprint=True
    )
    dedup_threshold: float | None = option(
        "cosine for near copies (default: calibrated on the evaluation set)",
        None,
        low=0,
        high=1,
        fingerprint=True,
    )
    dedup_fpr: float = option(
        "with a calibrated threshold: share of distinct images dropped",
        0.005,
        low=0,
        high=1,
        fingerprint=True,
    )
    source_root: tuple[str, ...] = option(
        "the shards labeled under folder OLD are now under NEW (each image is checked against "
        "its content hash); repeat for several folders",
        (),
        metavar="OLD=NEW",
    )
    keep_selection: str | None = option(
        "keep the images and copies that filter output kept, with the new labels of --input "
        "(Noisy Student: select once, then relabel each round); no threshold, no balancing",
        None,
        fingerprint=True,
        metavar="PREVIOUS_TRAIN",
    )
    shard_size: int = option("samples per output shard", 1000, low=1, fingerprint=True)

    def __post_init__(self) -> None:
        super().__post_init__()
        # An option the job would not apply is refused, never ignored (and never recorded in
        # the manifest as if it had been applied).
        if self.keep_selection is not None:  # the selection is kept as it was
            self._refuse_unused(SELECTING, "--keep-selection keeps that output's images and copies")
        else:
            unused = tuple(n for n in SELECTING if n not in _USED_BY[self.strategy])
            self._refuse_unused(unused, f"--strategy {self.strategy} does not use them")
        if self.dedup_against is None:
            self._refuse_unused(("dedup_threshold", "dedup_fpr"), "no --dedup-against is given")

    def _refuse_unused(self, names: tuple[str, ...], why: str) -> None:
        """One line for the options among `names` given another value than their default."""
        given = [
            flag(spec)
            for spec in fields(self)
            if spec.name in names and getattr(self, spec.name) != spec.default
        ]
        if given:
            them = "them" if len(given) > 1 else "it"
            why = why.replace("them", them)
            raise UsageError(f"{' and '.join(given)} would be ignored ({why}): leave {them} out")


# What chooses and balances the images: what --keep-selection replaces, and what each
# strategy reads of it.
SELECTING = ("threshold", "per_class", "max_copies", "balance", "top_p")
# (a strategy reads the options its fields name)
_USED_BY = {name: tuple(f.name for f in fields(kind)) for name, kind in STRATEGIES.items()}


# --- the other commands: the same declarations, no fingerprint of their own -------------


@dataclass(frozen=True, kw_only=True)
class DigitsArgs(Options):
    """`pipeline data digits`."""

    out: str = option("output folder")
    labeled: int = option("labeled images", 200, low=1)
    seed: int = option("split seed", 0, low=0)
    shard_size: int = option("samples per shard", 256, low=1)
    overwrite: bool = option(OVERWRITE, False)


@dataclass(frozen=True, kw_only=True)
class IngestArgs(Options):
    """`pipeline data ingest`."""

    src: str = option("folder, shard, glob or brace pattern (local or fsspec URL)", flag=POSITIONAL)
    out: str = option("output folder")
    shard_size: int = option("samples per shard", 1000, low=1)
    prefix: str = option("shard name prefix", "part")
    overwrite: bool = option(OVERWRITE, False)


@dataclass(frozen=True, kw_only=True)
class EvalArgs(Options):
    """`pipeline eval`."""

    checkpoint: str = option("run directory (or model name)")
    data: str = option("labeled shards: dir, glob or braces")
    json: str | None = option("write top1, top5, samples as JSON here", None)
    batch_size: int = option("images per batch", 256, low=1)
    device: str = option("where the model runs", "auto", choices=DEVICES)


@dataclass(frozen=True, kw_only=True)
class DemoArgs(Options):
    """`pipeline demo`."""

    out: str = option("output folder", "demo-out")
    seed: int = option("data split and training seed", 0, low=0)
    rounds: int = option(
        "student-teacher rounds; round 2 on: configs/demo.yaml's later_rounds", 1, low=1
    )
    config: str | None = option("demo recipe: a path, or a bundled one by name (demo)", None)


@dataclass(frozen=True, kw_only=True)
class StatsArgs(Options):
    """`pipeline stats`."""

    shards: str = option("shards: dir, glob or braces (local or fsspec URL)", flag=POSITIONAL)
    json: str | None = option("write the statistics as JSON here", None)
    plot: str | None = option("write histograms as a PNG here", None)
    samples: str | None = option(
        "write a PNG of images per class and confidence band (kept and dropped ones for "
        "filter output) here",
        None,
        metavar="FILE.png",
    )
    source_root: tuple[str, ...] = option(
        "for --samples of label or filter output: the shards labeled under folder OLD are now "
        "under NEW (as for pipeline filter); repeat for several folders",
        (),
        metavar="OLD=NEW",
    )
    scan: bool = option(
        "read every shard even where the stage's manifest already has the answer", False
    )
    sample: float | None = option(
        "scan only this share of the shards (seeded), for a quick look",
        None,
        low=0,
        high=1,
        metavar="FRACTION",
    )
    runner: str | None = option("Beam runner for a scan (DirectRunner, workers = cores)", None)


@dataclass(frozen=True, kw_only=True)
class ModelsArgs(Options):
    """`pipeline models`."""

    name: tuple[str, ...] = option("only these models", (), flag=POSITIONAL)


# --- what derives from the fields --------------------------------------------------------


def default(cls: type, name: str) -> object:
    """An option's default, for what reads it without the arguments (stats shows the share
    of confidences the filter keeps by default)."""
    return cls.__dataclass_fields__[name].default


def add_stage_flags(parser: argparse.ArgumentParser, cls: type) -> None:
    """The flags of a stage (LabelArgs or FilterArgs): its own in field order, then the
    job's."""
    add_flags(parser, cls, sorted(fields(cls), key=lambda f: f.name in _JOB))


def _frozen(value: object) -> object:
    """A repeated flag's list (or a manifest's) as the tuple a frozen field holds."""
    return tuple(value) if isinstance(value, list) else value


def fingerprint_keys(cls: type) -> dict[str, str]:
    """The fields marked `fingerprint`, each with its key there."""
    return {
        f.name: key if isinstance(key := f.metadata["fingerprint"], str) else f.name
        for f in fields(cls)
        if f.metadata["fingerprint"]
    }


def fingerprint(args: JobArgs, **resolved: object) -> dict[str, object]:
    """What defines the output: the fields marked `fingerprint`, under their keys, with
    `resolved` values where the stage resolves one (an input's listing, the teacher's id),
    and the record format the stage writes (another format is other output, never mixed)."""
    keys = fingerprint_keys(type(args))
    stray = set(resolved) - set(keys)
    if stray:
        raise TypeError(f"not fingerprint fields of {type(args).__name__}: {sorted(stray)}")
    values = {key: resolved.get(name, getattr(args, name)) for name, key in keys.items()}
    return values | {RECORD_FORMAT: FORMAT_VERSION}


def fingerprint_defaults(cls: type) -> dict[str, object]:
    """What an output written before a fingerprint key existed held for it: an option's
    default (the behaviour before the option), and the first record format for the format
    key, which fingerprints gained at format 1."""
    defaults = {
        key: spec.default
        for spec in fields(cls)
        if (key := fingerprint_keys(cls).get(spec.name)) and spec.default is not MISSING
    }
    return defaults | {RECORD_FORMAT: 1}


def manifest_args(args: JobArgs, beam_args: list[str]) -> dict[str, object]:
    """The manifest's `args`: every option as given, and what went to the runner."""
    return {**asdict(args), "beam_args": list(beam_args)}


def worker_spec(args: JobArgs) -> tuple:
    """The fields a label worker sets its teachers up from, in field order."""
    return tuple(getattr(args, f.name) for f in fields(args) if f.metadata["worker"])


_JOB = {f.name for f in fields(JobArgs)}

"""The options of `pipeline label` and `pipeline filter`: two frozen dataclasses, one field per
option, from which the command's flags, the range check (the same on the command line and
through the Python API), the stage's fingerprint, the `args` of its manifest and the label
workers' spec all derive. Adding an option is one field here and its use.

No torch and no Beam here: `pipeline --help` builds its flags from this module alone.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping
from dataclasses import MISSING, Field, asdict, dataclass, field, fields, replace

from rs_pseudolabel.data.decode import DECODERS
from rs_pseudolabel.data.errors import UsageError
from rs_pseudolabel.data.records import FORMAT_VERSION, MAX_TOPK
from rs_pseudolabel.pipeline.strategies import STRATEGIES
from rs_pseudolabel.students.config import DEVICES, field_types, scalar_of

# Images per forward pass by the device's kind when --batch-size is not given: an H100 is
# launch-bound at 32, a CPU gains nothing past it.
LABEL_BATCH = {"cuda": 256, "cpu": 32}
TTA = ("none", "flip")
RECORD_FORMAT = "record_format"  # the fingerprint's key for data.records.FORMAT_VERSION


def option(
    help: str,
    default: object = MISSING,
    *,
    low: float | None = None,
    high: float | None = None,
    below: float | None = None,
    choices: tuple[str, ...] | None = None,
    fingerprint: bool | str = False,
    worker: bool = False,
    metavar: str | None = None,
) -> Field:
    """One option. `low`/`high`/`below`: its range; `fingerprint`: whether the output depends
    on it (a string renames its key there); `worker`: part of what a label worker sets up once
    and shares (the teacher, its device and decoding). A tuple-typed option is a repeatable
    flag; a bool one a switch."""
    return field(
        default=default,
        metadata={
            "help": help,
            "low": low,
            "high": high,
            "below": below,
            "choices": choices,
            "fingerprint": fingerprint,
            "worker": worker,
            "metavar": metavar,
        },
    )


@dataclass(frozen=True, kw_only=True)
class JobArgs:
    """What every Beam stage takes besides its own options; none of it changes the output."""

    runner: str | None = option("Beam runner (DirectRunner, workers = cores)", None)
    describe_job: str | None = option(
        "write what the runner was given (steps, worker image, service options, experiments) "
        "as JSON; with Beam's --dry_run=True that is all that happens",
        None,
        metavar="FILE",
    )
    overwrite: bool = option(
        "clear an output folder made with other settings instead of refusing it", False
    )

    def __post_init__(self) -> None:
        for spec in fields(self):
            value = _as_declared(type(self), spec, getattr(self, spec.name))
            object.__setattr__(self, spec.name, value)
            problem = _problem(type(self), spec, value)
            if problem is not None:
                raise UsageError(problem)


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
            self._refuse_unused(
                _SELECTING, "--keep-selection keeps that output's images and copies"
            )
        else:
            unused = tuple(n for n in _SELECTING if n not in _USED_BY[self.strategy])
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
_SELECTING = ("threshold", "per_class", "max_copies", "top_p")
# (a strategy reads the options its fields name)
_USED_BY = {name: tuple(f.name for f in fields(kind)) for name, kind in STRATEGIES.items()}


# --- what derives from the fields --------------------------------------------------------


def default(cls: type, name: str) -> object:
    """An option's default, for what reads it without the arguments (stats shows the share
    of confidences the filter keeps by default)."""
    return cls.__dataclass_fields__[name].default


def flag(spec: Field) -> str:
    return "--" + spec.name.replace("_", "-")


def _as_declared(cls: type, spec: Field, value: object) -> object:
    """What the Python API may pass for an option as the field holds it: a path
    (`pathlib.Path`) as its string, and for a repeatable option one value or a list as a
    tuple. Anything else is left for `_problem` to refuse."""
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if _repeated(cls, spec):
        if isinstance(value, str):
            return (value,)
        if isinstance(value, list | tuple):
            return tuple(os.fspath(v) if isinstance(v, os.PathLike) else v for v in value)
    return value


def _problem(cls: type, spec: Field, value: object) -> str | None:
    """What is wrong with `value` for this option, in one line naming its flag; or None."""
    kind = field_types(cls)[spec.name]
    if value is None:
        return None if type(None) in getattr(kind, "__args__", ()) else f"{flag(spec)} is required"
    if _repeated(cls, spec):
        wrong = (
            [v for v in value if not isinstance(v, str)] if isinstance(value, tuple) else [value]
        )
        return f"{flag(spec)} takes strings, got {wrong[0]!r}" if wrong else None
    scalar = scalar_of(kind)
    if scalar is bool and not isinstance(value, bool):
        return f"{flag(spec)} must be True or False, got {value!r}"
    meta = spec.metadata
    if meta["choices"] is not None and value not in meta["choices"]:
        return f"{flag(spec)} must be one of {', '.join(meta['choices'])}, got {value!r}"
    if scalar is str and not isinstance(value, str):
        return f"{flag(spec)} must be a string or a path, got {value!r}"
    if scalar not in (int, float):
        return None
    low, high, below = meta["low"], meta["high"], meta["below"]
    number = isinstance(value, int | float) and not isinstance(value, bool)
    whole = number and (scalar is float or float(value).is_integer())
    inside = (
        whole
        and (low is None or value >= low)
        and (high is None or value <= high)
        and (below is None or value < below)
    )
    if inside:
        return None
    word = "a whole number" if scalar is int else "a number"
    if high is not None:
        span = f" between {low:g} and {high:g}"
    elif below is not None:
        span = f" in [{low:g}, {below:g})"
    else:
        span = f" of at least {low:g}" if low is not None else ""
    return f"{flag(spec)} must be {word}{span}, got {value!r}"


def _parser(cls: type, spec: Field):
    """argparse's `type` for a valued option: the text parsed, then the field's own check."""
    scalar = scalar_of(field_types(cls)[spec.name])

    def parse(text: str) -> object:
        try:
            value = scalar(text)
        except ValueError:
            message = f"{flag(spec)} expects {scalar.__name__}, got {text!r}"
            raise argparse.ArgumentTypeError(message) from None
        problem = _problem(cls, spec, value)
        if problem is not None:
            raise argparse.ArgumentTypeError(problem)
        return value

    parse.__name__ = scalar.__name__  # what argparse names in "invalid ... value"
    return parse


def add_flags(parser: argparse.ArgumentParser, cls: type) -> None:
    """One flag per field of `cls` (LabelArgs or FilterArgs), in field order, job flags last."""
    for spec in sorted(fields(cls), key=lambda f: f.name in _JOB):
        meta, kind = spec.metadata, field_types(cls)[spec.name]
        options: dict[str, object] = {"dest": spec.name, "help": meta["help"]}
        if meta["metavar"]:
            options["metavar"] = meta["metavar"]
        if spec.default is MISSING:
            options["required"] = True
        if kind is bool:
            options["action"] = "store_true"
        elif _repeated(cls, spec):
            options |= {"action": "append", "default": None}
        else:
            options |= {"type": _parser(cls, spec), "default": spec.default}
            if meta["choices"]:
                options["choices"] = meta["choices"]
            if spec.default not in (MISSING, None):
                options["help"] += (
                    f" (default: {spec.default:g})"
                    if isinstance(spec.default, float)
                    else f" (default: {spec.default})"
                )
        parser.add_argument(flag(spec), **options)


def from_flags(cls: type, namespace: argparse.Namespace):
    """The dataclass `add_flags` gave the flags of (a repeatable flag never given: its
    default, the empty tuple)."""
    values = {f.name: getattr(namespace, f.name) for f in fields(cls)}
    for spec in fields(cls):
        if _repeated(cls, spec):
            values[spec.name] = tuple(values[spec.name] or ())
    return cls(**values)


def _repeated(cls: type, spec: Field) -> bool:
    return getattr(field_types(cls)[spec.name], "__origin__", None) is tuple


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

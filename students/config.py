"""The student's recipe and the inputs of a run: two dataclasses from which the flags of
`pipeline train-student`, YAML recipes with `--set key=value`, validation and the run's
`config.yaml` all derive. A new option is one field in one of them.

A recipe resolves in this order, each over the one before: the defaults below (the ResNet-RS
ImageNet recipe of Bello et al. 2021, with Noisy Student's unlabeled ratio), a YAML recipe
(`--config`: a path, or the name of a bundled one), `--set key=value`, then flags. Numbers
that depend on the model size (dropout, stochastic depth, resolution, RandAugment
magnitude) default to null and are filled in from the model table
(`teachers.registry`; timm models: timm's pretrained config) at resolution, so the recipe a run records has no nulls.

No torch here: `pipeline --help` builds its flags from this module alone.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable, Mapping
from dataclasses import Field, asdict, dataclass, fields, replace
from pathlib import Path

import yaml

from rs_pseudolabel import configs
from rs_pseudolabel.data.errors import UsageError
from rs_pseudolabel.data.options import (
    DEVICES,
    Options,
    add_flags,
    checked,
    flag_values,
    option,
)


def _check_crop_scale(value: object) -> tuple[float, float]:
    if not (
        isinstance(value, list | tuple)
        and len(value) == 2
        and all(isinstance(v, int | float) and not isinstance(v, bool) for v in value)
        and 0 < value[0] <= value[1] <= 1
    ):
        raise UsageError(f"must be [low, high] in (0, 1], got {value!r}")
    return (float(value[0]), float(value[1]))


TRAIN_CROPS = ("random", "center")


def _key(default: object, help: str, *, flag: bool = False, **declared: object) -> Field:
    """A recipe key: an option (data/options.py) with its default first, and no flag unless
    it says so."""
    return option(help, default, flag=flag, **declared)


@dataclass(frozen=True, kw_only=True)
class Recipe:
    """How a student is trained: the keys of a YAML recipe, of `--set` and of config.yaml."""

    model: str | None = _key(
        None, "model name from `pipeline models`, or timm:NAME for any timm model", flag=True
    )
    epochs: int = _key(350, "epochs", low=1, flag=True)
    batch_size: int = _key(
        4096, "global labeled images per step, over all processes", low=1, flag=True
    )
    unlabeled_ratio: float = _key(3.0, "pseudo-labeled images per labeled image in a step", low=0)
    lr: float = _key(0.1, "peak LR per 256 labeled images of the global batch", low=0)
    warmup_epochs: float = _key(5.0, "linear warm-up before the cosine decay", low=0)
    momentum: float = _key(0.9, "SGD momentum", low=0)
    weight_decay: float = _key(4e-5, "on conv and linear weights; not on biases and norms", low=0)
    label_smoothing: float = _key(
        0.1, "on the labeled cross-entropy and on hard pseudo-labels", low=0
    )
    temperature: float = _key(
        1.0, "pseudo targets become p^(1/T), renormalised: T < 1 sharpens", low=1e-6
    )
    ema_decay: float = _key(
        0.9999, "of the weight average that is evaluated and exported", low=0, below=1
    )
    dropout: float | None = _key(
        None, "before the classifier; null: the model table's", low=0, table="drop_rate"
    )
    stochastic_depth: float | None = _key(
        None, "null: the model table's", low=0, table="drop_path_rate"
    )
    image_size: int | None = _key(
        None, "train resolution; null: the model table's", low=1, table="train_size"
    )
    eval_size: int | None = _key(
        None,
        "validation resolution, recorded in model.json for eval and label; null: image_size",
        low=1,
    )
    randaugment_ops: int = _key(2, "RandAugment operations per image", low=0)
    randaugment_magnitude: float | None = _key(
        None, "null: the official rule for image_size (10 at 160 px and below, else 15)", low=0
    )
    crop_scale: tuple[float, float] = _key(
        (0.08, 1.0), "RandomResizedCrop's area range", check=_check_crop_scale
    )
    flip: bool = _key(True, "random horizontal flip (off for digits and text)")
    train_crop: str = _key(
        "random",
        "random: RandomResizedCrop over crop_scale; center: the eval transform at image_size, "
        "unaugmented (Noisy Student's fine-tune; needs flip false and randaugment_ops 0)",
        choices=TRAIN_CROPS,
    )
    freeze_through: str = _key(
        "none",
        "the model's top-level layers from the first through this one (rs-*: layer1 is the "
        "stem and stage 1) keep the weights --init gave them and their batch-norm "
        "statistics; none: nothing frozen",
    )
    schedule_epochs: int = _key(
        0,
        "the LR schedule's length: this run's epochs are its last ones (Noisy Student's "
        "fine-tune at the tail of the main schedule); 0: the run's own epochs",
        low=0,
    )
    num_classes: int | None = _key(
        None, "null: the length of classes.json beside the labeled shards", low=1
    )
    epoch_samples: int | None = _key(
        None, "labeled images per epoch; null: counted from the shards", low=1
    )
    shuffle_buffer: int = _key(
        2000, "samples held per loader worker (raw bytes, before decoding)", low=1
    )
    micro_batch: int | None = _key(
        None,
        "images (labeled + pseudo) per forward and backward per process, gradients "
        "accumulated over a step's micro-batches; 0: the whole per-process batch; null: the "
        "model table's (what fits a 40 GiB GPU)",
        low=0,
        table="micro_batch",
    )
    workers: int = _key(4, "loader processes per data stream and per training process", low=0)
    eval_batch_size: int = _key(256, "images per validation batch", low=1)
    compile: bool = _key(False, "torch.compile the model (the first steps pay for compiling)")
    seed: int = _key(0, "seed of initialisation, data order and noise", low=0, flag=True)

    def to_dict(self) -> dict[str, object]:
        """Plain YAML/JSON values, in field order: what config.yaml and model.json record."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


@dataclass(frozen=True, kw_only=True)
class TrainArgs(Options):
    """What one run reads and writes, and where its recipe comes from."""

    labeled: str = option("labeled shards: dir, glob or braces")
    out: str = option("run directory (the next round's teacher)")
    pseudo: str | None = option("pseudo-labeled training shards from `pipeline filter`", None)
    val: str | None = option("labeled validation shards, evaluated every epoch", None)
    config: str | None = option(
        f"YAML recipe: a path, or a bundled one by name ({', '.join(configs.names())})", None
    )
    overrides: tuple[str, ...] = option(
        "override a recipe key (repeatable), e.g. --set lr=0.2 --set flip=false",
        (),
        flag="--set",
        metavar="KEY=VALUE",
    )
    resume: bool = option(
        "continue the run in --out from its last checkpoint (same recipe; epochs may grow, "
        "compile, micro_batch, eval_batch_size and workers change)",
        False,
    )
    overwrite: bool = option("clear --out and start afresh, whatever run it holds", False)
    init: str | None = option(
        "start from these weights: a run directory, or a weights file for --model (a "
        "classifier of another class count is replaced)",
        None,
    )
    device: str = option("device to train on", "auto", choices=DEVICES)

    def __post_init__(self) -> None:
        """The Python API checked as the command line is (data/options.py), and --resume
        with --overwrite refused (one continues the run the other clears)."""
        super().__post_init__()
        if self.resume and self.overwrite:
            raise UsageError(
                "--resume continues the run in --out and --overwrite clears it: pass one"
            )


RECIPE_KEYS = tuple(f.name for f in fields(Recipe))


# --- recipe files, --set and checks ------------------------------------------------------


def yaml_problem(exc: yaml.YAMLError) -> str:
    """PyYAML's message in one line: what is wrong and where, without the quoted snippet and
    caret it prints below (the CLI reports errors in one line)."""
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    context = getattr(exc, "context", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return (f"{context}: " if context else "") + problem + where


def load_yaml(source: str | Path) -> dict[str, object]:
    """A YAML mapping from a file, or from the bundled recipe of that name; read with the safe
    loader, so a tag that would build a Python object is an error like any other."""
    path = Path(source)
    if path.is_file():
        try:
            text = path.read_text()
        except UnicodeDecodeError:
            raise UsageError(f"config file {source} is not a text file") from None
    else:
        found = configs.bundled(str(source))
        if found is None:
            raise UsageError(
                f"config file not found: {source} (bundled: {', '.join(configs.names())})"
            )
        text = found.read_text()
    try:
        values = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise UsageError(f"config file {source} is not valid YAML: {yaml_problem(exc)}") from None
    if not isinstance(values, dict):
        raise UsageError(f"config file {source} must hold a mapping of keys to values")
    return values


def _check_keys(values: Mapping[str, object], source: str) -> None:
    for key in values:
        if key not in RECIPE_KEYS:
            known = ", ".join(RECIPE_KEYS)
            raise UsageError(f"unknown config key {key!r} in {source}; known keys: {known}")


def read_recipe(source: str | Path) -> dict[str, object]:
    """The keys a YAML recipe sets, checked against the recipe's fields."""
    values = load_yaml(source)
    _check_keys(values, str(source))
    return values


def parse_overrides(overrides: Iterable[str]) -> dict[str, object]:
    """`key=value` strings; values are YAML, so `lr=0.2`, `flip=false`, `crop_scale=[0.3,1]`."""
    values = {}
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise UsageError(f"--set expects key=value, got {item!r}")
        try:
            values[key] = yaml.safe_load(text)
        except yaml.YAMLError:
            raise UsageError(f"--set {key}: value {text!r} is not valid YAML") from None
    _check_keys(values, "--set")
    return values


def _checked(spec: Field, value: object) -> object:
    """A recipe value as its field holds it, or one line naming the key."""
    return checked(Recipe, spec, value, name=f"config key {spec.name!r}")


def resolve_recipe(
    config: str | Path | None = None, overrides: Iterable[str] = (), **flags: object
) -> Recipe:
    """Defaults, then the recipe file, then `--set`, then `flags` (recipe keys given directly:
    `--model`, `--epochs`, or any key as a keyword of `train()`); None means not given. The
    model's numbers are filled in from the model table."""
    values = read_recipe(config) if config is not None else {}
    values |= parse_overrides(overrides)
    given = {key: value for key, value in flags.items() if value is not None}
    _check_keys(given, "the arguments")
    values |= given
    if values.get("model") is None:
        raise UsageError("no model: pass --model or use a config that names one")
    recipe = Recipe(**{f.name: _checked(f, values.get(f.name, f.default)) for f in fields(Recipe)})
    from rs_pseudolabel.teachers.registry import get_config  # torch: only now

    table = get_config(recipe.model)
    recipe = replace(
        recipe,
        **{
            f.name: getattr(table, f.metadata["table"])
            for f in fields(Recipe)
            if f.metadata["table"] and getattr(recipe, f.name) is None
        },
    )
    _check_together(recipe)
    # Weights are evaluated (and label) at the size they were trained at unless told.
    return replace(
        recipe,
        eval_size=recipe.eval_size or recipe.image_size,
        randaugment_magnitude=recipe.randaugment_magnitude
        if recipe.randaugment_magnitude is not None
        else table.randaugment_magnitude_at(recipe.image_size),
    )


def _check_together(recipe: Recipe) -> None:
    """Keys that only make sense together: refused with the pair named, not half applied."""
    if recipe.train_crop == "center" and (recipe.flip or recipe.randaugment_ops):
        raise UsageError(
            "train_crop center is the unaugmented eval transform: set flip false and "
            f"randaugment_ops 0 with it (got flip {str(recipe.flip).lower()}, "
            f"randaugment_ops {recipe.randaugment_ops})"
        )
    if 0 < recipe.schedule_epochs < recipe.epochs:
        raise UsageError(
            f"schedule_epochs {recipe.schedule_epochs} is shorter than the run's "
            f"{recipe.epochs} epochs, which are its tail"
        )


def other_model_note(config: str | Path | None, recipe: Recipe) -> str | None:
    """The line a run prints when `--model` or `--set model=` trains another model than the
    recipe file names: applied like any flag, and said, since the file's numbers (sizes,
    LR, noise) were chosen for its own model."""
    named = read_recipe(config).get("model") if config is not None else None
    if named is None or named == recipe.model:
        return None
    return (
        f"note: training {recipe.model} with the recipe {config}, written for {named} "
        "(its other keys as they are)"
    )


def resolve(options: Mapping[str, object]) -> tuple[TrainArgs, Recipe]:
    """A run's inputs and its resolved recipe, from the flags or the keywords of `train()`."""
    inputs = {f.name for f in fields(TrainArgs)}
    unknown = sorted(set(options) - inputs - set(RECIPE_KEYS))
    if unknown:
        raise UsageError(f"unknown option {unknown[0]!r}")
    run = {key: value for key, value in options.items() if key in inputs}
    run["overrides"] = run.get("overrides") or ()  # the flag's None: no --set
    args = TrainArgs(**run)
    flags = {key: value for key, value in options.items() if key in RECIPE_KEYS}
    return args, resolve_recipe(args.config, args.overrides, **flags)


# --- the command line --------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of `pipeline train-student`: every field of TrainArgs, and the recipe keys
    marked `flag` (not given: None, so the recipe file's value stands)."""
    add_flags(parser.add_argument_group("run"), TrainArgs, defaults_shown=False)
    recipe = parser.add_argument_group(
        "recipe",
        "Flags win over --set, --set over the --config file, the file over the defaults "
        f"(the ResNet-RS ImageNet recipe). Keys: {', '.join(RECIPE_KEYS)}.",
    )
    add_flags(recipe, Recipe, unset_default=True)


def train_flag_values(args: argparse.Namespace) -> dict[str, object]:
    """The values of the flags `add_arguments` defined, as keywords for `train()`."""
    return flag_values(TrainArgs, args) | flag_values(Recipe, args)

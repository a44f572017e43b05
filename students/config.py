"""Training recipes: defaults, a YAML file over them, then `--set key=value` and flags on top.

The defaults are the ResNet-RS ImageNet recipe (Bello et al. 2021) with Noisy Student's
unlabeled ratio. Regularisation that depends on the model size (dropout, stochastic depth,
RandAugment magnitude, resolution) is left `null` here and read from the model table
(`teachers.registry.MODELS`) unless a recipe overrides it.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable, Mapping
from pathlib import Path

import yaml

DEFAULTS: dict[str, object] = {
    "model": None,  # a name from the model table; `--model` wins, and must agree if both given
    "epochs": 350,
    "batch_size": 4096,  # global labeled images per step, over all processes
    "unlabeled_ratio": 3.0,  # pseudo-labeled images per labeled image in each step
    "lr": 0.1,  # per 256 labeled images of the global batch (see students.train.peak_lr)
    "warmup_epochs": 5.0,
    "momentum": 0.9,
    "weight_decay": 4e-5,  # on conv and linear weights; biases and norms are not decayed
    "label_smoothing": 0.1,
    "temperature": 1.0,  # pseudo targets become p^(1/T), renormalised: T < 1 sharpens
    "ema_decay": 0.9999,
    "dropout": None,  # null: the model table's rate
    "stochastic_depth": None,  # null: the model table's rate
    "image_size": None,  # null: the model table's train resolution
    "randaugment_ops": 2,
    "randaugment_magnitude": None,  # null: the model table's magnitude
    "crop_scale": [0.08, 1.0],  # RandomResizedCrop's area range
    "flip": True,  # random horizontal flip (off for digits and text)
    "num_classes": None,  # null: the length of classes.json beside the labeled shards
    "epoch_samples": None,  # labeled images per epoch; null: counted from the shards
    "shuffle_buffer": 2000,  # samples held per loader worker (raw bytes, before decoding)
    "workers": 4,  # loader processes per data stream and per training process
    "eval_batch_size": 256,
    "seed": 0,
}

_OPTIONAL = {key for key, value in DEFAULTS.items() if value is None}


def _check_keys(values: Mapping[str, object], source: str) -> None:
    for key in values:
        if key not in DEFAULTS:
            known = ", ".join(DEFAULTS)
            raise ValueError(f"unknown config key {key!r} in {source}; known keys: {known}")


def yaml_problem(exc: yaml.YAMLError) -> str:
    """PyYAML's message in one line: what is wrong and where, without the quoted snippet and
    caret it prints below (the CLI reports errors in one line)."""
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    context = getattr(exc, "context", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return (f"{context}: " if context else "") + problem + where


def read_recipe(path: str | Path) -> dict[str, object]:
    """The keys of a YAML recipe, checked against the defaults."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"config file not found: {path}")
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ValueError(f"config file {path} is not valid YAML: {yaml_problem(exc)}") from None
    if not isinstance(values, dict):
        raise ValueError(f"config file {path} must hold a mapping of keys to values")
    _check_keys(values, str(path))
    return values


def parse_overrides(overrides: Iterable[str]) -> dict[str, object]:
    """`key=value` strings; values are YAML, so `lr=0.2`, `flip=false`, `crop_scale=[0.3,1]`."""
    values = {}
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ValueError(f"--set expects key=value, got {item!r}")
        try:
            values[key] = yaml.safe_load(text)
        except yaml.YAMLError:
            raise ValueError(f"--set {key}: value {text!r} is not valid YAML") from None
    _check_keys(values, "--set")
    return values


def _check_values(config: dict[str, object]) -> None:
    numbers = {
        "epochs": (int, 1),
        "batch_size": (int, 1),
        "workers": (int, 0),
        "eval_batch_size": (int, 1),
        "randaugment_ops": (int, 0),
        "shuffle_buffer": (int, 1),
        "unlabeled_ratio": (float, 0),
        "lr": (float, 0),
        "warmup_epochs": (float, 0),
        "momentum": (float, 0),
        "weight_decay": (float, 0),
        "label_smoothing": (float, 0),
        "ema_decay": (float, 0),
        "temperature": (float, 1e-6),
        "num_classes": (int, 1),
        "epoch_samples": (int, 1),
        "dropout": (float, 0),
        "stochastic_depth": (float, 0),
        "image_size": (int, 1),
        "randaugment_magnitude": (float, 0),
        "seed": (int, 0),
    }
    for key, (kind, low) in numbers.items():
        value = config[key]
        if value is None and key in _OPTIONAL:
            continue
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        if kind is int:
            ok = ok and float(value).is_integer()
        if not ok or value < low:
            word = "a whole number" if kind is int else "a number"
            raise ValueError(f"config key {key!r} must be {word} of at least {low}, got {value!r}")
        config[key] = kind(value)
    scale = config["crop_scale"]
    if not (
        isinstance(scale, list | tuple)
        and len(scale) == 2
        and all(isinstance(v, int | float) for v in scale)
        and 0 < scale[0] <= scale[1] <= 1
    ):
        raise ValueError(f"config key 'crop_scale' must be [low, high] in (0, 1], got {scale!r}")
    config["crop_scale"] = [float(v) for v in scale]
    if not isinstance(config["flip"], bool):
        raise ValueError(f"config key 'flip' must be true or false, got {config['flip']!r}")
    if config["ema_decay"] >= 1:
        raise ValueError(f"config key 'ema_decay' must be below 1, got {config['ema_decay']}")


def resolve_config(
    config_file: str | Path | None = None,
    overrides: Iterable[str] = (),
    **flags: object,
) -> dict[str, object]:
    """Defaults, then the recipe file, then `--set` overrides, then flags that are not None
    (`epochs=`, `batch_size=`, `model=`): the resolved recipe a run records in config.yaml."""
    config = dict(DEFAULTS)
    if config_file is not None:
        config.update(read_recipe(config_file))
    config.update(parse_overrides(overrides))
    given = {key: value for key, value in flags.items() if value is not None}
    _check_keys(given, "the arguments")
    model = given.pop("model", None)
    if model is not None and config["model"] not in (None, model):
        raise ValueError(f"--model {model} but the config is a recipe for {config['model']}")
    config.update(given)
    if model is not None:
        config["model"] = model
    if config["model"] is None:
        raise ValueError("no model: pass --model or use a config that names one")
    _check_values(config)
    return config


def recipe_value(config: dict[str, object], key: str, table_value: object) -> object:
    """The recipe's value for a per-model key, or the model table's when the recipe has null."""
    value = config[key]
    return table_value if value is None else value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of `pipeline train-student` (and of `python -m students.train`); here, away
    from torch, so that `pipeline --help` and argument errors answer at once."""
    parser.add_argument("--model", help="model name from `pipeline models` (or the config's)")
    parser.add_argument("--labeled", required=True, help="labeled shards: dir, glob or braces")
    parser.add_argument("--pseudo", help="pseudo-labeled training shards from `pipeline filter`")
    parser.add_argument("--val", help="labeled validation shards, evaluated every epoch")
    parser.add_argument("--out", required=True, help="run directory (the next round's teacher)")
    parser.add_argument("--epochs", type=int, help="epochs (overrides the config)")
    parser.add_argument(
        "--batch-size", type=int, help="global labeled batch (overrides the config)"
    )
    parser.add_argument("--config", help="YAML recipe, e.g. configs/rs-50.yaml")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key (repeatable), e.g. --set lr=0.2 --set flip=false",
    )
    parser.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")

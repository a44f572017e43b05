"""Options declared once, for every command: a frozen dataclass field per option holds its
type, default, range, help and flag, and the command's flags, the one check of a value (the
same on the command line, in a YAML recipe, after `--set` and through the Python API) and
its one wording all derive from it. The label and filter arguments (pipeline/options.py)
and the trainer's inputs and recipe (students/config.py) are such dataclasses.

No torch and no Beam here: `pipeline --help` builds its flags from this module alone.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Iterable
from dataclasses import MISSING, Field, dataclass, field, fields
from functools import cache
from typing import get_type_hints

from rs_pseudolabel.data.errors import UsageError

DEVICES = ("auto", "cpu", "cuda")  # --device of every command; "auto" is resolved where it runs
POSITIONAL = ""  # an option's `flag` when it is given without one (`pipeline stats SHARDS`)


def option(
    help: str,
    default: object = MISSING,
    *,
    low: float | None = None,
    high: float | None = None,
    below: float | None = None,
    choices: tuple[str, ...] | None = None,
    check: Callable[[object], object] | None = None,
    flag: bool | str = True,
    metavar: str | None = None,
    fingerprint: bool | str = False,
    worker: bool = False,
    table: str | None = None,
) -> Field:
    """One option. `low`/`high`/`below`: its range; `choices`: its values; `check`: a
    validator for what types and ranges can't say (returns the value, or raises UsageError);
    `flag`: its command-line flag (True: --name, a string: that flag, POSITIONAL: none, given
    by its place; False: none at all, a recipe key set in YAML or by --set alone). For the stages: `fingerprint`, whether the output
    depends on it (a string renames its key there); `worker`, part of what a label worker sets
    up once. For the recipe: `table`, the model-table attribute a null takes. A tuple-typed
    option is a repeatable flag; a bool one a switch."""
    meta = {"help": help, "low": low, "high": high, "below": below, "choices": choices}
    meta |= {"check": check, "flag": flag, "metavar": metavar, "fingerprint": fingerprint}
    meta |= {"worker": worker, "table": table}
    return field(default=default, metadata=meta)


@cache
def field_types(cls: type) -> dict[str, object]:
    return get_type_hints(cls)


def scalar_of(kind: object) -> type:
    """int for `int` and `int | None`, str for `tuple[str, ...]`, and so on."""
    if getattr(kind, "__origin__", None) is tuple:
        return kind.__args__[0]
    options = [t for t in getattr(kind, "__args__", (kind,)) if t is not type(None)]
    return options[0]


def flag(spec: Field) -> str:
    """How the option is named to the user: its flag, --name unless declared with another
    (a positional one: its name in capitals, as --help shows it)."""
    named = spec.metadata["flag"]
    if named == POSITIONAL:
        return spec.name.upper()
    return named if isinstance(named, str) else "--" + spec.name.replace("_", "-")


def repeated(cls: type, spec: Field) -> bool:
    """A `tuple[str, ...]` option: a flag given any number of times."""
    kind = field_types(cls)[spec.name]
    return getattr(kind, "__origin__", None) is tuple and kind.__args__[-1] is Ellipsis


def as_declared(cls: type, spec: Field, value: object) -> object:
    """What the Python API may pass for an option as the field holds it: a path
    (`pathlib.Path`) as its string, and for a repeatable option one value or a list as a
    tuple. Anything else is left for `problem` to refuse."""
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if repeated(cls, spec):
        if isinstance(value, str):
            return (value,)
        if isinstance(value, list | tuple):
            return tuple(os.fspath(v) if isinstance(v, os.PathLike) else v for v in value)
    return value


def problem(cls: type, spec: Field, value: object, name: str | None = None) -> str | None:
    """What is wrong with `value` for this option, in one line naming it (`name`: how the
    user gave it, its flag unless said); or None."""
    name = name or flag(spec)
    kind = field_types(cls)[spec.name]
    if value is None:
        optional = type(None) in getattr(kind, "__args__", ())
        return None if optional else f"{name} must be given a value, got none"
    if repeated(cls, spec):
        wrong = (
            [v for v in value if not isinstance(v, str)] if isinstance(value, tuple) else [value]
        )
        return f"{name} takes strings, got {wrong[0]!r}" if wrong else None
    meta = spec.metadata
    if meta["check"] is not None:
        try:
            meta["check"](value)
        except UsageError as exc:
            return f"{name} {exc}"
        return None
    scalar = scalar_of(kind)
    if scalar is bool:
        return None if isinstance(value, bool) else f"{name} must be true or false, got {value!r}"
    if meta["choices"] is not None and value not in meta["choices"]:
        return f"{name} must be one of {', '.join(meta['choices'])}, got {value!r}"
    if scalar is str:
        return (
            None if isinstance(value, str) else f"{name} must be a string or a path, got {value!r}"
        )
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
    return f"{name} must be {word}{span}, got {value!r}"


def checked(cls: type, spec: Field, value: object, name: str | None = None) -> object:
    """`value` as the field holds it (a path as its string, a whole float of an int option
    as an int, an int of a float one as a float, what `check` makes of it), or UsageError."""
    value = as_declared(cls, spec, value)
    found = problem(cls, spec, value, name)
    if found is not None:
        raise UsageError(found)
    if value is None or repeated(cls, spec):
        return value
    if spec.metadata["check"] is not None:
        return spec.metadata["check"](value)
    scalar = scalar_of(field_types(cls)[spec.name])
    return scalar(value) if scalar in (int, float) else value


def check_all(obj: object) -> None:
    """Every field of a frozen options dataclass made `checked`, naming each by its flag:
    its __post_init__, so the Python API is checked as the command line is."""
    for spec in fields(obj):
        value = checked(type(obj), spec, getattr(obj, spec.name))
        object.__setattr__(obj, spec.name, value)


@dataclass(frozen=True, kw_only=True)
class Options:
    """What every command's options derive from: checked as they are made, so the Python
    API is checked as the command line is."""

    def __post_init__(self) -> None:
        check_all(self)


def _parse(cls: type, spec: Field) -> Callable[[str], object]:
    """argparse's `type` for a valued option: the text parsed, then the field's own check."""
    scalar = scalar_of(field_types(cls)[spec.name])

    def parse(text: str) -> object:
        try:
            value = scalar(text)
        except ValueError:
            message = f"{flag(spec)} expects {scalar.__name__}, got {text!r}"
            raise argparse.ArgumentTypeError(message) from None
        found = problem(cls, spec, value)
        if found is not None:
            raise argparse.ArgumentTypeError(found)
        return value

    parse.__name__ = scalar.__name__  # what argparse names in "invalid ... value"
    return parse


def add_flags(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    cls: type,
    specs: Iterable[Field] | None = None,
    defaults_shown: bool = True,
    unset_default: bool = False,
) -> None:
    """A flag for each of `specs` (default: every field of `cls` that has one), in order.
    `unset_default`: a flag not given is None (a recipe key's flag, over the recipe's value)."""
    for spec in fields(cls) if specs is None else specs:
        if spec.metadata["flag"] is False:
            continue
        meta, kind = spec.metadata, field_types(cls)[spec.name]
        if meta["flag"] == POSITIONAL:
            many = {"nargs": "*"} if repeated(cls, spec) else {}
            parser.add_argument(spec.name, help=meta["help"], **many)
            continue
        options: dict[str, object] = {"dest": spec.name, "help": meta["help"]}
        if meta["metavar"]:
            options["metavar"] = meta["metavar"]
        if spec.default is MISSING:
            options["required"] = True
        if kind is bool:
            options["action"] = "store_true"
        elif repeated(cls, spec):
            options |= {"action": "append", "default": None}
        else:
            default = None if unset_default else spec.default
            options |= {"type": _parse(cls, spec), "default": default}
            if meta["choices"]:
                options["choices"] = meta["choices"]
            if unset_default:
                shown = "the recipe's" if spec.default is None else spec.default
                options["help"] += f" (default: {shown})"
            elif defaults_shown and spec.default not in (MISSING, None):
                shown = f"{spec.default:g}" if isinstance(spec.default, float) else spec.default
                options["help"] += f" (default: {shown})"
        parser.add_argument(flag(spec), **options)


def flag_values(cls: type, namespace: argparse.Namespace) -> dict[str, object]:
    """The values of `cls`'s flags in `namespace`, as keywords (a repeatable flag never
    given: its default, the empty tuple)."""
    values = {}
    for spec in fields(cls):
        if spec.metadata["flag"] is False or not hasattr(namespace, spec.name):
            continue
        value = getattr(namespace, spec.name)
        values[spec.name] = tuple(value or ()) if repeated(cls, spec) else value
    return values

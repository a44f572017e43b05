"""Every option of every command is declared once, as a field of its dataclass
(data/options.py): the flags, their defaults and range checks, and for label and filter the
fingerprint's keys and the manifest's `args`, for train-student the recipe's YAML and --set
keys and the run's config.yaml, all come from it. (The manifests of real runs are checked in
test_filter.py, which has them.)"""

import argparse
import re
from dataclasses import MISSING, fields

import pytest

from rs_pseudolabel.data.errors import UsageError
from rs_pseudolabel.data.options import flag, flag_values
from rs_pseudolabel.pipeline.cli import build_parser, main
from rs_pseudolabel.pipeline.options import (
    DemoArgs,
    DigitsArgs,
    EvalArgs,
    FilterArgs,
    IngestArgs,
    LabelArgs,
    ModelsArgs,
    StatsArgs,
    fingerprint,
    fingerprint_keys,
    manifest_args,
)
from rs_pseudolabel.pipeline.strategies import STRATEGIES
from rs_pseudolabel.students.config import RECIPE_KEYS, Recipe, TrainArgs, parse_overrides
from tests.conftest import message_lines, run_cli

REQUIRED = {
    LabelArgs: ["--teacher", "rs-mini", "--input", "in", "--output", "out"],
    FilterArgs: ["--input", "in", "--output", "out"],
}
COMMAND = {LabelArgs: "label", FilterArgs: "filter"}


def _parser(command: str) -> argparse.ArgumentParser:
    parser = build_parser()
    for word in command.split():
        (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        parser = sub.choices[word]
    return parser


# Each command and the dataclasses its flags come from
DECLARED = {
    "data digits": (DigitsArgs,),
    "data ingest": (IngestArgs,),
    "label": (LabelArgs,),
    "filter": (FilterArgs,),
    "train-student": (TrainArgs, Recipe),
    "eval": (EvalArgs,),
    "demo": (DemoArgs,),
    "stats": (StatsArgs,),
    "models": (ModelsArgs,),
}


def _leaves(parser: argparse.ArgumentParser, path: str = "") -> list[str]:
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        return [path.strip()]
    return [leaf for n, p in subs[0].choices.items() for leaf in _leaves(p, f"{path} {n}")]


def test_every_flag_of_every_command_is_a_declared_field():
    """No flag is written by hand: each command's flags and positional arguments are the
    fields of its dataclasses (a recipe key only where it is marked as a flag), with the
    field's name as where the value lands."""
    assert sorted(_leaves(build_parser())) == sorted(DECLARED)
    for command, classes in DECLARED.items():
        parser = _parser(command)
        given = {
            (a.option_strings[0] if a.option_strings else a.dest, a.dest)
            for a in parser._actions
            if a.dest not in ("help", "debug")
        }
        declared = {
            (flag(f) if f.metadata["flag"] != "" else f.name, f.name)
            for cls in classes
            for f in fields(cls)
            if f.metadata["flag"] is not False
        }
        assert given == declared, command


def test_the_recipe_keys_and_the_stage_records_derive_from_the_fields():
    """YAML and --set keys are the recipe's fields and config.yaml holds each once; a stage's
    fingerprint keys and manifest `args` are its fields."""
    assert RECIPE_KEYS == tuple(f.name for f in fields(Recipe))
    assert set(parse_overrides([f"{key}=null" for key in RECIPE_KEYS])) == set(RECIPE_KEYS)
    assert list(Recipe(model="rs-mini").to_dict()) == list(RECIPE_KEYS)
    for cls in (LabelArgs, FilterArgs):
        values = dict(zip(REQUIRED[cls][::2], REQUIRED[cls][1::2], strict=True))
        args = cls(**{k[2:]: v for k, v in values.items()})
        assert set(manifest_args(args, [])) == {f.name for f in fields(cls)} | {"beam_args"}
        keys = fingerprint_keys(cls)
        assert set(keys) <= {f.name for f in fields(cls)}
        assert set(fingerprint(args)) == set(keys.values()) | {"record_format"}


def _flags(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {
        a.option_strings[0]: a
        for a in parser._actions
        if a.option_strings and a.dest not in ("help", "debug")
    }


@pytest.mark.parametrize("cls", [LabelArgs, FilterArgs], ids=lambda c: c.__name__)
def test_the_flags_are_the_fields_with_their_defaults(cls: type):
    flags = _flags(_parser(COMMAND[cls]))
    assert set(flags) == {flag(f) for f in fields(cls)}
    assert {a.dest for a in flags.values()} == {f.name for f in fields(cls)}
    required = {name for name, a in flags.items() if a.required}
    assert required == {flag(f) for f in fields(cls) if f.default is MISSING}
    # What the command line gives when only the required flags are passed is what the Python
    # API gives: no default is written twice (--top-p was 10 in one and 1 in the other).
    args = build_parser().parse_args([COMMAND[cls], *REQUIRED[cls]])
    values = dict(zip(REQUIRED[cls][::2], REQUIRED[cls][1::2], strict=True))
    api = cls(**{k[2:]: v for k, v in values.items()})
    assert cls(**flag_values(cls, args)) == api


def test_strategy_choices_are_the_strategy_classes():
    (action,) = [a for a in _flags(_parser("filter")).values() if a.dest == "strategy"]
    assert tuple(action.choices) == tuple(STRATEGIES)


@pytest.mark.parametrize(
    ("cls", "argv", "message"),
    [
        (FilterArgs, ["--threshold", "1"], "--threshold must be a number in [0, 1), got 1.0"),
        (FilterArgs, ["--max-copies", "0.5"], "--max-copies must be a number of at least 1"),
        (FilterArgs, ["--per-class", "0"], "--per-class must be a whole number of at least 1"),
        (FilterArgs, ["--dedup-fpr", "2"], "--dedup-fpr must be a number between 0 and 1"),
        (LabelArgs, ["--topk", "300"], "--topk must be a whole number between 1 and 255"),
        (LabelArgs, ["--decode-processes", "-1"], "--decode-processes must be a whole number"),
    ],
)
def test_one_range_check_for_the_command_line_and_the_api(
    cls: type, argv: list[str], message: str, capsys: pytest.CaptureFixture
):
    with pytest.raises(SystemExit) as exit:
        main([COMMAND[cls], *REQUIRED[cls], *argv])
    err = capsys.readouterr().err
    assert exit.value.code == 2 and message in err and len(err.strip().splitlines()) == 1
    name, text = argv[0][2:].replace("-", "_"), argv[1]
    kind = int if cls.__dataclass_fields__[name].type in ("int", "int | None") else float
    values = dict(zip(REQUIRED[cls][::2], REQUIRED[cls][1::2], strict=True))
    with pytest.raises(UsageError, match=re.escape(message.split(", got")[0])):
        cls(**{k[2:]: v for k, v in values.items()}, **{name: kind(text)})


def test_the_fingerprint_takes_only_fingerprint_fields():
    args = FilterArgs(input="in", output="out")
    marked = {f.name for f in fields(FilterArgs) if f.metadata["fingerprint"]}
    assert "output" not in marked and "source_root" not in marked and "runner" not in marked
    with pytest.raises(TypeError, match="output"):
        fingerprint(args, output="elsewhere")
    assert fingerprint(args, input={"folder": "x"})["labels"] == {"folder": "x"}


def test_an_option_the_filter_would_not_apply_is_refused_in_one_line():
    """Each mode reads some options: the others, given, would change nothing written while
    the manifest recorded them (--strategy topk --threshold 0.99 wrote the same bytes as
    without): refused, by flag as by keyword."""
    cases = [
        ({"strategy": "topk", "threshold": 0.99}, "--threshold would be ignored (--strategy topk"),
        ({"strategy": "topk", "max_copies": 4.0}, "--max-copies would be ignored (--strategy topk"),
        ({"top_p": 3}, "--top-p would be ignored (--strategy threshold does not use it)"),
        ({"dedup_threshold": 0.9}, "--dedup-threshold would be ignored (no --dedup-against is"),
        ({"dedup_fpr": 0.3}, "--dedup-fpr would be ignored (no --dedup-against is given)"),
        ({"keep_selection": "t", "top_p": 2}, "--top-p would be ignored (--keep-selection keeps"),
        ({"strategy": "topk", "balance": "sample"}, "--balance would be ignored (--strategy topk"),
        ({"keep_selection": "t", "balance": "sample"}, "--balance would be ignored (--keep-sel"),
    ]
    for wrong, message in cases:
        with pytest.raises(UsageError) as raised:
            FilterArgs(input="i", output="o", **wrong)
        assert str(raised.value).startswith(message), raised.value
    FilterArgs(input="i", output="o", strategy="topk", per_class=5, top_p=3)
    FilterArgs(input="i", output="o", per_class=5, balance="sample")
    FilterArgs(input="i", output="o", dedup_against="v", dedup_threshold=0.9, dedup_fpr=0.01)
    result = run_cli("filter", "--input", "i", "--output", "o", "--strategy", "topk",
                     "--threshold", "0.99")  # fmt: skip
    assert result.returncode == 2 and message_lines(result.stderr) == [
        "pipeline filter: error: --threshold would be ignored (--strategy topk does not use "
        "it): leave it out"
    ]


def test_the_python_api_checks_types_as_the_command_line_does(tmp_path):
    """A Path is a path, one OLD=NEW is one repeat of --source-root, and a value of the
    wrong type is refused in one line naming the option, never taken for another."""
    args = FilterArgs(input=tmp_path / "labels", output=tmp_path / "train", source_root="a=b")
    assert (args.input, args.output) == (str(tmp_path / "labels"), str(tmp_path / "train"))
    assert args.source_root == ("a=b",)
    assert FilterArgs(input="i", output="o", source_root=["a=b", tmp_path]).source_root == (
        "a=b",
        str(tmp_path),
    )
    assert LabelArgs(teacher=tmp_path, input="i", output="o").teacher == (str(tmp_path),)
    refused = [
        (FilterArgs, {"hard": "false"}, "--hard must be true or false, got 'false'"),
        (FilterArgs, {"per_class": "40"}, "--per-class must be a whole number of at least 1"),
        (FilterArgs, {"strategy": 3}, "--strategy must be one of threshold, topk, got 3"),
        (FilterArgs, {"source_root": [1]}, "--source-root takes strings, got 1"),
        (FilterArgs, {"dedup_against": 3}, "--dedup-against must be a string or a path, got 3"),
        (LabelArgs, {"embed": 1}, "--embed must be true or false, got 1"),
    ]
    for cls, wrong, message in refused:
        values = dict(zip(REQUIRED[cls][::2], REQUIRED[cls][1::2], strict=True))
        with pytest.raises(UsageError) as raised:
            cls(**{k[2:]: v for k, v in values.items()}, **wrong)
        assert str(raised.value).startswith(message)

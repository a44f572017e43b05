"""The command-line contract: --help everywhere; bad input is one line and exit status 2."""

import argparse
import subprocess
import sys

import pytest

from pipeline.cli import build_parser
from tests.conftest import run_cli


def _commands(
    parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()
) -> list[tuple[str, ...]]:
    found = [prefix]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found += _commands(sub, (*prefix, name))
    return found


@pytest.mark.parametrize("command", _commands(build_parser()), ids=" ".join)
def test_every_command_has_help(command: tuple[str, ...]):
    result = run_cli(*command, "--help")
    assert result.returncode == 0 and "usage: pipeline" in result.stdout


@pytest.mark.parametrize(
    "args",
    [
        ("data", "digits"),
        ("data", "digits", "--out", "x", "--labeled", "many"),
        ("data", "digits", "--out", "/tmp/never", "--labeled", "5000"),
        ("data", "ingest", "/no/such/place", "--out", "x"),
        ("data", "ingest", "/no/such/shards-{000..009}.tar", "--out", "x"),
        ("no-such-command",),
    ],
    ids=lambda a: " ".join(a),
)
def test_bad_input_is_one_line_and_exit_2(args: tuple[str, ...]):
    result = run_cli(*args)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "error:" in lines[0] and "Traceback" not in result.stderr


def test_the_flags_are_built_without_importing_torch_or_beam():
    """`pipeline --help` and argument errors answer at once: torch and Beam load later."""
    probe = "import sys; from pipeline.cli import build_parser; build_parser(); "
    probe += "print(sorted({'torch', 'apache_beam'} & set(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.strip() == "[]", result.stderr

"""The command-line contract: --help everywhere; bad input is one line and exit status 2."""

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from rs_pseudolabel.pipeline.cli import build_parser
from tests.conftest import message_lines, run_cli


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
        ("data", "ingest", "/tmp/shards-{000..009.tar", "--out", "x"),
        ("data", "digits", "--out", "gss://bucket/digits"),
        (
            "train-student",
            "--model",
            "rs-mini",
            "--labeled",
            "x",
            "--out",
            "y",
            "--config",
            sys.executable,
        ),
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
    probe = "import sys; from rs_pseudolabel.pipeline.cli import build_parser; build_parser(); "
    probe += "print(sorted({'torch', 'apache_beam'} & set(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.strip() == "[]", result.stderr


# The launcher run with one function of ours replaced by a bug: in a worker (each shard's
# labeling; the DirectRunner's workers are threads of this process) or in the launcher.
INJECT = """
import sys
import rs_pseudolabel.pipeline.label as label
def broken(*args, **kwargs):
    raise ValueError("an injected bug")
setattr(label, sys.argv.pop(1), broken)
from rs_pseudolabel.pipeline.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("where", ["label_shard", "shard_entries"], ids=["worker", "launcher"])
def test_a_bug_exits_1_in_one_line_that_says_where_its_traceback_is(
    random_teacher: Path, digits_dir: Path, tmp_path: Path, where: str
):
    shard = sorted((digits_dir / "unlabeled").glob("*.tar"))[0]
    command = [sys.executable, "-c", INJECT, where, "label", "--teacher", str(random_teacher),
               "--input", str(shard), "--output", str(tmp_path / "out")]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 1, result.stderr
    lines = message_lines(result.stderr)
    assert len(lines) == 1 and "internal error" in lines[0], result.stderr
    assert "ValueError: an injected bug" in lines[0] and "--debug" in lines[0]
    saved = Path(lines[0].split("its traceback is in ")[1].split(" (or rerun")[0])
    trace = saved.read_text()
    if where == "label_shard":  # the worker's failure record keeps its own frames
        trace = json.loads(trace)["traceback"]
    assert "in broken" in trace and "ValueError: an injected bug" in trace
    debug = subprocess.run([*command, "--debug"], capture_output=True, text=True)
    assert debug.returncode == 1 and "in broken" in debug.stderr and "Traceback" in debug.stderr
    if where == "shard_entries":  # fails at once: every way of asking for debugging
        before = [*command[:4], "--debug", *command[4:]]  # pipeline --debug label ...
        first = subprocess.run(before, capture_output=True, text=True)
        assert first.returncode == 1 and "Traceback" in first.stderr
        for value, traced in (("0", False), ("false", False), ("true", True), ("1", True)):
            env = {**os.environ, "PIPELINE_DEBUG": value}
            run = subprocess.run(command, capture_output=True, text=True, env=env)
            assert run.returncode == 1 and ("Traceback" in run.stderr) == traced, value
        env = {**os.environ, "PIPELINE_DEBUG": "maybe"}
        odd = subprocess.run(command, capture_output=True, text=True, env=env)
        assert odd.returncode == 2
        assert message_lines(odd.stderr) == [
            "pipeline label: error: PIPELINE_DEBUG='maybe': use 1, true, yes or on, or 0, "
            "false, no or off"
        ]


def test_a_damaged_model_json_is_one_line(random_teacher: Path, digits_dir: Path, tmp_path: Path):
    teacher = tmp_path / "teacher"
    shutil.copytree(random_teacher, teacher)
    (teacher / "model.json").write_text((teacher / "model.json").read_text()[:-5])
    result = run_cli("eval", "--checkpoint", str(teacher), "--data", str(digits_dir / "val"))
    lines = message_lines(result.stderr)
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert f"{teacher / 'model.json'} is not valid JSON" in lines[0]


def test_a_topk_no_record_can_hold_is_refused_before_the_job_starts(
    random_teacher: Path, digits_dir: Path, tmp_path: Path
):
    result = run_cli("label", "--teacher", str(random_teacher), "--topk", "300",
                     "--input", str(digits_dir / "unlabeled"), "--output", str(tmp_path / "o"))  # fmt: skip
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "--topk must be a whole number between 1 and 255" in lines[0]
    assert not (tmp_path / "o").exists()


def test_a_path_of_the_wrong_kind_is_said_in_one_line(
    random_teacher: Path, digits_dir: Path, tmp_path: Path
):
    """A shard file where a folder is expected, or a folder where a file is, named as such
    by every command (it was a raw "[Errno 20] Not a directory: .../x.tar/manifest.json")."""
    shard = tmp_path / "x.tar"
    shutil.copy(sorted((digits_dir / "unlabeled").glob("*.tar"))[0], shard)
    as_folder = f"{shard} is a file where a folder is expected"
    train = ["train-student", "--model", "rs-mini", "--labeled", str(digits_dir / "labeled")]
    train += ["--epochs", "1"]
    label = ["label", "--teacher", str(random_teacher), "--input", str(digits_dir / "unlabeled")]
    cases = [
        (["stats", str(shard)], as_folder),
        (["filter", "--input", str(shard), "--output", str(tmp_path / "out")], as_folder),
        (label + ["--output", str(shard)], as_folder),
        ([*train, "--out", str(shard / "run")], as_folder),
        (["eval", "--checkpoint", str(tmp_path), "--data", str(digits_dir / "val")], str(tmp_path)),
        (
            [*train, "--out", str(tmp_path / "run"), "--init", str(digits_dir)],
            f"--init {digits_dir} is a folder without model.json",
        ),
    ]
    for args, message in cases:
        result = run_cli(*args)
        lines = message_lines(result.stderr)
        assert result.returncode == 2 and len(lines) == 1, (args, result.stderr[-1500:])
        assert message in lines[0] and "Errno" not in lines[0], (args, lines)
    assert not (tmp_path / "run").exists()  # refused before it claimed its output


def test_files_a_command_writes_are_checked_before_its_work(digits_dir: Path, tmp_path: Path):
    """A folder where --json, --plot or --samples names a file, and a PNG asked under another
    suffix, are one line naming the flag before the evaluation or the scan runs (the error
    came after it, named a temporary file, and left that file behind)."""
    from rs_pseudolabel.data.storage import AtomicFile

    folder = tmp_path / "folder"
    folder.mkdir()
    val = str(digits_dir / "val")
    cases = [
        (["stats", val, "--plot", str(folder)], f"--plot {folder} is a folder: give the name"),
        (["stats", val, "--json", str(folder)], f"--json {folder} is a folder: give the name"),
        (["stats", val, "--samples", str(tmp_path / "s.jpg")], "--samples writes a PNG: give"),
        (["eval", "--checkpoint", str(tmp_path / "none"), "--data", val, "--json", str(folder)],
         f"--json {folder} is a folder"),
    ]  # fmt: skip
    for args, said in cases:
        result = run_cli(*args)
        lines = message_lines(result.stderr)
        assert result.returncode == 2 and len(lines) == 1 and said in lines[0], result.stderr
    assert not (tmp_path / "s.jpg").exists()
    # Found only when the file is committed (the API, a race): named as the file itself,
    # and no temporary file is left beside it.
    with pytest.raises(IsADirectoryError) as raised, AtomicFile(str(folder)) as f:
        f.write(b"x")
    assert raised.value.filename == str(folder)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder"]


def test_a_stopped_command_lets_only_its_own_thread_write_to_stderr(monkeypatch, capfd):
    """Once a stop is being handled, the runner's threads may print what the stop cut off
    (Beam's SDK worker prints a bundle's traceback straight to stderr, 1 group SIGTERM of a
    CI run in 2); only the main thread's line reaches stderr."""
    import logging
    import threading

    from rs_pseudolabel.pipeline import cli

    monkeypatch.setattr(sys, "stderr", sys.stderr)
    monkeypatch.setattr(threading, "excepthook", threading.excepthook)
    try:
        cli._quiet()
        cli._quiet()  # said twice (the signal, then the exit): wrapped once
        assert not isinstance(sys.stderr.stream, cli._MainThreadOnly)
        runner = threading.Thread(target=lambda: print("Traceback: a cut bundle", file=sys.stderr))
        runner.start()
        runner.join()
        print("pipeline label: stopped by SIGTERM", file=sys.stderr)
    finally:
        logging.disable(logging.NOTSET)
    assert capfd.readouterr().err == "pipeline label: stopped by SIGTERM\n"

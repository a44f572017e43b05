"""Faults from outside: a full disk or an output that cannot be a folder, hostile files carried
through label -> filter -> train, and SIGKILL at a random moment. Every stage runs for real, as
a user runs it (`python -m rs_pseudolabel.pipeline ...` in its own process); the faults are
real too: a file size limit makes writes fail with EFBIG, and an output below a regular file
with ENOTDIR."""

from __future__ import annotations

import json
import random
import re
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench.fixtures import write_shard
from rs_pseudolabel.data.read import iter_samples
from rs_pseudolabel.data.records import decode_pseudo
from rs_pseudolabel.data.specs import ShardSpecError, expand_shards
from rs_pseudolabel.pipeline.filter import FilterArgs
from rs_pseudolabel.pipeline.filter import run as filter_run
from rs_pseudolabel.pipeline.label import LabelArgs
from rs_pseudolabel.pipeline.label import run as label_run
from tests.conftest import DIGITS_RECIPE, assert_same_shards, hostile_samples, image_bytes

# A whole temporary name as AtomicShard and write_atomic make it: hidden from every reader,
# since shard specs only pick up names ending in .tar.
TEMP_NAME = re.compile(r".+\.tmp-[0-9a-f]{12}$")
# One step of 16 labeled (+ 48 pseudo-labeled) digits, in the training process itself.
QUICK_TRAINING = ["--epochs", "1", "--batch-size", "16"] + [
    "--set",
    "epoch_samples=16",
    "--set",
    "shuffle_buffer=64",
    "--set",
    "workers=0",
]


def _pipeline(*args: str, max_file_bytes: int | None = None) -> subprocess.CompletedProcess:
    """`python -m rs_pseudolabel.pipeline ARGS`; with `max_file_bytes`, any write past that
    size fails with EFBIG (SIGXFSZ ignored), which is how a full disk looks to the writer."""

    def limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (max_file_bytes, max_file_bytes))

    return subprocess.run(
        [sys.executable, "-m", "rs_pseudolabel.pipeline", *args],
        capture_output=True,
        text=True,
        preexec_fn=limit if max_file_bytes else None,
    )


def _error_line(result: subprocess.CompletedProcess, command: str) -> str:
    """Exit status 2 and exactly one `pipeline COMMAND: error:` line, the last thing printed;
    no traceback and nothing else that reads as an error (progress bars may come before)."""
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr and "terminate called" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if "error" in line.lower()]
    assert len(errors) == 1 and errors[0] == lines[-1], result.stderr[-3000:]
    assert lines[-1].startswith(f"pipeline {command}: error: ")
    return lines[-1]


def _files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


@pytest.fixture(scope="module")
def teacher(random_teacher: Path) -> Path:
    return random_teacher


@pytest.fixture(scope="module")
def corpus(digits_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """384 unlabeled digits in 6 shards of 64: enough shards for a kill to land between."""
    out = tmp_path_factory.mktemp("corpus")
    samples = list(iter_samples(expand_shards(str(digits_dir / "unlabeled")), print))[:384]
    for k in range(6):
        write_shard(str(out / f"part-{k:06d}.tar"), samples[64 * k : 64 * (k + 1)])
    return out


@pytest.fixture(scope="module")
def labels(teacher: Path, corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted label run of the corpus: filter's input and label's reference."""
    out = tmp_path_factory.mktemp("labels")
    label_run(LabelArgs(teacher=str(teacher), input=str(corpus), output=str(out)), [])
    return out


def _stage_args(command: str, teacher: Path, corpus: Path, labels: Path, digits: Path) -> list:
    """The command line of each stage, less its output folder (the last flag's value)."""
    if command == "label":
        return ["label", "--teacher", str(teacher), "--input", str(corpus), "--output"]
    if command == "filter":
        return ["filter", "--input", str(labels), "--threshold", "0", "--per-class", "40"] + [
            "--shard-size",
            "20",
            "--output",
        ]
    return [
        "train-student",
        "--labeled",
        str(digits / "labeled"),
        "--config",
        str(DIGITS_RECIPE),
        *QUICK_TRAINING,
        "--out",
    ]


# --- a full disk, and an output that cannot be created ----------------------------------


@pytest.mark.parametrize("command", ["label", "filter", "train-student"])
def test_full_disk_is_one_line_exit_2_and_leaves_nothing_partial(
    command: str, teacher: Path, corpus: Path, labels: Path, digits_dir: Path, tmp_path: Path
):
    out = tmp_path / "out"
    args = _stage_args(command, teacher, corpus, labels, digits_dir)
    # Shards and training checkpoints are far larger than these limits; the small records
    # (a run's claim in manifest.json, config.yaml and log.jsonl) fit under them.
    limit = 1_000_000 if command == "train-student" else 20_000
    result = _pipeline(*args, str(out), max_file_bytes=limit)
    line = _error_line(result, command)
    failed = re.search(r"\[Errno 27\] File too large: '(.+)'$", line)
    assert failed is not None, line
    assert Path(failed.group(1)).is_relative_to(out), line
    assert not Path(failed.group(1)).exists()
    files = _files(out)
    if command == "train-student":
        # The run's small records are whole; no checkpoint or model, nor any temporary file,
        # and the run is claimed, never marked done.
        assert files == ["config.yaml", "log.jsonl", "manifest.json"], files
        assert [r["epoch"] for r in map(json.loads, (out / "log.jsonl").open())] == [1]
        assert json.loads((out / "manifest.json").read_text())["state"] == "running"
        return
    # No unit finished: the job gives its folder back (no claim to block the rerun once
    # there is room), so no shard, temporary file or manifest is left for a reader.
    assert files == [] and not out.exists(), files
    with pytest.raises(ShardSpecError):
        expand_shards(str(out))


@pytest.mark.parametrize("command", ["label", "filter", "train-student"])
def test_output_below_a_regular_file_is_one_line_exit_2(
    command: str, teacher: Path, corpus: Path, labels: Path, digits_dir: Path, tmp_path: Path
):
    blocker = tmp_path / "not-a-folder"
    blocker.write_bytes(b"a file where a folder should be")
    out = blocker / "out"
    args = _stage_args(command, teacher, corpus, labels, digits_dir)
    line = _error_line(_pipeline(*args, str(out)), command)
    assert line.endswith(f"error: {blocker} is a file where a folder is expected"), line
    assert _files(tmp_path) == ["not-a-folder"]
    assert blocker.read_bytes() == b"a file where a folder should be"


# --- hostile inputs carried through every stage -----------------------------------------


def _hostile_corpus(src: Path, digits: Path) -> dict[str, list[str]]:
    """A shard of 20 good digits mixed with every kind of bad sample, and a second shard cut
    short; returns the keys written to each."""
    good = list(iter_samples(expand_shards(str(digits / "unlabeled")), print))[:26]
    strip = [{k: v for k, v in s.items() if k == "__key__" or not k.startswith("__")} for s in good]
    hostile = hostile_samples() + [{"__key__": "../../escape", "png": image_bytes(size=(20, 20))}]
    mixed = strip[:10] + hostile + strip[10:20]
    write_shard(str(src / "mixed-000000.tar"), mixed)
    write_shard(str(src / "mixed-000001.tar"), strip[20:26])
    data = (src / "mixed-000001.tar").read_bytes()
    (src / "mixed-000001.tar").write_bytes(data[: len(data) * 2 // 3])
    return {
        str(src / "mixed-000000.tar"): [s["__key__"] for s in mixed],
        str(src / "mixed-000001.tar"): [s["__key__"] for s in strip[20:26]],
    }


def _label_keys(url: str) -> list[str]:
    samples = list(iter_samples([url], lambda d: None))[1:]  # after the shard header
    return [decode_pseudo(s["__key__"], s["pl"]).key for s in samples]


def test_hostile_corpus_goes_through_label_filter_and_train(
    trained_teacher: Path, digits_dir: Path, tmp_path: Path
):
    work = tmp_path / "work"
    src, labeled, filtered, run = (work / name for name in ("src", "labels", "train", "run"))
    src.mkdir(parents=True)
    written = _hostile_corpus(src, digits_dir)

    result = _pipeline(
        "label", "--teacher", str(trained_teacher), "--input", str(src), "--output", str(labeled)
    )
    assert result.returncode == 0, result.stderr[-3000:]
    errors = [json.loads(line) for line in (labeled / "errors.jsonl").read_text().splitlines()]
    dropped = {e["key"]: e["reason"] for e in errors if e["key"] is not None}
    assert dropped == {
        "empty": "empty_image",
        "text": "undecodable_image",
        "cut": "truncated_image",
        "noimage": "no_image",
        "../../escape": "unsafe_member_name",
    }
    (whole, cut_short) = written
    sidecars = {Path(u).name: _label_keys(u) for u in expand_shards(str(labeled))}
    # The whole shard: every sample labeled or listed with a reason, never both, in order.
    kept = sidecars["mixed-000000.tar"]
    assert kept == [k for k in written[whole] if k not in dropped]
    assert len(kept) + len(dropped) == len(written[whole]) == 29
    # The cut shard: the samples before the cut, and the cut itself listed as a shard fault.
    before_cut = sidecars["mixed-000001.tar"]
    assert 1 <= len(before_cut) < 6 and before_cut == written[cut_short][: len(before_cut)]
    assert [(e["shard"], e["reason"]) for e in errors if e["key"] is None] == [
        (cut_short, "truncated_shard")
    ]
    label_manifest = json.loads((labeled / "manifest.json").read_text())
    records = len(kept) + len(before_cut)
    assert label_manifest["samples_out"] == records
    assert label_manifest["samples_in"] == records + len(dropped)

    result = _pipeline(
        "filter",
        "--input",
        str(labeled),
        "--output",
        str(filtered),
        "--threshold",
        "0",
        "--per-class",
        "40",
        "--shard-size",
        "64",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    manifest = json.loads((filtered / "manifest.json").read_text())
    assert manifest["samples_in"] == records
    assert manifest["images_kept"] + manifest["dropped"] == records
    training = [
        s for s in iter_samples(expand_shards(str(filtered)), print) if s["__key__"] != "__shard__"
    ]
    images = {s["__key__"].rsplit("_c", 1)[0] for s in training}
    filter_errors = (filtered / "errors.jsonl").read_text().splitlines()
    assert images | {json.loads(e)["key"] for e in filter_errors} == set(kept + before_cut)
    assert {"cmyk", "gray16", "alpha", "tiny"} <= images  # odd modes reach the trainer
    assert len(training) == manifest["samples_written"]

    result = _pipeline(
        "train-student",
        "--labeled",
        str(digits_dir / "labeled"),
        "--pseudo",
        str(filtered),
        "--out",
        str(run),
        "--config",
        str(DIGITS_RECIPE),
        *QUICK_TRAINING,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert {"model.safetensors", "model.json", "checkpoint.pt"} <= {p.name for p in run.iterdir()}
    assert json.loads((run / "log.jsonl").read_text().splitlines()[0])["loss_pseudo"] > 0
    # Nothing landed outside the stages' folders: not the climbing member, nor anything else.
    assert not list(tmp_path.parent.rglob("escape*"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["work"]
    assert sorted(p.name for p in work.iterdir()) == ["labels", "run", "src", "train"]


# --- SIGKILL at a random moment ---------------------------------------------------------


def _kill_at_random(args: list[str], out: Path, seed: int, window: float) -> None:
    """Start `pipeline ARGS`, and SIGKILL it at a moment drawn from a seeded RNG: uniformly
    within `window` seconds after its output folder appears (when the work begins; the
    interpreter's start-up before that varies with the machine's load). A fast machine may
    finish first: then the output is cleared and the window halved, so the kill always lands
    in the middle of the work."""
    rng = random.Random(seed)
    for _ in range(6):
        proc = subprocess.Popen(
            [sys.executable, "-m", "rs_pseudolabel.pipeline", *args],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 120
        while not out.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        time.sleep(rng.uniform(0, window))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        manifest = out / "manifest.json"
        done = manifest.exists() and json.loads(manifest.read_text()).get("state") == "done"
        if proc.returncode == -signal.SIGKILL and not done:
            return
        shutil.rmtree(out, ignore_errors=True)
        window /= 2
    pytest.fail("the stage always finished before the kill: nothing was interrupted")


@pytest.mark.parametrize("seed", [1])
def test_label_killed_at_a_random_moment_then_rerun_matches(
    seed: int, teacher: Path, corpus: Path, labels: Path, tmp_path: Path
):
    out = tmp_path / "killed"
    args = [*_stage_args("label", teacher, corpus, labels, tmp_path), str(out)]
    _kill_at_random(args, out, seed, window=1.0)
    result = _pipeline(*args)
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(assert_same_shards(labels, out)) == 6
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["samples_in"] == manifest["samples_out"] == 384
    # The killed run's temporary files (SIGKILL allows no clean-up) are removed by the rerun.
    assert not [f for f in _files(out) if TEMP_NAME.match(f)]
    visible = [f for f in _files(out) if not f.startswith("_")]
    assert visible == [
        "class_confidences.npy",
        "classes.json",
        "errors.jsonl",
        "manifest.json",
        *(f"part-{k:06d}.tar" for k in range(6)),
    ]


@pytest.mark.parametrize("seed", [2])
def test_filter_killed_at_a_random_moment_then_rerun_matches(
    seed: int, teacher: Path, corpus: Path, labels: Path, tmp_path: Path
):
    reference = tmp_path / "whole"
    filter_run(
        FilterArgs(
            input=str(labels), output=str(reference), threshold=0, per_class=40, shard_size=20
        ),
        [],
    )
    out = tmp_path / "killed"
    args = [*_stage_args("filter", teacher, corpus, labels, tmp_path), str(out)]
    _kill_at_random(args, out, seed, window=1.5)
    result = _pipeline(*args)
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(assert_same_shards(reference, out)) >= 2
    ours, theirs = (json.loads((d / "manifest.json").read_text()) for d in (out, reference))
    for key in ("samples_in", "samples_written", "images_kept", "dropped", "class_counts"):
        assert ours[key] == theirs[key], key

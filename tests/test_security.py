"""Untrusted files never run code or write outside the output: pickled checkpoints are loaded
weights-only, YAML with the safe loader, and tar member names that climb out are dropped.
Every test runs the real command and watches for the side effect a payload would have."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

from rs_pseudolabel.data.read import iter_samples
from rs_pseudolabel.data.records import decode_pseudo
from rs_pseudolabel.data.specs import expand_shards
from rs_pseudolabel.teachers import create_model, export_run
from tests.conftest import DIGITS_RECIPE, image_bytes

ROOT = Path(__file__).resolve().parents[1]


class _CreatesFile:
    """A pickle that, if ever loaded unsafely, creates a file: stands in for any payload."""

    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self):
        return (open, (str(self.target), "w"))


def _pipeline(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """`python -m rs_pseudolabel.pipeline ARGS` from `cwd`, so a payload using a relative path
    lands there."""
    return subprocess.run(
        [sys.executable, "-m", "rs_pseudolabel.pipeline", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=os.environ | {"PYTHONPATH": str(ROOT)},
    )


def _one_error_line(result: subprocess.CompletedProcess, command: str) -> str:
    """Exit status 2 and a single `pipeline COMMAND: error: ...` line, no traceback."""
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"pipeline {command}: error: "), lines
    return lines[0]


@pytest.fixture(scope="module")
def small_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real run directory (random rs-mini weights) to plant a checkpoint in."""
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("run")
    model = create_model("rs-mini", num_classes=10)
    export_run(str(out), model, "rs-mini", [str(i) for i in range(10)])
    return out


def _plant_malicious_checkpoint(run: Path, marker: Path) -> None:
    """checkpoint.pt shaped like the trainer's, with one entry that runs code on unpickling."""
    state = create_model("rs-mini", num_classes=10).state_dict()
    torch.save(
        {"model": state, "epoch": 1, "model_name": "rs-mini", "payload": _CreatesFile(marker)},
        run / "checkpoint.pt",
    )


def test_resume_refuses_a_checkpoint_that_would_run_code(digits_dir: Path, tmp_path: Path):
    run = tmp_path / "run"
    args = [
        "train-student",
        "--labeled",
        str(digits_dir / "labeled"),
        "--out",
        str(run),
        "--config",
        str(DIGITS_RECIPE),
        "--set",
        "workers=0",
        "--set",
        "epochs=1",
    ]
    # A real run, left as a kill before its end leaves it (manifest "running"), whose
    # checkpoint is then swapped for one that runs code on unpickling: the manifest matches,
    # so --resume gets as far as reading the checkpoint.
    assert _pipeline(*args, cwd=tmp_path).returncode == 0
    manifest = json.loads((run / "manifest.json").read_text())
    (run / "manifest.json").write_text(json.dumps({**manifest, "state": "running"}))
    marker = tmp_path / "pwned"
    _plant_malicious_checkpoint(run, marker)
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    result = _pipeline(*args, "--resume", cwd=tmp_path)
    line = _one_error_line(result, "train-student")
    assert "checkpoint.pt" in line and "weights-only" in line and "io.open" in line
    assert not marker.exists()
    # Refused before anything is written: the run directory is as it was.
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before


def test_eval_never_unpickles_checkpoint_pt(digits_dir: Path, small_run: Path, tmp_path: Path):
    """`eval --checkpoint RUN` reads the run's safetensors, never its pickled checkpoint.pt;
    pointing it at the pickle itself is refused, and the payload runs in neither case."""
    marker = tmp_path / "pwned"
    run = tmp_path / "run"
    run.mkdir()
    for name in ("model.json", "model.safetensors"):
        (run / name).write_bytes((small_run / name).read_bytes())
    _plant_malicious_checkpoint(run, marker)
    scores = tmp_path / "scores.json"
    ok = _pipeline(
        "eval",
        "--checkpoint",
        str(run),
        "--data",
        str(digits_dir / "val"),
        "--json",
        str(scores),
        cwd=tmp_path,
    )
    assert ok.returncode == 0, ok.stderr[-3000:]
    assert json.loads(scores.read_text())["samples"] == 297
    refused = _pipeline(
        "eval",
        "--checkpoint",
        str(run / "checkpoint.pt"),
        "--data",
        str(digits_dir / "val"),
        cwd=tmp_path,
    )
    assert "neither a model name" in _one_error_line(refused, "eval")
    assert not marker.exists()


def _tar_with_names(path: Path, members: dict[str, bytes]) -> None:
    """A shard written with tarfile itself: our writers would never produce these names."""
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_member_names_that_climb_out_are_dropped_with_a_reason(small_run: Path, tmp_path: Path):
    src, out = tmp_path / "deep" / "src", tmp_path / "deep" / "out"
    src.mkdir(parents=True)
    absolute = tmp_path / "abs" / "evil"
    png = image_bytes(size=(20, 20))
    _tar_with_names(
        src / "part-000000.tar",
        {
            "good.png": png,
            "../../escape.png": png,
            "sub/../../../climb.png": png,
            f"{absolute}.png": png,
            "also-good.png": png,
        },
    )
    result = _pipeline(
        "label",
        "--teacher",
        str(small_run),
        "--input",
        str(src),
        "--output",
        str(out),
        cwd=out.parent,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    errors = [json.loads(line) for line in (out / "errors.jsonl").read_text().splitlines()]
    assert sorted((e["key"], e["reason"]) for e in errors) == sorted(
        [
            ("../../escape", "unsafe_member_name"),
            ("sub/../../../climb", "unsafe_member_name"),
            (str(absolute), "unsafe_member_name"),
        ]
    )
    (sidecar,) = expand_shards(str(out))
    samples = list(iter_samples([sidecar], lambda d: None))[1:]
    assert [decode_pseudo(s["__key__"], s["pl"]).key for s in samples] == ["good", "also-good"]
    # Nothing was written beside or above the output folder, nor at the absolute name.
    assert not absolute.parent.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["deep"]
    assert sorted(p.name for p in (tmp_path / "deep").iterdir()) == ["out", "src"]
    assert not list(tmp_path.parent.rglob("escape*")) and not list(tmp_path.parent.rglob("climb*"))
    with tarfile.open(sidecar) as tar:
        assert all(not n.startswith("/") and ".." not in n.split("/") for n in tar.getnames())


PAYLOAD = '!!python/object/apply:os.system ["touch {marker}"]'


@pytest.mark.parametrize(
    "where", ["train-student --config", "train-student --set", "demo --config"]
)
def test_yaml_that_would_run_code_is_refused(digits_dir: Path, tmp_path: Path, where: str):
    marker = tmp_path / "MARKER"
    payload = PAYLOAD.format(marker=marker)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"model: rs-mini\nepochs: {payload}\n")
    command = where.split()[0]
    if where == "demo --config":
        args = ["demo", "--out", str(tmp_path / "demo"), "--config", str(recipe)]
    else:
        args = [
            "train-student",
            "--labeled",
            str(digits_dir / "labeled"),
            "--out",
            str(tmp_path / "run"),
        ]
        args += (
            ["--config", str(recipe)] if where.endswith("--config") else ["--set", f"lr={payload}"]
        )
        args += [] if where.endswith("--config") else ["--model", "rs-mini"]
    line = _one_error_line(_pipeline(*args, cwd=tmp_path), command)
    assert "YAML" in line
    assert not marker.exists()
    assert not (tmp_path / "run").exists() and not (tmp_path / "demo").exists()

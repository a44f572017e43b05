"""`evaluate_run`: accuracy of a run directory on labeled shards, bad samples counted."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from bench.fixtures import write_shard
from rs_pseudolabel.data.digits import write_digits
from rs_pseudolabel.data.read import iter_samples
from rs_pseudolabel.data.specs import expand_shards
from rs_pseudolabel.students.eval import evaluate_run
from rs_pseudolabel.teachers import create_model, export_run
from tests.conftest import DIGITS_RECIPE, message_lines, run_cli


def test_evaluate_run_scores_every_sample_and_counts_the_unusable(tmp_path: Path):
    write_digits(str(tmp_path / "digits"), labeled=100, seed=0)
    samples = list(iter_samples(expand_shards(str(tmp_path / "digits" / "val")), print))[:40]
    broken = [
        {"__key__": "corrupt", "png": b"\x89PNG not really", "cls": b"1"},
        {"__key__": "unknown", "png": samples[0]["png"], "cls": b"42"},
        {"__key__": "unlabeled", "png": samples[0]["png"]},
    ]
    write_shard(str(tmp_path / "val" / "val-000000.tar"), samples[:20] + broken)
    write_shard(str(tmp_path / "val" / "val-000001.tar"), samples[20:])

    torch.manual_seed(0)
    model = create_model("rs-mini", 10)
    with torch.no_grad():  # a model that always answers class 3, then 5, then the rest
        model.fc.weight.zero_()
        model.fc.bias.copy_(torch.arange(10.0).flip(0) * 0.01)
        model.fc.bias[3], model.fc.bias[5] = 1.0, 0.5
    export_run(tmp_path / "run", model, "rs-mini", [str(d) for d in range(10)])

    metrics = evaluate_run(str(tmp_path / "run"), str(tmp_path / "val"), batch_size=16)
    classes = [int(s["cls"]) for s in samples]
    assert metrics["samples"] == 40 and metrics["dropped"] == 3
    assert metrics["top1"] == pytest.approx(classes.count(3) / 40)
    top5 = {3, 5, 0, 1, 2}
    assert metrics["top5"] == pytest.approx(sum(c in top5 for c in classes) / 40)


def test_evaluate_run_rejects_what_is_not_a_run(tmp_path: Path):
    write_digits(str(tmp_path / "digits"), labeled=100, seed=0)
    with pytest.raises(ValueError, match="neither a model name"):
        evaluate_run(str(tmp_path / "nothing"), str(tmp_path / "digits" / "val"))


def test_broken_shards_are_counted_as_unusable_in_eval_and_in_training(tmp_path: Path):
    """A shard of random bytes and an empty .tar among the good ones: each counts as a drop,
    by reason, in `pipeline eval` and in every training epoch's line and the run's manifest
    (they used to be logged and nothing else: "0 unusable", `dropped: 0`)."""
    import json
    import subprocess
    import sys

    write_digits(str(tmp_path / "digits"), labeled=200, seed=0, shard_size=50)
    labeled = tmp_path / "digits" / "labeled"
    (labeled / "junk.tar").write_bytes(bytes(range(256)) * 8)
    (labeled / "empty.tar").write_bytes(b"")
    export_run(
        tmp_path / "run", create_model("rs-mini", 10), "rs-mini", [str(d) for d in range(10)]
    )
    metrics = evaluate_run(str(tmp_path / "run"), str(labeled), batch_size=64, workers=2)
    assert metrics["samples"] == 200 and metrics["dropped"] == 2

    out = tmp_path / "student"
    result = subprocess.run(
        [sys.executable, "-m", "rs_pseudolabel.pipeline", "train-student", "--model", "rs-mini",
         "--labeled", str(labeled), "--out", str(out), "--config", "digits", "--epochs", "4",
         "--batch-size", "64", "--set", "workers=2", "--set", "epoch_samples=128"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [line for line in result.stdout.splitlines() if line.startswith("epoch ")]
    assert len(lines) == 4 and any("not_a_tar" in line for line in lines), lines
    manifest = json.loads((out / "manifest.json").read_text())
    assert {"not_a_tar", "truncated_shard"} <= set(manifest["drops"]), manifest
    assert manifest["dropped"] == sum(manifest["drops"].values())


def test_unlabeled_shards_are_refused_for_eval_and_for_validation(
    digits_dir: Path, random_teacher: Path, tmp_path: Path
):
    unlabeled = str(digits_dir / "unlabeled")
    scored = run_cli("eval", "--checkpoint", str(random_teacher), "--data", unlabeled)
    lines = message_lines(scored.stderr)
    assert scored.returncode == 2 and len(lines) == 1, scored.stderr
    assert f"{unlabeled}: none of its 1300 samples could be scored" in lines[0]
    run = tmp_path / "run"
    trained = run_cli("train-student", "--model", "rs-mini", "--config", str(DIGITS_RECIPE),
                      "--labeled", str(digits_dir / "labeled"), "--val", unlabeled,
                      "--out", str(run), "--epochs", "1")  # fmt: skip
    lines = message_lines(trained.stderr)
    assert trained.returncode == 2 and len(lines) == 1, trained.stderr
    assert "hold images without classes" in lines[0]
    assert not (run / "log.jsonl").exists()  # refused before the first epoch

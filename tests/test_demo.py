"""`pipeline demo` runs every real stage in order and reports both models."""

import json
from pathlib import Path

import yaml
from PIL import Image

from tests.conftest import run_cli

ROOT = Path(__file__).resolve().parent.parent


def test_demo_runs_all_stages_resumably_and_reports_both_models(tmp_path: Path):
    recipe = yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())
    for part in ("teacher", "student"):
        recipe[part]["epochs"] = 1
        recipe[part]["set"]["epoch_samples"] = 64
    recipe["filter"]["threshold"] = 0.0  # a one-epoch teacher is confident about nothing
    (tmp_path / "quick.yaml").write_text(yaml.safe_dump(recipe))
    out = tmp_path / "out"
    args = ["demo", "--out", str(out), "--config", str(tmp_path / "quick.yaml")]
    first = run_cli(*args, check=True)
    report = json.loads((out / "report.json").read_text())
    assert 0 < report["teacher"]["top1"] <= 1 and 0 < report["student"]["top1"] <= 1
    assert report["teacher"]["samples"] == report["student"]["samples"] == 297
    assert report["rounds"][0]["pseudo_labels"] > 0
    for stage in ("data", "round0-teacher", "round1-labels", "round1-train", "round1-student"):
        assert (out / stage).is_dir()
    assert "teacher (round 0)" in first.stdout and "student (round 1)" in first.stdout
    # The student's loader workers fork after the Beam stages ran in this process.
    assert "fork() handlers" not in first.stderr
    with Image.open(out / "report.png") as png:
        assert png.format == "PNG"
    mtime = (out / "round1-student" / "model.safetensors").stat().st_mtime_ns
    again = run_cli(*args, check=True)
    assert (out / "round1-student" / "model.safetensors").stat().st_mtime_ns == mtime
    assert json.loads((out / "report.json").read_text())["student"] == report["student"]
    assert again.stdout.count("%") >= 4
    # An edited recipe is refused, not answered with the finished run of the old one.
    recipe["student"]["set"]["stochastic_depth"] = 0.3
    (tmp_path / "quick.yaml").write_text(yaml.safe_dump(recipe))
    edited = run_cli(*args)
    assert edited.returncode == 2
    assert "round1-student holds a run made with other settings" in edited.stderr
    assert (out / "round1-student" / "model.safetensors").stat().st_mtime_ns == mtime

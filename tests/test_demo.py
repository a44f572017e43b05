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


def test_later_rounds_grow_the_student_and_its_selection_and_seed_each_model(tmp_path: Path):
    """configs/demo.yaml's own later_rounds: a larger student, from weights of its own, on a
    selection made anew by the round-1 student, larger than round 1's."""
    from bench.controls import CONTROLS, run_control

    recipe = yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())
    for part in ("teacher", "student"):
        recipe[part]["epochs"] = 1
        recipe[part]["set"]["epoch_samples"] = 64
    recipe["filter"]["threshold"] = 0.0  # a one-epoch teacher is confident about nothing
    (tmp_path / "quick.yaml").write_text(yaml.safe_dump(recipe))
    out = tmp_path / "out"
    args = ["demo", "--out", str(out), "--seed", "3", "--rounds", "2"]
    run_cli(*args, "--config", str(tmp_path / "quick.yaml"), check=True)
    report = json.loads((out / "report.json").read_text())

    def run_config(name: str) -> dict:  # the recipe a run trained with
        return yaml.safe_load((out / name / "config.yaml").read_text())

    # Every model its own trainer seed, so no student starts from its teacher's weights.
    seeds = [
        run_config(f"round{r}-{part}")["seed"]
        for r, part in ((0, "teacher"), (1, "student"), (2, "student"))
    ]
    assert seeds == [3, 1003, 2003]
    grown = recipe["later_rounds"]["student"]["model"]
    assert [run_config(f"round{r}-student")["model"] for r in (1, 2)] == ["rs-mini", grown]
    assert [x["model"] for x in report["rounds"]] == ["rs-mini", grown]
    # Round 2 selects anew with the round-1 student's labels, more images than round 1.
    first, second = (
        json.loads((out / f"round{r}-train" / "manifest.json").read_text()) for r in (1, 2)
    )
    assert second["args"]["keep_selection"] is None and not report["rounds"][1]["kept_selection"]
    assert second["args"]["per_class"] > first["args"]["per_class"]
    assert second["images_kept"] > first["images_kept"] > 0
    assert report["rounds"][1]["pseudo_labels"] > report["rounds"][0]["pseudo_labels"]
    teachers = [
        json.loads((out / f"round{r}-labels" / "manifest.json").read_text()) for r in (1, 2)
    ]
    assert teachers[0]["fingerprint"] != teachers[1]["fingerprint"]

    # The controls: round 1's student without the pseudo-labels (at its compute), without
    # the noise, and with the true classes of its selection (written by bench/bench_demo.py).
    from bench.bench_demo import selection_truth

    right = selection_truth(out / "round1-train", out / "round1-oracle")
    assert 0 <= right <= 1
    for kind in CONTROLS:
        scores = run_control(str(out), 3, kind, str(tmp_path / "quick.yaml"))
        assert 0 < scores["top1"] <= 1 and scores["samples"] == 297
    supervised, noise_free, oracle = (run_config(f"control-{kind}") for kind in CONTROLS)
    inputs = json.loads((out / "control-supervised" / "manifest.json").read_text())
    assert set(inputs["fingerprint"]["inputs"]) == {"labeled", "val"}
    assert supervised["seed"] == noise_free["seed"] == oracle["seed"] == 1003
    # Matched compute: the student's 32 + 96 images a step, all labeled, at its LR.
    student = run_config("round1-student")
    assert (student["batch_size"], student["unlabeled_ratio"]) == (32, 3)
    assert (supervised["batch_size"], supervised["epoch_samples"]) == (128, 4 * 64)
    assert supervised["lr"] * 128 == student["lr"] * 32
    assert noise_free["randaugment_ops"] == 0
    assert noise_free["dropout"] == noise_free["stochastic_depth"] == 0
    # The oracle trains on the same images, each with its true class as a hard label.
    from sklearn.datasets import load_digits

    from rs_pseudolabel.data.read import iter_samples

    truth = load_digits().target
    taught = {
        s["__key__"]: int(s["cls"])
        for s in iter_samples(sorted(map(str, (out / "round1-oracle").glob("*.tar"))), print)
    }
    chosen = {
        s["__key__"]
        for s in iter_samples(sorted(map(str, (out / "round1-train").glob("*.tar"))), print)
    }
    assert set(taught) == chosen
    assert all(cls == truth[int(key[5:9])] for key, cls in taught.items())

"""`pipeline stats` counts what is really in the shards and draws it."""

import json
import subprocess
import sys
import tarfile
from collections import Counter
from pathlib import Path

import torch
from PIL import Image

from bench.fixtures import SPEC_KEYS
from rs_pseudolabel.data.specs import expand_shards
from rs_pseudolabel.pipeline.filter import FilterArgs
from rs_pseudolabel.pipeline.filter import run as filter_run
from rs_pseudolabel.pipeline.label import LabelArgs
from rs_pseudolabel.pipeline.label import run as label
from rs_pseudolabel.pipeline.stats import collect
from rs_pseudolabel.teachers import create_model, export_run


def _direct_count(folder: Path) -> tuple[int, Counter, int]:
    """Count with nothing but tarfile: samples, .cls values, bytes."""
    keys, classes, size = set(), Counter(), 0
    for url in expand_shards(str(folder)):
        size += Path(url).stat().st_size
        with tarfile.open(url) as tar:
            for member in tar.getmembers():
                key = member.name.split(".", 1)[0]
                if key != "__shard__":
                    keys.add(key)
                if member.name.endswith(".cls"):
                    classes[int(tar.extractfile(member).read())] += 1
    return len(keys), classes, size


def test_counts_of_labeled_shards_equal_a_direct_count(digits_dir: Path, tmp_path: Path):
    report, names = collect(str(digits_dir / "val"))
    samples, classes, size = _direct_count(digits_dir / "val")
    assert report["samples"] == samples == 297 and report["bytes"] == size
    assert report["class_counts"] == {str(c): n for c, n in sorted(classes.items())}
    assert report["formats"] == {"png": 297} and names == [str(i) for i in range(10)]
    assert report["image_size"]["width"] == {"min": 32, "median": 32.0, "max": 32}


def test_pseudo_label_and_training_shards_json_and_plot(digits_dir: Path, tmp_path: Path):
    torch.manual_seed(0)
    export_run(str(tmp_path / "t"), create_model("rs-mini", num_classes=10), "rs-mini", None)
    label(
        LabelArgs(
            teacher=str(tmp_path / "t"),
            input=str(digits_dir / "labeled"),
            output=str(tmp_path / "pl"),
        ),
        [],
    )
    filter_run(
        FilterArgs(
            input=str(tmp_path / "pl"),
            output=str(tmp_path / "train"),
            threshold=0.0,
            per_class=500,
            shard_size=100,
        ),
        [],
    )
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "rs_pseudolabel.pipeline",
            "stats",
            str(tmp_path / "train"),
            "--json",
            str(tmp_path / "s.json"),
            "--plot",
            str(tmp_path / "s.png"),
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    report = json.loads((tmp_path / "s.json").read_text())
    samples, classes, size = _direct_count(tmp_path / "train")
    assert report["samples"] == samples and report["bytes"] == size
    assert report["class_counts"] == {str(c): n for c, n in sorted(classes.items())}
    copies = report["copies_hist"]
    assert sum(int(k) * v for k, v in copies.items()) == samples and max(map(int, copies)) >= 2
    assert sum(report["confidence_hist"]["counts"]) == samples
    manifest = json.loads((tmp_path / "train" / "manifest.json").read_text())
    assert report["drops"] == manifest["drops"]
    assert set(SPEC_KEYS) <= set(report)
    assert f"{samples:,}" in result.stdout and "copies per image" in result.stdout
    with Image.open(tmp_path / "s.png") as png:
        assert png.format == "PNG" and png.size[0] >= 800

    sidecar, _ = collect(str(tmp_path / "pl"))
    assert sidecar["samples"] == 200 and sidecar["class_source"] == "top1"
    assert sum(sidecar["entropy_hist"]["counts"]) == 200


def test_an_unfinished_stage_and_an_empty_corpus_are_said_in_words(
    digits_dir: Path, tmp_path: Path
):
    torch.manual_seed(0)
    export_run(str(tmp_path / "t"), create_model("rs-mini", num_classes=10), "rs-mini", None)
    out = tmp_path / "pl"
    label(
        LabelArgs(teacher=str(tmp_path / "t"), input=str(digits_dir / "val"), output=str(out)), []
    )
    manifest = json.loads((out / "manifest.json").read_text())
    (out / "manifest.json").write_text(json.dumps(manifest | {"state": "running"}))  # killed
    result = subprocess.run(
        [sys.executable, "-m", "rs_pseudolabel.pipeline", "stats", str(out)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    first = result.stdout.splitlines()[0]
    assert first.startswith("state") and "UNFINISHED: `pipeline label`" in first, result.stdout
    empty = tmp_path / "empty"
    empty.mkdir()
    with tarfile.open(empty / "part-000000.tar", "w"):
        pass
    result = subprocess.run(
        [sys.executable, "-m", "rs_pseudolabel.pipeline", "stats", str(empty)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    assert "0 (no samples)" in result.stdout and "None" not in result.stdout, result.stdout

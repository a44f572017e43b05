"""No silent wrong result: an output folder knows what made it, outputs never overlap inputs,
joins are checked, and every count is read back from the shards themselves."""

from __future__ import annotations

import gzip
import json
import shutil
from collections import Counter
from pathlib import Path

import pytest

from bench.fixtures import write_shard
from rs_pseudolabel.data.read import iter_samples
from rs_pseudolabel.data.records import content_hash, decode_pseudo, read_cls
from rs_pseudolabel.data.specs import expand_shards
from tests.conftest import image_bytes, run_cli

SHARDS, PER_SHARD = 4, 10


def _write_corpus(root: Path, seed: int = 0) -> Path:
    for k in range(SHARDS):
        write_shard(
            str(root / f"part-{k:06d}.tar"),
            [
                {"__key__": f"s{k}i{i}", "png": image_bytes(size=(20 + i + seed, 20 + k))}
                for i in range(PER_SHARD)
            ],
        )
    return root


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    return _write_corpus(tmp_path / "src")


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def _one_error_line(result, command: str) -> str:
    assert result.returncode == 2, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith(f"pipeline {command}: error: ") and "Traceback" not in result.stderr
    return lines[-1]


def _samples(folder: Path) -> list[dict]:
    return [
        s
        for s in iter_samples(expand_shards(str(folder)), lambda d: None)
        if s["__key__"] != "__shard__"
    ]


def _label(teacher: Path, src: str, out: Path, *extra: str):
    return run_cli("label", "--teacher", str(teacher), "--input", src, "--output", str(out), *extra)


def _filter(labels: Path, out: Path, *extra: str):
    return run_cli(
        "filter", "--input", str(labels), "--output", str(out), "--threshold", "0",
        "--shard-size", "16", *extra,
    )  # fmt: skip


@pytest.mark.parametrize("where", ["is", "lies inside", "contains"])
def test_label_output_overlapping_its_input_is_refused_and_the_input_intact(
    where: str, random_teacher: Path, corpus: Path
):
    out = {"is": corpus, "lies inside": corpus / "labels", "contains": corpus.parent}[where]
    before = _files(corpus)
    line = _one_error_line(_label(random_teacher, str(corpus), out), "label")
    assert f"{where} the input folder" in line
    assert _files(corpus) == before


def test_ingest_into_its_own_source_is_refused(corpus: Path):
    before = _files(corpus)
    line = _one_error_line(run_cli("data", "ingest", str(corpus), "--out", str(corpus)), "data")
    assert "is the input folder" in line and _files(corpus) == before


def test_label_rerun_with_other_settings_is_refused_then_overwritten(
    random_teacher: Path, corpus: Path, tmp_path: Path
):
    out = tmp_path / "labels"
    assert _label(random_teacher, str(corpus), out, "--topk", "4").returncode == 0
    line = _one_error_line(_label(random_teacher, str(corpus), out, "--topk", "5"), "label")
    assert "topk is 5 now but 4 there" in line and "--overwrite" in line
    assert _label(random_teacher, str(corpus), out, "--topk", "5", "--overwrite").returncode == 0
    fresh = tmp_path / "fresh"
    assert _label(random_teacher, str(corpus), fresh, "--topk", "5").returncode == 0
    assert _files(out).keys() - {"manifest.json"} == _files(fresh).keys() - {"manifest.json"}
    for name, data in _files(fresh).items():
        if name.endswith(".tar"):
            assert _files(out)[name] == data, name
    labels = [decode_pseudo(s["__key__"], s["pl"]) for s in _samples(out)]
    assert len(labels) == SHARDS * PER_SHARD and all(len(lab.indices) == 5 for lab in labels)


def test_label_rerun_with_another_teacher_is_refused(
    random_teacher: Path, corpus: Path, tmp_path: Path
):
    from rs_pseudolabel.teachers import create_model, export_run

    other = tmp_path / "other-teacher"
    export_run(str(other), create_model("rs-mini", num_classes=10), "rs-mini", None)
    out = tmp_path / "labels"
    assert _label(random_teacher, str(corpus), out).returncode == 0
    line = _one_error_line(_label(other, str(corpus), out), "label")
    assert "teacher is" in line


def test_filter_rerun_with_other_settings_is_refused_then_overwritten(
    random_teacher: Path, corpus: Path, tmp_path: Path
):
    labels, out, fresh = tmp_path / "labels", tmp_path / "train", tmp_path / "fresh"
    assert _label(random_teacher, str(corpus), labels).returncode == 0
    assert _filter(labels, out, "--per-class", "20").returncode == 0
    line = _one_error_line(_filter(labels, out, "--per-class", "30"), "filter")
    assert "per_class is 30 now but 20 there" in line
    assert _filter(labels, out, "--per-class", "30", "--overwrite").returncode == 0
    assert _filter(labels, fresh, "--per-class", "30").returncode == 0
    shards = sorted(p.name for p in fresh.glob("*.tar"))
    assert shards == sorted(p.name for p in out.glob("*.tar"))
    assert all((out / n).read_bytes() == (fresh / n).read_bytes() for n in shards)


def test_filter_refuses_unfinished_or_relabeled_input(
    random_teacher: Path, corpus: Path, tmp_path: Path
):
    labels, out = tmp_path / "labels", tmp_path / "train"
    assert _label(random_teacher, str(corpus), labels).returncode == 0
    assert _filter(labels, out, "--per-class", "20").returncode == 0
    _write_corpus(corpus / "more", seed=1)
    relabel = _label(random_teacher, str(corpus / "more"), labels, "--overwrite")
    assert relabel.returncode == 0, relabel.stderr
    assert "labels.fingerprint" in _one_error_line(
        _filter(labels, out, "--per-class", "20"), "filter"
    )
    manifest = json.loads((labels / "manifest.json").read_text())
    (labels / "manifest.json").write_text(json.dumps({**manifest, "state": "running"}))
    line = _one_error_line(_filter(labels, tmp_path / "other", "--per-class", "20"), "filter")
    assert "has not finished" in line
    pattern = _one_error_line(_filter(Path(f"{labels}/part-{{0..1}}.tar"), out), "filter")
    assert "output folder of `pipeline label`" in pattern


def test_threshold_that_keeps_nothing_fails_with_the_counts_and_writes_nothing(
    random_teacher: Path, corpus: Path, tmp_path: Path
):
    labels = tmp_path / "labels"
    assert _label(random_teacher, str(corpus), labels).returncode == 0
    result = run_cli(
        "filter", "--input", str(labels), "--output", str(tmp_path / "train"), "--threshold", "0.99"
    )
    line = _one_error_line(result, "filter")
    assert "keeps no pseudo-label" in line and "class" in line
    assert not (tmp_path / "train").exists()


def test_ingest_rerun_after_the_source_changed_is_refused_then_overwritten(tmp_path: Path):
    src = tmp_path / "photos"
    src.mkdir()
    for i in range(6):
        (src / f"p{i}.png").write_bytes(image_bytes(size=(10 + i, 10)))
    out = tmp_path / "shards"
    assert run_cli("data", "ingest", str(src), "--out", str(out)).returncode == 0
    for i in range(6, 12):
        (src / f"p{i}.png").write_bytes(image_bytes(size=(10 + i, 10)))
    line = _one_error_line(run_cli("data", "ingest", str(src), "--out", str(out)), "data")
    assert "source.digest is" in line
    result = run_cli("data", "ingest", str(src), "--out", str(out), "--overwrite")
    assert result.returncode == 0, result.stderr
    keys = Counter(s["__key__"] for s in _samples(out))
    assert len(keys) == 12 and set(keys.values()) == {1}


def test_a_source_rewritten_after_labeling_never_gives_a_wrong_image(
    random_teacher: Path, corpus: Path, tmp_path: Path
):
    labels, out = tmp_path / "labels", tmp_path / "train"
    assert _label(random_teacher, str(corpus), labels).returncode == 0
    changed = corpus / "part-000001.tar"
    write_shard(
        str(changed),
        [{"__key__": f"s1i{i}", "png": image_bytes(size=(40 + i, 40))} for i in range(PER_SHARD)],
    )
    result = _filter(labels, out, "--per-class", "40")
    assert result.returncode == 0, result.stderr
    errors = [json.loads(line) for line in (out / "errors.jsonl").read_text().splitlines()]
    assert sorted(e["key"] for e in errors if e["reason"] == "source_changed") == sorted(
        f"s1i{i}" for i in range(PER_SHARD)
    )
    sources = {
        s["__key__"]: s["png"] for s in iter_samples(expand_shards(str(corpus)), lambda d: None)
    }
    training = _samples(out)
    assert training
    for sample in training:
        key = sample["__key__"].rsplit("_c", 1)[0]
        assert not key.startswith("s1i")
        label = decode_pseudo(key, sample["pl"])
        assert sample["png"] == sources[key] and content_hash(sample["png"]) == label.content_hash


def test_duplicate_keys_in_a_shard_keep_each_label_on_its_own_image(
    random_teacher: Path, tmp_path: Path
):
    src = tmp_path / "src"
    samples = [{"__key__": f"k{i}", "png": image_bytes(size=(20 + i, 20))} for i in range(8)]
    samples.insert(4, {"__key__": "k1", "png": image_bytes(size=(50, 50))})
    write_shard(str(src / "part-000000.tar"), samples)
    labels, out = tmp_path / "labels", tmp_path / "train"
    assert _label(random_teacher, str(src), labels).returncode == 0
    manifest = json.loads((labels / "manifest.json").read_text())
    assert manifest["drops"] == {"duplicate_key": 1} and manifest["samples_in"] == 9
    assert _filter(labels, out, "--per-class", "8").returncode == 0
    first = {s["__key__"]: s["png"] for s in reversed(samples)}
    for sample in _samples(out):
        key = sample["__key__"].rsplit("_c", 1)[0]
        assert sample["png"] == first[key]
        assert content_hash(sample["png"]) == decode_pseudo(key, sample["pl"]).content_hash


def test_gzipped_shards_give_the_same_training_samples(
    random_teacher: Path, corpus: Path, tmp_path: Path
):
    gz = tmp_path / "gz"
    gz.mkdir()
    for shard in corpus.glob("*.tar"):
        (gz / (shard.name + ".gz")).write_bytes(gzip.compress(shard.read_bytes()))
    runs = {}
    for name, src in (("tar", corpus), ("gz", gz)):
        labels, out = tmp_path / f"labels-{name}", tmp_path / f"train-{name}"
        assert _label(random_teacher, str(src), labels).returncode == 0
        manifest = json.loads((labels / "manifest.json").read_text())
        assert manifest["samples_out"] == SHARDS * PER_SHARD and not manifest["shard_faults"]
        assert _filter(labels, out, "--per-class", "30").returncode == 0
        runs[name] = {p.name: p.read_bytes() for p in out.glob("*.tar")}
    assert runs["gz"] == runs["tar"] and runs["tar"]
    ingested = tmp_path / "ingested"
    assert run_cli("data", "ingest", str(gz), "--out", str(ingested)).returncode == 0
    assert len(_samples(ingested)) == SHARDS * PER_SHARD


def test_imagefolder_class_ids_agree_across_splits_with_empty_and_nested_folders(tmp_path: Path):
    train, val = tmp_path / "train", tmp_path / "val"
    for cls in ("cat", "cow", "dog"):
        (val / cls).mkdir(parents=True)
        (val / cls / f"{cls}.png").write_bytes(image_bytes(size=(12, 12)))
        (train / cls).mkdir(parents=True)
    (train / "cat" / "a.png").write_bytes(image_bytes(size=(13, 12)))
    (train / "dog" / "sub").mkdir()
    (train / "dog" / "sub" / "b.png").write_bytes(image_bytes(size=(14, 12)))
    (train / "dog" / "notes.txt").write_bytes(b"not an image")
    (train / "stray.png").write_bytes(image_bytes(size=(15, 12)))
    (train / "backup.tar").write_bytes(b"")
    outs = {}
    for split in (train, val):
        outs[split.name] = tmp_path / f"{split.name}-shards"
        result = run_cli("data", "ingest", str(split), "--out", str(outs[split.name]))
        assert result.returncode == 0, result.stderr
    names = [json.loads((o / "classes.json").read_text()) for o in outs.values()]
    assert names[0] == names[1] == ["cat", "cow", "dog"]
    ids = {s["__key__"]: read_cls(s) for s in _samples(outs["train"])}
    assert ids == {"cat_a": 0, "dog_sub_b": 2}
    manifest = json.loads((outs["train"] / "manifest.json").read_text())
    assert manifest["drops"] == {"not_an_image": 1, "outside_class_folders": 2}
    assert manifest["empty_classes"] == ["cow"]
    assert manifest["samples_in"] == manifest["samples_out"] + manifest["dropped"] == 5


def test_relative_brace_input_then_filter_from_another_folder(
    random_teacher: Path, corpus: Path, tmp_path: Path
):
    import subprocess
    import sys

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    relative = subprocess.run(
        [sys.executable, "-m", "rs_pseudolabel.pipeline", "label", "--teacher", str(random_teacher),
         "--input", "src/part-{000000..000003}.tar", "--output", "labels-rel"],
        cwd=tmp_path, capture_output=True, text=True,
    )  # fmt: skip
    assert relative.returncode == 0, relative.stderr
    moved = subprocess.run(
        [sys.executable, "-m", "rs_pseudolabel.pipeline", "filter", "--input", "../labels-rel",
         "--output", "../train-rel", "--threshold", "0", "--per-class", "20",
         "--shard-size", "16"],
        cwd=elsewhere, capture_output=True, text=True,
    )  # fmt: skip
    assert moved.returncode == 0, moved.stderr
    assert _label(random_teacher, str(corpus), tmp_path / "labels-abs").returncode == 0
    assert (
        _filter(tmp_path / "labels-abs", tmp_path / "train-abs", "--per-class", "20").returncode
        == 0
    )
    manifest = json.loads((tmp_path / "train-rel" / "manifest.json").read_text())
    assert manifest["drops"].get("missing_source", 0) == 0
    rel = {p.name: p.read_bytes() for p in (tmp_path / "train-rel").glob("*.tar")}
    ab = {p.name: p.read_bytes() for p in (tmp_path / "train-abs").glob("*.tar")}
    assert rel == ab and rel
    shutil.rmtree(elsewhere)


# --- upgrades: outputs of an earlier release, outputs of another record format ------------


def _edit_fingerprint(folder: Path, edit) -> None:
    path = folder / "manifest.json"
    manifest = json.loads(path.read_text())
    edit(manifest["fingerprint"])
    path.write_text(json.dumps(manifest))


def test_an_earlier_releases_outputs_resume_and_another_record_format_is_refused(
    random_teacher: Path, corpus: Path, tmp_path: Path
):
    """The release before record formats were fingerprinted wrote the same manifests less
    the `record_format` key: such a half-finished label folder resumes, and a finished
    filter output is still done. A folder of another record format is refused in one line
    by the label rerun and by the filter, never mixed."""
    labels, whole = tmp_path / "labels", tmp_path / "whole"
    assert _label(random_teacher, str(corpus), whole).returncode == 0
    assert _label(random_teacher, str(corpus), labels).returncode == 0
    # Half-finished, as the earlier release left it: one shard to do, no format key.
    manifest = json.loads((labels / "manifest.json").read_text())
    assert manifest["fingerprint"]["record_format"] == 1
    (labels / "part-000002.tar").unlink()
    (labels / "_reports" / "part-000002.tar.json").unlink()
    manifest["state"] = "running"
    del manifest["fingerprint"]["record_format"]
    (labels / "manifest.json").write_text(json.dumps(manifest))
    result = _label(random_teacher, str(corpus), labels)
    assert result.returncode == 0, result.stderr
    assert _files(whole)["part-000002.tar"] == _files(labels)["part-000002.tar"]
    assert json.loads((labels / "manifest.json").read_text())["shards_done_before"] == 3

    train = tmp_path / "train"
    assert _filter(labels, train).returncode == 0
    _edit_fingerprint(
        train, lambda f: (f.pop("record_format"), f["labels"]["fingerprint"].pop("record_format"))
    )
    result = _filter(labels, train)
    assert result.returncode == 0 and "Nothing to do" in result.stdout, result.stderr

    _edit_fingerprint(whole, lambda f: f.update(record_format=99))
    line = _one_error_line(_filter(whole, tmp_path / "other"), "filter")
    assert "record format 99; this release reads format 1" in line
    manifest = json.loads((whole / "manifest.json").read_text())
    (whole / "manifest.json").write_text(json.dumps(manifest | {"state": "running"}))
    line = _one_error_line(_label(random_teacher, str(corpus), whole), "label")
    assert "record_format is 1 now but 99 there" in line

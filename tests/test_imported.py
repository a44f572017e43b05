"""Labels made elsewhere: a teacher's labels written in the documented predictions format and
imported filter into the very training shards the teacher's own sidecars give; rows with no
image, images with no row and images whose bytes differ are each accounted for."""

import hashlib
import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rs_pseudolabel.data.decode import find_image
from rs_pseudolabel.data.read import iter_samples
from rs_pseudolabel.data.records import PSEUDO_EXT, decode_pseudo
from tests.conftest import assert_same_shards, message_lines, run_cli

FILTER = ["--threshold", "0", "--per-class", "30", "--shard-size", "50"]


@pytest.fixture(scope="module")
def labeled(digits_dir: Path, trained_teacher: Path, tmp_path_factory: pytest.TempPathFactory):
    """Two unlabeled shards, labeled by the teacher, and its predictions as rows."""
    root = tmp_path_factory.mktemp("imported")
    corpus = root / "corpus"
    corpus.mkdir()
    for shard in sorted((digits_dir / "unlabeled").glob("*.tar"))[:2]:
        shutil.copy(shard, corpus / shard.name)
    result = run_cli(
        "label", "--teacher", str(trained_teacher), "--input", str(corpus),
        "--output", str(root / "teacher"), "--device", "cpu",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    images = {
        s["__key__"]: find_image(s)[1]
        for s in iter_samples([str(p) for p in sorted(corpus.glob("*.tar"))], lambda d: None)
    }
    rows = []
    for s in iter_samples(
        [str(p) for p in sorted((root / "teacher").glob("*.tar"))], lambda d: None
    ):
        if PSEUDO_EXT in s:
            label = decode_pseudo(s["__key__"], s[PSEUDO_EXT])
            rows.append(
                {
                    "key": label.key,
                    "topk_indices": label.indices.tolist(),
                    "topk_probs": label.probs.astype(float).tolist(),
                    "entropy": label.entropy,
                    "sha256": hashlib.sha256(images[label.key]).hexdigest(),
                }
            )
    return root, corpus, rows


def _write(path: Path, rows: list[dict]) -> Path:
    if path.suffix == ".parquet":
        pq.write_table(pa.Table.from_pylist(rows), path)
    else:
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def _import(corpus: Path, predictions: Path, out: Path, *options: str):
    return run_cli(
        "label", "--from-predictions", str(predictions), "--input", str(corpus),
        "--output", str(out), *options,
    )  # fmt: skip


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_imported_labels_filter_into_the_same_training_shards(labeled, suffix: str, tmp_path):
    root, corpus, rows = labeled
    predictions = _write(tmp_path / f"predictions{suffix}", rows)
    result = _import(corpus, predictions, tmp_path / "imported")
    assert result.returncode == 0, result.stderr
    for source, out in (
        (root / "teacher", tmp_path / "a"),
        (tmp_path / "imported", tmp_path / "b"),
    ):
        result = run_cli("filter", "--input", str(source), "--output", str(out), *FILTER)
        assert result.returncode == 0, result.stderr
    assert assert_same_shards(tmp_path / "a", tmp_path / "b")
    manifest = json.loads((tmp_path / "imported" / "manifest.json").read_text())
    assert manifest["predictions"] == {"rows": len(rows), "unmatched": 0, "unmatched_keys": []}
    assert manifest["teacher"].startswith("predictions@")


def test_missing_extra_and_mismatched_rows_are_each_accounted_for(labeled, tmp_path: Path):
    _, corpus, rows = labeled
    rows = [dict(r) for r in rows]
    missing = [r["key"] for r in rows[:3]]
    changed = rows[5]["key"]
    rows[5]["sha256"] = hashlib.sha256(b"other bytes").hexdigest()
    extra = [{"key": f"nowhere{i}", "probs": [0.1] * 10} for i in range(2)]
    predictions = _write(tmp_path / "p.jsonl", rows[3:] + extra)
    result = _import(corpus, predictions, tmp_path / "out")
    assert result.returncode == 0, result.stderr
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["drops"] == {"hash_mismatch": 1, "no_prediction": 3}
    assert manifest["samples_out"] == len(rows) - 4
    assert manifest["samples_in"] == len(rows)
    assert manifest["predictions"]["unmatched"] == 2
    assert manifest["predictions"]["unmatched_keys"] == ["nowhere0", "nowhere1"]
    assert "2 of the" in result.stdout + result.stderr and "nowhere0" in result.stdout
    errors = [json.loads(line) for line in (tmp_path / "out" / "errors.jsonl").open()]
    assert {e["key"]: e["reason"] for e in errors} == {
        **dict.fromkeys(missing, "no_prediction"),
        changed: "hash_mismatch",
    }


@pytest.mark.parametrize(
    ("rows", "said"),
    [
        ([{"key": "a", "probs": [1.0]}, {"key": "a", "probs": [1.0]}], "line 2: key 'a' has a"),
        ([{"key": "a", "probs": [0.2, 0.2]}], "line 1: probs sum to 0.4000, not 1"),
        ([{"key": "a"}], "give exactly one of probs, logits"),
        ([{"probs": [1.0]}], "every row needs a 'key'"),
    ],
)
def test_a_bad_predictions_file_is_one_line_naming_the_row(
    labeled, rows: list[dict], said: str, tmp_path: Path
):
    _, corpus, _ = labeled
    result = _import(corpus, _write(tmp_path / "p.jsonl", rows), tmp_path / "out")
    lines = message_lines(result.stderr)
    assert result.returncode == 2 and len(lines) == 1 and said in lines[0], result.stderr
    assert not (tmp_path / "out").exists()


def test_a_teachers_option_with_imported_labels_is_refused(labeled, tmp_path: Path):
    _, corpus, rows = labeled
    predictions = _write(tmp_path / "p.jsonl", rows)
    result = _import(corpus, predictions, tmp_path / "out", "--tta", "flip")
    lines = message_lines(result.stderr)
    assert result.returncode == 2 and "--tta has nothing to act on" in lines[0], result.stderr

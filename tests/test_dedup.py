"""Copies of evaluation images planted in the unlabeled corpus are found and dropped, also
when the evaluation set holds near-twins of its own."""

import json
from pathlib import Path

import faiss
import numpy as np
import pytest

from bench.bench_dedup import COPIES, EVAL_SCANS, OTHER_SCANS, mosaics
from bench.fixtures import write_shard
from rs_pseudolabel.pipeline.dedup import calibrated_threshold
from rs_pseudolabel.pipeline.filter import FilterArgs, run
from rs_pseudolabel.pipeline.label import LabelArgs
from rs_pseudolabel.pipeline.label import run as label

# 1% of the evaluation images are in near-twin pairs: the last TWINS are copies of the first.
EVALS, TWINS, PLANTED, OTHERS = 2000, 10, 40, 2000
TWIN_KINDS = ("recompressed", "resized", "cropped")


def _sample(key: str, kind: str, data: bytes, **extra: bytes) -> dict:
    return {"__key__": key, "jpg" if kind == "recompressed" else "png": data, **extra}


@pytest.fixture(scope="module")
def planted(tmp_path_factory: pytest.TempPathFactory, trained_teacher: Path) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("dedup")
    evals = mosaics(EVALS, 1, EVAL_SCANS)
    encoded = [("exact", COPIES["exact"](img)) for img in evals]
    for j in range(TWINS):
        kind = TWIN_KINDS[j % len(TWIN_KINDS)]
        encoded[EVALS - 1 - j] = (kind, COPIES[kind](evals[j]))
    write_shard(
        str(root / "eval" / "eval-000000.tar"),
        [_sample(f"eval{i:04d}", kind, data, cls=b"0") for i, (kind, data) in enumerate(encoded)],
    )
    corpus = [
        _sample(f"other{i:04d}", "exact", COPIES["exact"](img))
        for i, img in enumerate(mosaics(OTHERS, 2, OTHER_SCANS))
    ]
    for kind, make in COPIES.items():
        for i in range(TWINS, TWINS + PLANTED):
            corpus.append(_sample(f"copy_{kind}_{i:04d}", kind, make(evals[i])))
    corpus.sort(key=lambda s: s["__key__"][::-1])
    for part in range(4):
        write_shard(str(root / "corpus" / f"c-{part:06d}.tar"), corpus[part::4])
    label(
        LabelArgs(
            teacher=str(trained_teacher),
            input=str(root / "corpus"),
            output=str(root / "labels"),
            embed=True,
        ),
        [],
    )
    manifest = run(
        FilterArgs(
            input=str(root / "labels"),
            output=str(root / "train"),
            threshold=0.0,
            per_class=150,
            dedup_against=str(root / "eval"),
        ),
        [],
    )
    return root, manifest


def test_planted_copies_of_evaluation_images_are_dropped(planted: tuple[Path, dict]):
    """With this fixture's teacher trained on five other seeds or recipes: every copy found
    (the hardest, a 1-px crop, 0.09 or more above the threshold in cosine) and 0.1% to 0.3%
    of distinct images dropped, against bounds of 95% and 1%."""
    root, manifest = planted
    errors = [
        json.loads(line) for line in (root / "train" / "errors.jsonl").read_text().splitlines()
    ]
    dropped = {e["key"]: e for e in errors if e["reason"].startswith("eval_duplicate")}
    for kind in COPIES:
        assert sum(k.startswith(f"copy_{kind}_") for k in dropped) >= 0.95 * PLANTED, kind
    assert sum(k.startswith("other") for k in dropped) <= 0.01 * OTHERS
    assert 0 < manifest["dedup_threshold"] < 1
    exact = [e for k, e in dropped.items() if k.startswith("copy_exact_")]
    assert all(e["reason"] == "eval_duplicate_exact" for e in exact) and len(exact) == PLANTED
    assert all(e["detail"] == "matches eval" + e["key"][-4:] for e in exact)


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _index(vectors: np.ndarray) -> faiss.IndexFlatIP:
    index = faiss.IndexFlatIP(vectors.shape[1])
    index.add(vectors)
    return index


def test_calibrated_threshold_drops_about_fpr_of_distinct_images():
    """Fresh distinct images from the evaluation set's own law cross the calibrated
    threshold at about the requested rate."""
    rng = np.random.default_rng(0)
    evals = _unit(rng.standard_normal((2000, 32)))
    threshold = calibrated_threshold(_index(evals), fpr=0.05)
    queries = _unit(rng.standard_normal((4000, 32)))
    sims, _ = _index(evals).search(queries, 1)
    assert 0.03 <= (sims[:, 0] >= threshold).mean() <= 0.07


def test_near_twins_inside_the_evaluation_set_leave_the_threshold_alone():
    """Twin pairs (cosine about 0.97) among 1% of the images would be the top of the
    nearest-other-image law; set aside, the threshold stays where the distinct images put
    it, under the similarity of a copy."""
    rng = np.random.default_rng(1)
    evals = _unit(rng.standard_normal((2000, 32)))
    clean = calibrated_threshold(_index(evals), fpr=0.005)
    twinned = evals.copy()
    twinned[-10:] = _unit(evals[:10] + 0.25 * _unit(rng.standard_normal((10, 32))))
    assert (twinned[-10:] * evals[:10]).sum(axis=1).min() > 0.96
    assert abs(calibrated_threshold(_index(twinned), fpr=0.005) - clean) < 0.02
    assert clean < 0.9

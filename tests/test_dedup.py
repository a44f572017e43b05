"""Copies of evaluation images planted in the unlabeled corpus are found and dropped."""

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_digits

from data.digits import digit_png
from data.write import write_shard
from pipeline.filter import FilterArgs, run
from pipeline.label import LabelArgs
from pipeline.label import run as label


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _jpeg(img: Image.Image, quality: int) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _mosaics(count: int, seed: int) -> list[Image.Image]:
    """Distinct images: each a 2x2 mosaic of four real handwritten digits."""
    digits = load_digits().images
    rng = np.random.default_rng(seed)
    tiles = [Image.open(io.BytesIO(digit_png(d))).convert("RGB") for d in digits]
    mosaics = []
    for _ in range(count):
        canvas = Image.new("RGB", (64, 64))
        for j, i in enumerate(rng.choice(len(tiles), 4, replace=False)):
            canvas.paste(tiles[i], ((j % 2) * 32, (j // 2) * 32))
        mosaics.append(canvas)
    return mosaics


COPIES = {
    "exact": lambda img: ("png", _png(img)),
    "recompressed": lambda img: ("jpg", _jpeg(img, 70)),
    "resized": lambda img: ("png", _png(img.resize((48, 48), Image.Resampling.BILINEAR))),
    "cropped": lambda img: ("png", _png(img.crop((1, 1, 63, 63)))),
}
EVALS, PLANTED, OTHERS = 300, 40, 1000


@pytest.fixture(scope="module")
def planted(tmp_path_factory: pytest.TempPathFactory, trained_teacher: Path) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("dedup")
    evals = _mosaics(EVALS, seed=1)
    write_shard(
        str(root / "eval" / "eval-000000.tar"),
        [{"__key__": f"eval{i:03d}", "png": _png(img), "cls": b"0"} for i, img in enumerate(evals)],
    )
    corpus = [
        {"__key__": f"other{i:04d}", "png": _png(img)}
        for i, img in enumerate(_mosaics(OTHERS, seed=2))
    ]
    for kind, make in COPIES.items():
        for i, img in enumerate(evals[:PLANTED]):
            ext, data = make(img)
            corpus.append({"__key__": f"copy_{kind}_{i:03d}", ext: data})
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
    assert all(e["detail"] == "matches eval" + e["key"][-3:] for e in exact)


def test_calibrated_threshold_drops_about_fpr_of_distinct_images():
    """Fresh distinct images from the evaluation set's own law cross the calibrated
    threshold at about the requested rate."""
    import faiss

    from pipeline.dedup import calibrated_threshold

    rng = np.random.default_rng(0)
    evals = rng.standard_normal((2000, 32)).astype(np.float32)
    evals /= np.linalg.norm(evals, axis=1, keepdims=True)
    index = faiss.IndexFlatIP(32)
    index.add(evals)
    threshold = calibrated_threshold(index, fpr=0.05)
    queries = rng.standard_normal((4000, 32)).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    sims, _ = index.search(queries, 1)
    assert 0.03 <= (sims[:, 0] >= threshold).mean() <= 0.07

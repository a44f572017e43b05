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
}
# Slightly cropped copies are not in this test: a 32-px teacher trained on 200 digits is not
# crop-invariant enough for its embedding to find them (see the filter's issue note).


@pytest.fixture(scope="module")
def planted(tmp_path_factory: pytest.TempPathFactory, trained_teacher: Path) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("dedup")
    evals = _mosaics(40, seed=1)
    write_shard(
        str(root / "eval" / "eval-000000.tar"),
        [{"__key__": f"eval{i:03d}", "png": _png(img), "cls": b"0"} for i, img in enumerate(evals)],
    )
    corpus = [
        {"__key__": f"other{i:04d}", "png": _png(img)}
        for i, img in enumerate(_mosaics(600, seed=2))
    ]
    for kind, make in COPIES.items():
        for i, img in enumerate(evals):
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
            per_class=10_000,
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
        assert sum(k.startswith(f"copy_{kind}_") for k in dropped) >= 0.95 * 40, kind
    assert sum(k.startswith("other") for k in dropped) <= 0.01 * 600
    exact = [e for k, e in dropped.items() if k.startswith("copy_exact_")]
    assert all(e["reason"] == "eval_duplicate_exact" for e in exact) and len(exact) == 40
    assert all(e["detail"] == "matches eval" + e["key"][-3:] for e in exact)

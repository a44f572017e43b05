"""The embedded corpus: scikit-learn's 1,797 real handwritten digits, written as shards.

The digits ship inside scikit-learn, so the demo and the tests need no download. Each
8x8 scan is upscaled to a real PNG so every stage decodes real image files.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from rs_pseudolabel.data.classes import write_class_names
from rs_pseudolabel.data.errors import UsageError
from rs_pseudolabel.data.records import labeled_sample
from rs_pseudolabel.data.storage import join
from rs_pseudolabel.data.write import ShardSequence

VAL_SIZE = 297
IMAGE_SIZE = 32
CLASS_NAMES = [str(d) for d in range(10)]


def digit_png(pixels: np.ndarray, size: int = IMAGE_SIZE) -> bytes:
    """An 8x8 scan (values 0..16) as a grayscale PNG of size x size, dark digit on white."""
    gray = (255 - pixels.reshape(8, 8) * (255 / 16)).round().astype(np.uint8)
    img = Image.fromarray(gray, "L").resize((size, size), Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def split_digits(labeled: int, seed: int) -> dict[str, np.ndarray]:
    """Indices of the val, labeled and unlabeled splits, stratified by class.

    The validation split depends on the seed alone, so changing `labeled` never moves an
    image into or out of it.
    """
    targets = load_digits().target
    rest, val = train_test_split(
        np.arange(len(targets)), test_size=VAL_SIZE, stratify=targets, random_state=seed
    )
    if not 10 <= labeled <= len(rest) - 10:
        raise UsageError(f"--labeled must be between 10 and {len(rest) - 10}, got {labeled}")
    unlabeled, lab = train_test_split(
        rest, test_size=labeled, stratify=targets[rest], random_state=seed
    )
    return {"labeled": np.sort(lab), "unlabeled": np.sort(unlabeled), "val": np.sort(val)}


def write_digits(out_dir: str, labeled: int = 200, seed: int = 0, shard_size: int = 256) -> dict:
    """Write OUT/labeled, OUT/unlabeled and OUT/val shards; returns samples per split."""
    return {
        split: write_split(join(out_dir, split), split, indices, split != "unlabeled", shard_size)
        for split, indices in split_digits(labeled, seed).items()
    }


def write_split(
    directory: str, name: str, indices: np.ndarray, with_classes: bool, shard_size: int
) -> int:
    """The digits at `indices` as shards NAME-*.tar in `directory` with classes.json (each
    sample's class only `with_classes`: an unlabeled split hides it); returns their count."""
    digits = load_digits()
    with ShardSequence(directory, name, shard_size) as shards:
        for i in np.sort(indices):
            cls = int(digits.target[i]) if with_classes else None
            shards.write(labeled_sample(f"digit{i:04d}", "png", digit_png(digits.images[i]), cls))
    write_class_names(directory, CLASS_NAMES)
    return len(indices)

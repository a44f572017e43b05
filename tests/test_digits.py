import json
import subprocess
import sys
from pathlib import Path

from rs_pseudolabel.data.decode import decode_image, find_image
from rs_pseudolabel.data.read import iter_samples
from rs_pseudolabel.data.records import read_cls
from rs_pseudolabel.data.specs import expand_shards


def _split(root: Path, name: str) -> list[dict]:
    drops: list = []
    samples = list(iter_samples(expand_shards(str(root / name)), drops.append))
    assert drops == []
    return samples


def test_digits_writes_all_1797_decodable_images_labels_only_where_due(digits_dir: Path):
    splits = {name: _split(digits_dir, name) for name in ("labeled", "unlabeled", "val")}
    assert {k: len(v) for k, v in splits.items()} == {"labeled": 200, "unlabeled": 1300, "val": 297}
    keys = [s["__key__"] for v in splits.values() for s in v]
    assert len(set(keys)) == 1797
    for name, samples in splits.items():
        for sample in samples:
            img, reason = decode_image(find_image(sample)[1])
            assert reason is None and img.size == (32, 32)
            has_label = read_cls(sample) is not None
            assert has_label == (name != "unlabeled")
    labels = [read_cls(s) for s in splits["labeled"]]
    assert set(labels) == set(range(10))
    assert json.loads((digits_dir / "val" / "classes.json").read_text()) == [
        str(i) for i in range(10)
    ]


def test_validation_split_is_fixed_by_the_seed_alone(tmp_path: Path, digits_dir: Path):
    cmd = [
        sys.executable,
        "-m",
        "rs_pseudolabel.pipeline",
        "data",
        "digits",
        "--out",
        str(tmp_path),
        "--labeled",
        "1000",
    ]
    subprocess.run(cmd, check=True, capture_output=True)
    val_keys = [s["__key__"] for s in _split(tmp_path, "val")]
    assert val_keys == [s["__key__"] for s in _split(digits_dir, "val")]
    assert len(_split(tmp_path, "labeled")) == 1000

"""`pipeline data ingest` on the layouts users bring: ImageFolder, img2dataset, ImageNet shards."""

import json
from pathlib import Path

from bench.fixtures import write_shard
from rs_pseudolabel.data.ingest import ingest
from rs_pseudolabel.data.read import iter_samples
from rs_pseudolabel.data.records import read_cls
from rs_pseudolabel.data.specs import expand_shards
from tests.conftest import image_bytes


def _read_out(out: Path) -> list[dict]:
    return list(iter_samples(expand_shards(str(out)), lambda d: None))


def test_imagefolder_gets_class_ids_by_sorted_folder_name(tmp_path: Path):
    src = tmp_path / "train"
    for cls in ("n02", "n01"):
        (src / cls).mkdir(parents=True)
        for i in range(3):
            (src / cls / f"{cls}_{i}.JPEG").write_bytes(image_bytes(size=(20 + i, 20), fmt="JPEG"))
    (src / "n01" / "broken.jpg").write_bytes(b"not an image")
    out = tmp_path / "out"
    result = ingest(str(src), str(out), shard_size=4)
    samples = _read_out(out)
    assert result.source_kind == "imagefolder"
    assert json.loads((out / "classes.json").read_text()) == ["n01", "n02"]
    assert len(samples) == 6 and len(expand_shards(str(out))) == 2
    by_key = {s["__key__"]: read_cls(s) for s in samples}
    assert by_key["n01_n01_0"] == 0 and by_key["n02_n02_2"] == 1
    first_shard = [read_cls(s) for s in iter_samples(expand_shards(str(out))[:1], lambda d: None)]
    assert first_shard != sorted(first_shard), "classes are spread over the shards"
    assert [(d.key, d.reason) for d in result.drops] == [("n01_broken", "undecodable_image")]


def test_flat_folder_is_ingested_unlabeled(tmp_path: Path):
    for i in range(5):
        (tmp_path / f"img.{i}.png").write_bytes(image_bytes(size=(10, 10 + i)))
    result = ingest(str(tmp_path), str(tmp_path / "out"))
    samples = _read_out(tmp_path / "out")
    assert result.source_kind == "folder" and len(samples) == 5
    assert all("cls" not in s and "png" in s for s in samples)
    assert len({s["__key__"] for s in samples}) == 5


def test_img2dataset_shards_are_read_as_they_are(tmp_path: Path):
    shard = tmp_path / "src" / "00000.tar"
    samples = [
        {
            "__key__": f"{i:09d}",
            "jpg": image_bytes(size=(30, 30 + i), fmt="JPEG"),
            "json": json.dumps({"url": f"http://x/{i}.jpg", "status": "success"}).encode(),
            "txt": b"a caption",
        }
        for i in range(7)
    ]
    samples.append({"__key__": "000000099", "json": b"{}", "txt": b"failed download"})
    write_shard(str(shard), samples)
    result = ingest(str(shard), str(tmp_path / "out"), shard_size=3)
    out = _read_out(tmp_path / "out")
    assert [s["__key__"] for s in out] == [f"{i:09d}" for i in range(7)]
    assert out[2]["jpg"] == samples[2]["jpg"] and out[2]["txt"] == b"a caption"
    assert [(d.key, d.reason) for d in result.drops] == [("000000099", "no_image")]
    assert result.samples_in == 8 and result.samples_out == 7


def test_imagenet_cls_shards_keep_keys_and_classes(tmp_path: Path):
    for part in range(2):
        write_shard(
            str(tmp_path / "src" / f"imagenet-train-{part:06d}.tar"),
            [
                {
                    "__key__": f"n0144076{part}_{i}",
                    "jpeg": image_bytes(size=(16, 16 + i), fmt="JPEG"),
                    "cls": str(i * 100).encode(),
                }
                for i in range(4)
            ]
            + [{"__key__": f"bad{part}", "jpeg": image_bytes(fmt="JPEG"), "cls": b"dog"}],
        )
    result = ingest(
        str(tmp_path / "src" / "imagenet-train-{000000..000001}.tar"), str(tmp_path / "out")
    )
    out = _read_out(tmp_path / "out")
    assert [(s["__key__"], read_cls(s)) for s in out][:2] == [
        ("n01440760_0", 0),
        ("n01440760_1", 100),
    ]
    assert len(out) == 8
    assert sorted(d.reason for d in result.drops) == ["bad_class", "bad_class"]

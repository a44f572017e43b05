"""`pipeline stats --samples`: a sheet of the images behind the pseudo-labels, per class and
confidence band, and for filter output per fate; checked tile by tile against the shards."""

import io
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps
from sklearn.datasets import load_digits

from bench.fixtures import write_shard
from rs_pseudolabel.data.decode import decode_image, find_image
from rs_pseudolabel.data.manifest import StageOutput
from rs_pseudolabel.data.read import iter_shard
from rs_pseudolabel.data.records import (
    PseudoLabel,
    content_hash,
    pseudo_sample,
    read_pseudo_shard,
    shard_header,
)
from rs_pseudolabel.data.specs import expand_shards
from rs_pseudolabel.pipeline.filter import FilterArgs
from rs_pseudolabel.pipeline.filter import run as filter_run
from rs_pseudolabel.pipeline.samples_sheet import (
    BACKGROUND,
    BANDS,
    KEPT,
    MAX_CLASSES,
    PAD,
    PER_CELL,
    TILE,
    Sheet,
    collect,
)
from tests.conftest import run_cli


def _confidence(index: int) -> float:
    """A spread of confidences over (0.05, 0.95), fixed by the sample."""
    return 0.05 + 0.9 * (index * 7919 % 1000) / 1000


def _write_labels(source: Path, out: Path) -> Path:
    """`pipeline label`'s output for the unlabeled digits in `source`, from a teacher that
    knows the digits and whose confidence is spread over every band (so every cell can be
    checked): one sidecar per source shard, in its order, each naming its source in its
    header."""
    targets = load_digits().target
    urls = expand_shards(str(source))
    for url in urls:
        records = [shard_header(teacher="truth", source=url, topk=2, embed=False)]
        for sample in iter_shard(url, print):
            index = int(sample["__key__"].removeprefix("digit"))
            cls, confidence = int(targets[index]), _confidence(index)
            label = PseudoLabel(
                key=sample["__key__"],
                indices=np.array([cls, (cls + 1) % 10]),
                probs=np.array([confidence, 1 - confidence], np.float16),
                confidence=confidence,
                entropy=0.5,
                content_hash=content_hash(sample["png"]),
            )
            records.append(pseudo_sample(label))
        write_shard(str(out / url.rsplit("/", 1)[1]), records)
    n = sum(len(list(iter_shard(url, print))) for url in urls)
    stage = StageOutput(str(out), "label", {"teacher": "truth", "embed": False})
    stage.finish(n, n, Counter(), Counter(), {}, teacher="truth", shards=len(urls))
    return out


@pytest.fixture(scope="module")
def labels(digits_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _write_labels(digits_dir / "unlabeled", tmp_path_factory.mktemp("labels"))


def _pseudo_labels(folder: Path) -> list:
    return [
        label
        for url in expand_shards(str(folder))
        for label in read_pseudo_shard(url, lambda drop: None)
    ]


def _tiles_drawn(png: Path, sheet: Sheet) -> int:
    """Grid cells of the PNG that hold an image (anything but background)."""
    with Image.open(png) as image:
        assert image.size == sheet.size
        drawn = 0
        for r in range(len(sheet.rows)):
            for g in range(len(sheet.groups)):
                for slot in range(PER_CELL):
                    cell = image.crop(sheet.tile_box(r, g, slot)).convert("RGB")
                    drawn += cell.getcolors(TILE * TILE) != [(TILE * TILE, BACKGROUND)]
    return drawn


def _expected_tiles(cells: Counter, rows: list[int]) -> int:
    return sum(min(n, PER_CELL) for (cls, _), n in cells.items() if cls in rows)


def _band(confidence: float) -> int:
    return max(i for i, edge in enumerate(BANDS) if edge <= confidence)


def test_label_output_sheet_shows_each_class_by_confidence_band(labels: Path, tmp_path: Path):
    png = tmp_path / "samples.png"
    result = run_cli("stats", str(labels), "--samples", str(png), check=True)
    sheet = collect(str(labels))
    pseudo = _pseudo_labels(labels)
    per_class = Counter(p.top1 for p in pseudo)
    assert sheet.rows == sorted(per_class, key=lambda c: (-per_class[c], c))[:MAX_CLASSES]
    assert len(sheet.groups) == len(BANDS)
    cells = Counter((p.top1, _band(p.confidence)) for p in pseudo)
    tiles = _tiles_drawn(png, sheet)
    assert tiles == _expected_tiles(cells, sheet.rows) > len(sheet.rows)
    assert f"{tiles} sample images" in result.stdout

    # The tile is the image of the sample drawn, read back from the unlabeled shard.
    g, pick = next(
        (g, sheet.cells[sheet.rows[0], group][0])
        for g, group in enumerate(sheet.groups)
        if sheet.cells.get((sheet.rows[0], group))
    )
    (sample,) = [s for s in iter_shard(pick.source, print) if s["__key__"] == pick.key]
    expected = ImageOps.pad(decode_image(find_image(sample)[1])[0], (TILE, TILE), color=PAD)
    with Image.open(png) as image:
        tile = image.crop(sheet.tile_box(0, g, 0)).convert("RGB")
    assert tile.tobytes() == expected.tobytes()
    # Drawn by key, not by chance: the same sheet on every run.
    assert collect(str(labels)).cells == sheet.cells


def test_filter_output_sheet_shows_what_was_kept_and_why_the_rest_was_dropped(
    labels: Path, tmp_path: Path
):
    train = tmp_path / "train"
    filter_run(FilterArgs(input=str(labels), output=str(train), threshold=0.5, per_class=40), [])
    png = tmp_path / "samples.png"
    run_cli("stats", str(train), "--samples", str(png), check=True)

    sheet = collect(str(train))
    dropped = {
        row["key"]: row["reason"]
        for row in map(json.loads, (train / "errors.jsonl").read_text().splitlines())
    }
    cells = Counter((p.top1, dropped.get(p.key, KEPT)) for p in _pseudo_labels(labels))
    fates = Counter(fate for _, fate in cells.elements())
    assert sheet.groups == [KEPT] + [f for f, _ in fates.most_common() if f != KEPT]
    assert {"below_threshold", "balanced_out"} <= set(sheet.groups)
    for (cls, fate), picks in sheet.cells.items():
        assert all(dropped.get(p.key, KEPT) == fate and p.cls == cls for p in picks)
    assert _tiles_drawn(png, sheet) == _expected_tiles(cells, sheet.rows)


def test_images_not_where_labeling_read_them_are_said_and_found_with_source_root(
    digits_dir: Path, tmp_path: Path
):
    """Sources moved: the sheet is refused in one line that says where to point
    --source-root (no empty sheet), and drawn with it; other images under the labeled names
    are never shown as the labeled ones."""
    import shutil

    old, new = tmp_path / "old", tmp_path / "new"
    shutil.copytree(digits_dir / "unlabeled", old)
    labels = _write_labels(old, tmp_path / "labels")
    old.rename(new)
    png = tmp_path / "samples.png"
    refused = run_cli("stats", str(labels), "--samples", str(png))
    assert refused.returncode == 2 and not png.exists()
    assert (
        refused.stderr.strip()
        .splitlines()[-1]
        .startswith("pipeline stats: error: no image of the ")
    )
    assert f"--source-root {old}=WHERE_THEY_ARE_NOW" in refused.stderr
    found = run_cli(
        "stats", str(labels), "--samples", str(png), "--source-root", f"{old}={new}", check=True
    )
    sheet = collect(str(labels))
    assert f"{_tiles_drawn(png, sheet)} sample images" in found.stdout
    assert _tiles_drawn(png, sheet) == len(sheet.picks) > 0 and "warning" not in found.stderr
    # The same names over other images (each digit turned upside down): none is shown.
    for url in expand_shards(str(new)):
        samples = list(iter_shard(url, print))
        for sample in samples:
            image = Image.open(io.BytesIO(sample["png"])).rotate(180)
            buffer = io.BytesIO()
            image.save(buffer, format="PNG")
            sample["png"] = buffer.getvalue()
        write_shard(url, samples)
    other = run_cli("stats", str(labels), "--samples", str(png), "--source-root", f"{old}={new}")
    assert other.returncode == 2
    assert "are other images than labeled (content hash)" in other.stderr
    assert run_cli("stats", str(labels), "--source-root", f"{old}={new}").returncode == 2


def test_an_image_of_any_shape_fits_its_tile(tmp_path: Path):
    """A 2,000 x 1 banner and a 1 x 2,000 pole: scaled to the tile, their thin side kept at
    a pixel (resizing it to zero pixels ended `stats --samples` as an internal error)."""
    shards = tmp_path / "shards"
    shards.mkdir()
    samples = []
    for i, size in enumerate([(2000, 1), (1, 2000), (7, 3)]):
        buffer = io.BytesIO()
        Image.new("RGB", size, (200, 30, 30)).save(buffer, format="PNG")
        samples.append({"__key__": f"s{i}", "png": buffer.getvalue(), "cls": b"0"})
    write_shard(str(shards / "part-000000.tar"), samples)
    png = tmp_path / "samples.png"
    result = run_cli("stats", str(shards), "--samples", str(png), check=True)
    sheet = collect(str(shards))
    assert _tiles_drawn(png, sheet) == 3 and "3 sample images" in result.stdout
    with Image.open(png) as image:
        banner = image.crop(sheet.tile_box(0, 0, [p.key for p in sheet.picks].index("s0")))
        red = [xy for xy in np.ndindex(TILE, TILE) if banner.getpixel(xy)[:3] == (200, 30, 30)]
    assert len(red) == TILE  # one row of the tile: the banner at its width, a pixel high

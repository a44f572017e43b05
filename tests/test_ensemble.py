"""Several teachers and several views: `--teacher A --teacher B [--teacher-weights]` and
`--tta flip` give, per key, the average computed by hand from single-teacher labels."""

import io
from pathlib import Path

import numpy as np
from PIL import Image

from bench.fixtures import write_shard
from rs_pseudolabel.data.read import iter_samples
from rs_pseudolabel.data.records import PSEUDO_EXT, decode_pseudo
from tests.conftest import message_lines, run_cli

FP16 = 2e-3  # relative precision of the float16 the records store probabilities in
CLASSES = 10


def _shards(digits_dir: Path, out: Path) -> tuple[Path, Path]:
    """Forty unlabeled digits, and the same keys mirrored: at the teacher's 32 px, which
    the digits fill, the eval crop of a mirror is the mirror of the crop."""
    shard = sorted((digits_dir / "unlabeled").glob("*.tar"))[0]
    samples = list(iter_samples([str(shard)], lambda d: None))[:40]
    mirrored = []
    for sample in samples:
        image = Image.open(io.BytesIO(sample["png"])).transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        buffer = io.BytesIO()
        image.save(buffer, "PNG")
        mirrored.append({"__key__": sample["__key__"], "png": buffer.getvalue()})
    plain = [{"__key__": s["__key__"], "png": s["png"]} for s in samples]
    write_shard(str(out / "plain" / "d-000000.tar"), plain)
    write_shard(str(out / "mirror" / "d-000000.tar"), mirrored)
    return out / "plain", out / "mirror"


def _label(out: Path, source: Path, *options: str) -> dict[str, np.ndarray]:
    """Each key's whole distribution (top-k holds every class of the ten)."""
    result = run_cli(
        "label", "--input", str(source), "--output", str(out), "--device", "cpu", *options
    )
    assert result.returncode == 0, result.stderr
    probs = {}
    for s in iter_samples([str(p) for p in sorted(out.glob("*.tar"))], lambda d: None):
        if PSEUDO_EXT in s:
            label = decode_pseudo(s["__key__"], s[PSEUDO_EXT])
            row = np.zeros(CLASSES)
            row[label.indices] = label.probs
            probs[s["__key__"]] = row
    return probs


def _close(got: dict, expected: dict) -> None:
    assert set(got) == set(expected) and len(got) == 40
    for key in got:
        assert np.allclose(got[key], expected[key], rtol=2 * FP16, atol=1e-3), key


def test_two_teachers_and_the_mirror_average_as_by_hand(
    digits_dir: Path, trained_teacher: Path, random_teacher: Path, tmp_path: Path
):
    plain, mirror = _shards(digits_dir, tmp_path)
    a, b = ["--teacher", str(trained_teacher)], ["--teacher", str(random_teacher)]
    alone_a = _label(tmp_path / "a", plain, *a)
    alone_b = _label(tmp_path / "b", plain, *b)
    both = _label(tmp_path / "ab", plain, *a, *b, "--teacher-weights", "0.7,0.3")
    _close(both, {k: 0.7 * alone_a[k] + 0.3 * alone_b[k] for k in alone_a})
    mirrored = _label(tmp_path / "a-mirror", mirror, *a)
    flipped = _label(tmp_path / "a-flip", plain, *a, "--tta", "flip")
    _close(flipped, {k: (alone_a[k] + mirrored[k]) / 2 for k in alone_a})
    assert any(np.abs(flipped[k] - alone_a[k]).max() > 0.01 for k in alone_a)
    manifest = (tmp_path / "ab" / "manifest.json").read_text()
    assert "*0.7+" in manifest and "*0.3" in manifest
    assert "|flip" in (tmp_path / "a-flip" / "manifest.json").read_text()


def test_teachers_and_weights_that_do_not_pair_are_one_line(random_teacher: Path, tmp_path: Path):
    cases = {
        ("--teacher", "rs-mini", "--teacher", "rs-tiny", "--weights", "w.pth"): (
            "2 teacher(s) name a model"
        ),
        ("--teacher", str(random_teacher), "--teacher", str(random_teacher),
         "--teacher-weights", "1,2,3"): "must be 2 positive numbers",
    }  # fmt: skip
    for options, said in cases.items():
        result = run_cli(
            "label", *options, "--input", str(tmp_path), "--output", str(tmp_path / "out")
        )
        lines = message_lines(result.stderr)
        assert result.returncode == 2 and len(lines) == 1 and said in lines[0], result.stderr

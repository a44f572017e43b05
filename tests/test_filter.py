"""`pipeline filter` end to end on real label output of the digits."""

import io
import json
import math
import shutil
import tarfile
from collections import Counter
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path

import pytest
from PIL import Image

from bench.fixtures import write_shard
from rs_pseudolabel.data.errors import UsageError
from rs_pseudolabel.data.read import iter_samples
from rs_pseudolabel.data.records import FORMAT_VERSION, decode_pseudo, read_cls, read_pseudo_shard
from rs_pseudolabel.data.specs import expand_shards
from rs_pseudolabel.pipeline.confidence import CLASS_CONFIDENCES, load_histograms
from rs_pseudolabel.pipeline.filter import HISTOGRAMS, SIDECARS_PER_CHUNK, FilterArgs, chunks, run
from rs_pseudolabel.pipeline.label import LabelArgs
from rs_pseudolabel.pipeline.label import run as label
from rs_pseudolabel.pipeline.options import RECORD_FORMAT, fingerprint_keys
from tests.conftest import assert_same_shards, kill_midway, message_lines, run_cli


@pytest.fixture(scope="module")
def labels(
    trained_teacher: Path, digits_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    out = tmp_path_factory.mktemp("labels")
    label(
        LabelArgs(
            teacher=str(trained_teacher),
            input=str(digits_dir / "unlabeled"),
            output=str(out),
            embed=True,
        ),
        [],
    )
    return out


def _filter(labels: Path, out: Path, **kw) -> dict:
    return run(
        FilterArgs(input=str(labels), output=str(out), shard_size=kw.pop("shard_size", 128), **kw),
        [],
    )


def _training_samples(out: Path) -> list[dict]:
    return [
        s
        for s in iter_samples(expand_shards(str(out)), lambda d: None)
        if s["__key__"] != "__shard__"
    ]


def _image(key: str) -> str:
    return key.rsplit("_c", 1)[0]


@pytest.mark.parametrize("per_class", [100, 300])
def test_every_class_ends_near_n_cut_or_duplicated(labels: Path, tmp_path: Path, per_class: int):
    manifest = _filter(labels, tmp_path, threshold=0.0, per_class=per_class)
    samples = _training_samples(tmp_path)
    counts = Counter(read_cls(s) for s in samples)
    assert len(counts) == 10
    for cls, n in counts.items():
        assert abs(n - per_class) <= 4 * math.sqrt(per_class), (cls, n)
    assert manifest["samples_written"] == len(samples)
    assert {int(k): v for k, v in manifest["class_counts"].items()} == dict(counts)
    assert manifest["images_kept"] + manifest["dropped"] == manifest["samples_in"] == 1300
    sizes = [len(list(iter_samples([u], lambda d: None))) for u in expand_shards(str(tmp_path))]
    # Each chunk deals its copies over its own shards to within one; chunks differ by the
    # rounding of their shard count (a few percent at 16 shards a chunk, up to a third on
    # this toy of a few shards a chunk), never past half a shard over the size asked for.
    groups = [[]]
    for size in sorted(sizes):
        if groups[-1] and size - groups[-1][0] > 1:
            groups.append([])
        groups[-1].append(size)
    assert len(groups) <= manifest["chunks"], sizes
    assert max(sizes) <= 1.5 * 128, sizes
    for s in samples:
        label = decode_pseudo(s["__key__"], s["pl"])
        assert (
            label.top1 == read_cls(s) and abs(float(label.probs.astype("float32").sum()) - 1) < 0.05
        )


def test_copies_of_an_image_are_spread_and_never_side_by_side(labels: Path, tmp_path: Path):
    _filter(labels, tmp_path, threshold=0.0, per_class=300, shard_size=64)
    shards_of: dict[str, set] = {}
    for url in expand_shards(str(tmp_path)):
        keys = [s["__key__"] for s in iter_samples([url], lambda d: None)]
        assert all(_image(a) != _image(b) for a, b in zip(keys, keys[1:], strict=False))
        for key in keys:
            shards_of.setdefault(_image(key), set()).add(url)
    copied = [img for img, shards in shards_of.items() if len(shards) > 1]
    assert len(copied) > 0.8 * len(shards_of)


def test_default_threshold_drops_and_counts_what_is_under_it(labels: Path, tmp_path: Path):
    manifest = _filter(labels, tmp_path, threshold=0.98, per_class=100)
    errors = [json.loads(line) for line in (tmp_path / "errors.jsonl").read_text().splitlines()]
    assert (
        manifest["drops"]["below_threshold"]
        == sum(e["reason"] == "below_threshold" for e in errors)
        > 0
    )
    assert all(t >= 0.98 for t in manifest["class_thresholds"].values())
    assert manifest["images_kept"] + manifest["dropped"] == 1300


def test_balance_sample_draws_a_class_quota_from_all_above_the_threshold(
    labels: Path, tmp_path: Path
):
    """`--balance top` raises a class's threshold until --per-class remain; `sample` keeps
    the threshold and draws the quota from every image above it, less confident ones too."""
    top = _filter(labels, tmp_path / "top", threshold=0.3, per_class=40)
    sample = _filter(labels, tmp_path / "sample", threshold=0.3, per_class=40, balance="sample")
    assert set(sample["class_thresholds"].values()) == {0.3}
    raised = {c: t for c, t in top["class_thresholds"].items() if t > 0.3}
    assert len(raised) >= 5, top["class_thresholds"]
    kept: dict[str, list[float]] = {}
    for s in _training_samples(tmp_path / "sample"):
        label = decode_pseudo(s["__key__"], s["pl"])
        kept.setdefault(str(label.top1), []).append(label.confidence)
    assert all(abs(len(kept[c]) - 40) <= 4 * math.sqrt(40) for c in kept), kept
    assert all(min(confs) >= 0.3 for confs in kept.values())
    # Where top raised the threshold, the draw keeps images below the raised one
    assert all(min(kept[c]) < t for c, t in raised.items()), (raised, kept)
    again = run_cli("filter", "--input", str(labels), "--output", str(tmp_path / "again"),
                    "--threshold", "0.3", "--per-class", "40", "--balance", "sample",
                    "--shard-size", "128")  # fmt: skip
    assert again.returncode == 0, again.stderr
    manifest = json.loads((tmp_path / "again" / "manifest.json").read_text())
    assert manifest["class_counts"] == sample["class_counts"]
    assert manifest["fingerprint"]["balance"] == "sample"
    with pytest.raises(UsageError, match="--balance would be ignored"):
        FilterArgs(input="l", output="o", strategy="topk", balance="sample")


def test_topk_strategy_keeps_k_per_class_with_hard_labels(labels: Path, tmp_path: Path):
    _filter(labels, tmp_path, strategy="topk", top_p=2, per_class=50)
    samples = _training_samples(tmp_path)
    counts = Counter(read_cls(s) for s in samples)
    # Ties at the cut are broken by a coin seeded by the key: K in expectation, not exactly.
    assert all(abs(n - 50) <= 4 * math.sqrt(50) for n in counts.values()), counts
    assert abs(sum(counts.values()) - 500) <= 4 * math.sqrt(500)
    assert all(len(decode_pseudo(s["__key__"], s["pl"]).indices) == 1 for s in samples)


def test_the_manifests_record_the_declared_options(labels: Path, uninterrupted: Path):
    """The manifests' `args` and fingerprints hold the options the dataclasses declare, and
    only those (besides the stage and the record format it wrote): no option is recorded by
    hand."""
    for cls, folder in ((LabelArgs, labels), (FilterArgs, uninterrupted)):
        manifest = json.loads((folder / "manifest.json").read_text())
        assert set(manifest["args"]) == {f.name for f in fields(cls)} | {"beam_args"}
        assert set(manifest["fingerprint"]) == {
            "stage",
            RECORD_FORMAT,
            *fingerprint_keys(cls).values(),
        }
        assert manifest["fingerprint"][RECORD_FORMAT] == FORMAT_VERSION


RERUN_ARGS = ["filter", "--threshold", "0", "--per-class", "200", "--shard-size", "50"]


@pytest.fixture(scope="module")
def uninterrupted(labels: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One filter run from the command line, and a rerun that must equal it byte for byte."""
    out = tmp_path_factory.mktemp("uninterrupted")
    for run_dir in ("a", "b"):
        run_cli(*RERUN_ARGS, "--input", str(labels), "--output", str(out / run_dir), check=True)
    assert len(assert_same_shards(out / "a", out / "b")) >= 30
    return out / "a"


@pytest.fixture(scope="module")
def labels_without_counts(labels: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same label output without the confidence counts the label stage left: the filter
    must count them itself, in pass 1."""
    copy = tmp_path_factory.mktemp("labels-copy") / "labels"
    shutil.copytree(labels, copy)
    (copy / CLASS_CONFIDENCES).unlink()
    return copy


def test_counts_from_the_label_stage_equal_pass_one(
    labels: Path, labels_without_counts: Path, uninterrupted: Path, tmp_path: Path
):
    args = [*RERUN_ARGS, "--input", str(labels_without_counts), "--output", str(tmp_path)]
    run_cli(*args, check=True)
    counted = load_histograms(str(tmp_path / "_work" / HISTOGRAMS))
    by_label = load_histograms(str(labels / CLASS_CONFIDENCES))
    assert counted.keys() == by_label.keys() and len(counted) == 10
    assert all((counted[c] == by_label[c]).all() for c in counted)
    assert sum(int(h.sum()) for h in counted.values()) == 1300
    manifests = [json.loads((d / "manifest.json").read_text()) for d in (uninterrupted, tmp_path)]
    assert [m["confidences_counted_by"] for m in manifests] == ["label", "pass 1"]
    assert not (uninterrupted / "_work" / HISTOGRAMS).exists()
    assert_same_shards(uninterrupted, tmp_path)


@pytest.mark.parametrize("kill_in", [f"_work/{HISTOGRAMS}", "train-*.tar"])
def test_rerun_is_byte_identical_and_sigkill_then_rerun_matches(
    labels_without_counts: Path, uninterrupted: Path, tmp_path: Path, kill_in: str
):
    args = [*RERUN_ARGS, "--input", str(labels_without_counts), "--output", str(tmp_path)]
    kill_midway(args, lambda: any(tmp_path.glob(kill_in)))
    assert json.loads((tmp_path / "manifest.json").read_text())["state"] == "running"
    run_cli(*args, check=True)
    assert_same_shards(uninterrupted, tmp_path)


def test_a_chunk_reads_a_bounded_number_of_sidecars_however_little_is_kept():
    sidecars = [f"labels/part-{i:06d}.tar" for i in range(1000)]
    for expected in (0, 500, 10_000_000):
        work = chunks(sidecars, expected, shard_size=1000, workers=2)
        dealt = [url for _, urls in work for url in urls]
        assert sorted(dealt) == sidecars  # each sidecar in exactly one chunk
        assert max(len(urls) for _, urls in work) <= SIDECARS_PER_CHUNK
        assert len(work) >= 2


def test_keep_selection_keeps_the_images_and_copies_with_the_new_teachers_labels(
    labels: Path, random_teacher: Path, digits_dir: Path, tmp_path: Path
):
    # Round 1 selects; round 2's teacher relabels the whole corpus and keeps that selection.
    first = tmp_path / "round1-train"
    chosen = _filter(labels, first, threshold=0.5, per_class=100, shard_size=64)
    relabeled = tmp_path / "round2-labels"
    label(
        LabelArgs(
            teacher=str(random_teacher), input=str(digits_dir / "unlabeled"), output=str(relabeled)
        ),
        [],
    )
    second = tmp_path / "round2-train"
    # Nothing chooses or balances: an option that would is refused, not ignored.
    with pytest.raises(UsageError, match="--threshold would be ignored .--keep-selection keeps"):
        _filter(relabeled, second, threshold=0.99, keep_selection=str(first))
    assert not second.exists()
    kept = _filter(relabeled, second, keep_selection=str(first))

    old, new = _training_samples(first), _training_samples(second)
    assert Counter(_image(s["__key__"]) for s in new) == Counter(_image(s["__key__"]) for s in old)
    assert {_image(s["__key__"]): s["png"] for s in new} == {
        _image(s["__key__"]): s["png"] for s in old
    }
    new_labels = {
        lab.key: lab
        for url in expand_shards(str(relabeled))
        for lab in read_pseudo_shard(url, lambda d: None)
    }
    for s in new:
        target = decode_pseudo(s["__key__"], s["pl"])
        teacher = new_labels[_image(s["__key__"])]
        assert target.indices.tolist() == teacher.indices.tolist()
        assert read_cls(s) == teacher.top1
    assert kept["samples_written"] == chosen["samples_written"] == len(new)
    assert kept["images_kept"] == chosen["images_kept"]
    assert kept["drops"] == {"not_selected": 1300 - chosen["images_kept"]}
    assert kept["samples_in"] == 1300
    # One-hot labels too (a hard threshold rule, the topk rule) are the new teacher's top-1.
    for options in ({"hard": True}, {"strategy": "topk"}):
        out = tmp_path / f"round2-{next(iter(options))}"
        _filter(relabeled, out, keep_selection=str(first), **options)
        for s in _training_samples(out):
            target = decode_pseudo(s["__key__"], s["pl"])
            top1 = new_labels[_image(s["__key__"])].top1
            assert read_cls(s) == top1 and target.indices.tolist() == [top1], options

    # Labels of other images cannot keep it: refused, nothing written.
    with pytest.raises(UsageError, match="keep-selection"):
        _filter(labels, tmp_path / "other", keep_selection=str(tmp_path / "round2-labels"))
    val_labels = tmp_path / "val-labels"
    label(
        LabelArgs(
            teacher=str(random_teacher), input=str(digits_dir / "val"), output=str(val_labels)
        ),
        [],
    )
    with pytest.raises(UsageError, match="keep-selection"):
        _filter(val_labels, tmp_path / "other", keep_selection=str(first))


def test_plain_webdataset_reads_every_training_sample_with_its_image_and_class(
    labels: Path, tmp_path: Path
):
    import webdataset as wds

    manifest = _filter(labels, tmp_path, threshold=0.0, per_class=100)
    urls = expand_shards(str(tmp_path))
    reader = wds.WebDataset(urls, shardshuffle=False).decode("pil").to_tuple("jpg;png;webp", "cls")
    pairs = list(reader)
    assert len(pairs) == manifest["samples_written"] > 900
    assert all(image.size[0] > 0 and 0 <= cls < 10 for image, cls in pairs)


def _rewrite_members(shard: Path, change: dict[str, Callable[[bytes], bytes]]) -> None:
    """Rewrite `shard` with the members named in `change` passed through their function."""
    members = []
    with tarfile.open(shard) as tar:
        for info in tar.getmembers():
            data = tar.extractfile(info).read()
            members.append((info, change[info.name](data) if info.name in change else data))
    with tarfile.open(shard, "w") as tar:
        for info, data in members:
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_a_damaged_pseudo_label_record_is_a_counted_drop_naming_its_shard_and_key(
    labels: Path, tmp_path: Path
):
    copy = tmp_path / "labels"
    shutil.copytree(labels, copy)
    sidecar = sorted(copy.glob("*.tar"))[0]
    with tarfile.open(sidecar) as tar:
        records = [m.name for m in tar.getmembers() if m.name.endswith(".pl")]
    cut, wrong = records[3], records[7]
    _rewrite_members(sidecar, {cut: lambda b: b[:3], wrong: lambda b: b"\x07" + b[1:]})
    out = tmp_path / "out"
    result = run_cli(*RERUN_ARGS, "--input", str(copy), "--output", str(out))
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["drops"]["bad_record"] == 2
    assert manifest["images_kept"] + manifest["dropped"] == manifest["samples_in"] == 1300
    errors = [json.loads(line) for line in (out / "errors.jsonl").read_text().splitlines()]
    bad = [e for e in errors if e["reason"] == "bad_record"]
    assert sorted(e["key"] for e in bad) == sorted(n.rsplit(".", 1)[0] for n in (cut, wrong))
    assert all(e["shard"].endswith(sidecar.name) for e in bad)


@pytest.mark.parametrize("against", ["label-folder", "shards-without-images"])
def test_dedup_against_shards_without_images_is_refused_in_one_line(
    labels: Path, tmp_path: Path, against: str
):
    target = labels
    if against == "shards-without-images":  # sidecars copied out of their label folder
        target = tmp_path / "sidecars"
        target.mkdir()
        for shard in sorted(labels.glob("*.tar"))[:2]:
            shutil.copy(shard, target / shard.name)
    out = tmp_path / "out"
    result = run_cli(
        "filter", "--input", str(labels), "--output", str(out), "--dedup-against", str(target)
    )
    assert result.returncode == 2, result.stderr
    lines = message_lines(result.stderr)
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert "no images" in lines[-1] and str(target) in lines[-1], lines
    assert not list(out.glob("*.tar"))


def test_two_sources_with_the_same_keys_give_shards_with_unique_keys(
    trained_teacher: Path, digits_dir: Path, tmp_path: Path
):
    shard = sorted((digits_dir / "unlabeled").glob("*.tar"))[0]
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        shutil.copy(shard, tmp_path / folder / shard.name)
    spec = str(tmp_path / "{a,b}" / shard.name)
    run_cli("label", "--teacher", str(trained_teacher), "--input", spec,
            "--output", str(tmp_path / "labels"), check=True)  # fmt: skip
    out = tmp_path / "train"
    run_cli(*RERUN_ARGS, "--input", str(tmp_path / "labels"), "--output", str(out), check=True)
    manifest = json.loads((out / "manifest.json").read_text())
    keys_in = 0
    for url in expand_shards(str(out)):
        with tarfile.open(url) as tar:
            names = [m.name for m in tar.getmembers()]
        keys = [name.split(".", 1)[0] for name in names]
        per_key = Counter(keys)
        assert all(n == per_key[keys[0]] for n in per_key.values()), per_key  # same members
        assert len(names) == len(set(names)), url
        keys_in += len(per_key)
    assert keys_in == manifest["samples_written"]
    assert manifest["images_kept"] == 2 * len(list(iter_samples([str(shard)], lambda d: None)))


def _mirrored(png: bytes) -> bytes:
    out = io.BytesIO()
    Image.open(io.BytesIO(png)).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(out, "PNG")
    return out.getvalue()


def test_moved_sources_fail_in_one_line_then_filter_from_their_new_place(
    random_teacher: Path, digits_dir: Path, tmp_path: Path
):
    src = tmp_path / "src"
    shutil.copytree(digits_dir / "unlabeled", src)
    labels_dir = tmp_path / "labels"
    run_cli("label", "--teacher", str(random_teacher), "--input", str(src),
            "--output", str(labels_dir), check=True)  # fmt: skip
    before = tmp_path / "before"
    run_cli(*RERUN_ARGS, "--input", str(labels_dir), "--output", str(before), check=True)
    moved = tmp_path / "moved"
    src.rename(moved)
    out = tmp_path / "after"
    args = [*RERUN_ARGS, "--input", str(labels_dir), "--output", str(out)]
    failed = run_cli(*args)
    assert failed.returncode == 2, failed.stderr
    lines = message_lines(failed.stderr)
    assert len(lines) == 1 and f"--source-root {src}=" in lines[0], lines
    assert not out.exists()  # refused before any chunk finished: nothing left to block a rerun
    # Other images under the same shard names, or an OLD that labeling never read from: one
    # line each, never a selection of nothing with exit 0.
    other = tmp_path / "other"  # the same shard names and keys, each image mirrored
    for shard in sorted(moved.glob("*.tar")):
        write_shard(
            str(other / shard.name),
            [
                {"__key__": s["__key__"], "png": _mirrored(s["png"])}
                for s in iter_samples([str(shard)], lambda d: None)
            ],
        )
    for root, said in (
        (f"{src}={other}", "other images than those labeled"),
        (f"{tmp_path / 'elsewhere'}={moved}", "the labels were read from"),
    ):
        failed = run_cli(*args, "--source-root", root)
        lines = message_lines(failed.stderr)
        assert failed.returncode == 2 and len(lines) == 1 and said in lines[0], failed.stderr
    run_cli(*args, "--source-root", f"{src}={moved}", check=True)
    assert assert_same_shards(before, out)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["samples_in"] == 1300 and "missing_source" not in manifest["drops"]


@pytest.mark.parametrize("recorded", ["spec", 3], ids=["spec-alone", "junk"])
def test_a_label_manifest_that_records_its_input_otherwise_is_filtered_the_same(
    labels: Path, tmp_path: Path, recorded: object
):
    """A manifest written by something other than the label stage (a user's tool, the
    filter benchmark) may record the input as its spec alone, or as nothing usable: the
    check of --source-root against it is skipped, not an internal error."""
    copy = tmp_path / "labels"
    shutil.copytree(labels, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    spec = manifest["fingerprint"]["input"]["spec"]
    manifest["fingerprint"]["input"] = spec if recorded == "spec" else recorded
    (copy / "manifest.json").write_text(json.dumps(manifest))
    base = ["filter", "--threshold", "0.1", "--per-class", "50"]
    run_cli(*base, "--input", str(labels), "--output", str(tmp_path / "a"), check=True)
    root = ["--source-root", f"{spec}={spec}"]
    run_cli(*base, "--input", str(copy), "--output", str(tmp_path / "b"), *root, check=True)
    assert assert_same_shards(tmp_path / "a", tmp_path / "b")


def test_classes_that_keep_no_image_are_named(labels: Path, tmp_path: Path):
    """classes.json names a class no pseudo-label has as its top-1 (here an eleventh one):
    the filter's summary and manifest say so, rather than the student's accuracy later."""
    copy = tmp_path / "labels"
    shutil.copytree(labels, copy)
    names = json.loads((copy / "classes.json").read_text()) + ["ghost"]
    (copy / "classes.json").write_text(json.dumps(names))
    out = tmp_path / "train"
    result = run_cli("filter", "--input", str(copy), "--output", str(out), "--per-class", "20")
    assert result.returncode == 0, result.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["empty_classes"] == ["10 (ghost)"]
    assert "1 class kept no image: 10 (ghost)" in result.stdout


def test_an_input_that_is_not_a_finished_label_output_is_said_for_what_it_is(tmp_path: Path):
    """The reason given is the true one: a folder that is not there, one without a manifest,
    another stage's output (it said "no manifest.json" of a filter output), and a manifest
    edited by hand (a null fingerprint was an internal error)."""
    other = tmp_path / "train"
    other.mkdir()
    (other / "manifest.json").write_text(
        json.dumps({"stage": "filter", "state": "done", "fingerprint": {}})
    )
    edited = tmp_path / "edited"
    edited.mkdir()
    (edited / "manifest.json").write_text(
        json.dumps({"stage": "label", "state": "done", "fingerprint": None})
    )
    (tmp_path / "bare").mkdir()
    wanted = "pass the output folder of `pipeline label`"
    for folder, said in [
        ("nope", f"{tmp_path / 'nope'} does not exist: {wanted}"),
        ("bare", f"{tmp_path / 'bare'} holds no manifest.json: {wanted}"),
        ("train", f"{other} holds the output of `pipeline filter`: {wanted}"),
        ("edited", f"{edited / 'manifest.json'} was edited or damaged (not the record a stage "),
    ]:
        result = run_cli("filter", "--input", str(tmp_path / folder), "--output",
                         str(tmp_path / f"out-{folder}"))  # fmt: skip
        lines = message_lines(result.stderr)
        assert result.returncode == 2 and len(lines) == 1, result.stderr[-2000:]
        assert lines[0].startswith(f"pipeline filter: error: {said}"), lines[0]

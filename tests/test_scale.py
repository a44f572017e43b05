"""What grows with the corpus, measured: the launcher's requests to a bucket, the objects the
filter writes, and stats answered from the stages' own records instead of a rescan.
(The figures at 20,000 to 80,000 shards, and memory, are in bench/bench_scale.py.)"""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.fixtures import SPEC_KEYS, write_shard
from rs_pseudolabel.data.storage import walk_files
from rs_pseudolabel.pipeline import worklist
from rs_pseudolabel.pipeline.filter import FilterArgs
from rs_pseudolabel.pipeline.filter import run as filter_run
from rs_pseudolabel.pipeline.label import LabelArgs
from rs_pseudolabel.pipeline.label import run as label_run
from rs_pseudolabel.pipeline.stats import collect
from rs_pseudolabel.pipeline.worklist import WorkList, units
from tests.conftest import image_bytes, run_cli

SHARDS = 200


@pytest.fixture(scope="module")
def many_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SHARDS tiny shards of 2 distinct images each: a big corpus, as a launcher sees it."""
    out = tmp_path_factory.mktemp("many")
    for k in range(SHARDS):
        write_shard(
            str(out / f"part-{k:06d}.tar"),
            [
                {
                    "__key__": f"s{k}i{i}",
                    "png": image_bytes(size=(8 + k % 16, 8 + 2 * (k // 16) + i)),
                }
                for i in range(2)
            ],
        )
    return out


def test_a_finished_rerun_costs_a_handful_of_requests_on_a_bucket(
    gcs_server, random_teacher: Path, many_shards: Path
):
    out = gcs_server.make_bucket("scale") + "/labels"
    args = ["label", "--teacher", str(random_teacher), "--input", str(many_shards)]
    before = gcs_server.requests()
    first = run_cli(*args, "--output", out, "--decode-processes", "0")
    assert first.returncode == 0, first.stderr[-3000:]
    first_requests = gcs_server.requests() - before
    assert first_requests <= 10 * SHARDS, first_requests
    before = gcs_server.requests()
    again = run_cli(*args, "--output", out, "--decode-processes", "0")
    assert again.returncode == 0 and "Nothing to do" in again.stdout, again.stderr[-3000:]
    rerun = gcs_server.requests() - before
    assert rerun <= 50 + SHARDS / 100, rerun


def test_filter_writes_objects_in_proportion_to_shards_not_to_copies(
    gcs_server, random_teacher: Path, many_shards: Path, tmp_path: Path
):
    bucket = gcs_server.make_bucket("filter-objects")
    labels = tmp_path / "labels"
    label_run(
        LabelArgs(teacher=str(random_teacher), input=str(many_shards), output=str(labels)), []
    )
    before = len(gcs_server.calls())
    manifest = filter_run(
        FilterArgs(
            input=str(labels), output=f"{bucket}/train", threshold=0, per_class=6000, shard_size=50
        ),
        [],
    )
    calls = gcs_server.calls()[before:]
    writes = [c for c in calls if c[0] in ("POST", "PUT") and "/upload/" in c[1]]
    deletes = [c for c in calls if c[0] == "DELETE"]
    outputs = [u for u in walk_files(f"{bucket}/train") if u.endswith(".tar")]
    assert len(outputs) == manifest["output_shards"] >= 10
    assert manifest["samples_written"] >= 10 * (SHARDS + len(outputs)), "copies far outnumber"
    assert len(writes) + len(deletes) <= 3 * (SHARDS + len(outputs)), len(writes)


def test_stats_from_the_manifest_equals_a_full_scan(
    random_teacher: Path, many_shards: Path, tmp_path: Path
):
    labels, train = tmp_path / "labels", tmp_path / "train"
    label_run(
        LabelArgs(teacher=str(random_teacher), input=str(many_shards), output=str(labels)), []
    )
    filter_run(
        FilterArgs(input=str(labels), output=str(train), threshold=0, per_class=60, shard_size=40),
        [],
    )
    for folder in (labels, train):
        recorded, _ = collect(str(folder))
        scanned, _ = collect(str(folder), ["--direct_num_workers=2"], scan=True)
        assert recorded["source"] == "manifest" and scanned["source"] == "scan of all shards"
        for key in SPEC_KEYS:
            assert recorded[key] == scanned[key], (folder.name, key)
    quick = run_cli("stats", str(labels), "--sample", "0.1")
    assert quick.returncode == 0 and "scan of a 0.1 sample: 20 of 200 shards" in quick.stdout


@pytest.mark.parametrize("count, most", [(0, 4), (3, 4), (4, 4), (10, 4), (80_000, 4096)])
def test_a_job_carries_a_bounded_number_of_even_spans_of_its_work_list(
    count: int, most: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setattr(worklist, "SPANS", most)
    items = [[f"part-{i:06d}.tar", i] for i in range(count)]
    with WorkList(str(tmp_path), "job", items) as work:
        assert len(work.spans) == min(count, most)
        lengths = [stop - start for start, stop in work.spans]
        assert max(lengths, default=0) - min(lengths, default=0) <= 1
        assert [u for span in work.spans for u in units(work.url, span)] == items
    assert not Path(work.url).exists()
    assert WorkList(str(tmp_path), "job", items[:-1]).url != work.url or count == 0

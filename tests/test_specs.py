from pathlib import Path

import fsspec
import pytest

from bench.fixtures import write_shard
from rs_pseudolabel.data.specs import ShardSpecError, expand_shards
from rs_pseudolabel.data.storage import AtomicFile, _with_protocol, filesystem, list_dir, write_json
from rs_pseudolabel.pipeline.reports import REPORTS, ReportProgress, report_url, reported


@pytest.fixture()
def shard_dir(tmp_path: Path) -> Path:
    for i in range(4):
        write_shard(str(tmp_path / f"part-{i:06d}.tar"), [{"__key__": f"k{i}", "txt": b"x"}])
    (tmp_path / "notes.txt").write_text("not a shard")
    return tmp_path


def test_directory_lists_its_shards_in_order(shard_dir: Path):
    urls = expand_shards(str(shard_dir))
    assert [Path(u).name for u in urls] == [f"part-{i:06d}.tar" for i in range(4)]


def test_glob_and_brace_notation_select_the_same_shards(shard_dir: Path):
    by_glob = expand_shards(str(shard_dir / "part-00000[12].tar"))
    by_brace = expand_shards(str(shard_dir / "part-{000001..000002}.tar"))
    assert [Path(u).name for u in by_glob] == [Path(u).name for u in by_brace]
    assert len(by_brace) == 2


def test_braces_over_folders_and_globs_expand_each_in_the_order_written(tmp_path: Path):
    """'{A,B}/*.tar' and '{A,B}' name the shards of both folders (they were taken for two
    shard names, "shard not found"); shard names among them keep their place."""
    for folder in ("a", "b"):
        for i in range(2):
            write_shard(str(tmp_path / folder / f"p-{i}.tar"), [{"__key__": "k", "txt": b"x"}])
    names = ["a/p-0.tar", "a/p-1.tar", "b/p-0.tar", "b/p-1.tar"]

    def found(spec: str) -> list[str]:
        return [str(Path(u).relative_to(tmp_path)) for u in expand_shards(str(tmp_path / spec))]

    assert found("{a,b}/*.tar") == found("{a,b}") == names
    assert found("{b/p-1.tar,a,b/p-0.tar}") == ["b/p-1.tar", "a/p-0.tar", "a/p-1.tar", "b/p-0.tar"]
    with pytest.raises(ShardSpecError, match="neither a folder nor a shard"):
        expand_shards(str(tmp_path / "{a,c}"))
    with pytest.raises(ShardSpecError, match="shard listed twice"):
        expand_shards(str(tmp_path / "{a,a/p-0.tar}"))


def test_missing_shards_give_a_clear_error(shard_dir: Path):
    with pytest.raises(ShardSpecError, match="not found"):
        expand_shards(str(shard_dir / "part-{000003..000005}.tar"))
    with pytest.raises(ShardSpecError, match="no shards match"):
        expand_shards(str(shard_dir / "other-*.tar"))
    with pytest.raises(ShardSpecError, match="no .tar shards"):
        expand_shards(str(shard_dir / "empty") if (shard_dir / "empty").mkdir() is None else "")


def test_fsspec_urls_are_expanded_with_their_protocol():
    fs = fsspec.filesystem("memory")
    for i in range(3):
        with fs.open(f"/bucket/shards/s-{i}.tar", "wb") as f:
            f.write(b"\0" * 1024)
    urls = expand_shards("memory://bucket/shards/s-{0..2}.tar")
    assert urls == [f"memory://bucket/shards/s-{i}.tar" for i in range(3)]
    assert expand_shards("memory://bucket/shards/*.tar") == [
        f"memory:///bucket/shards/s-{i}.tar" for i in range(3)
    ]


def test_a_local_listing_holds_what_fsspec_lists(shard_dir: Path):
    """The local listing scans the folder itself (lean at 10^5 files); it must name the same
    files with the same sizes as fsspec's: subfolders and symlinks left out, protocol kept."""
    (shard_dir / "sub").mkdir()
    (shard_dir / "link.tar").symlink_to(shard_dir / "part-000000.tar")
    for url in (str(shard_dir), f"{shard_dir}/", f"file://{shard_dir}"):
        fs, path = filesystem(url)
        infos = [i for i in fs.ls(path, detail=True) if i["type"] == "file"]
        expected = sorted((_with_protocol(url, i["name"]), i["size"]) for i in infos)
        assert [(e.url, e.size) for e in list_dir(url)] == expected
        assert len(expected) == 5
    assert list_dir(str(shard_dir / "missing")) == []
    assert list_dir(str(shard_dir / "notes.txt")) == []


def test_a_file_still_being_written_is_not_listed_and_the_progress_poll_reads_past_it(
    tmp_path: Path,
):
    """A worker's report appears under its name only when written whole; meanwhile its
    temporary file sits beside the others. A listing that named it made the progress bar
    count it done and read half a JSON file (its poll thread died on it in a CI run)."""
    out = str(tmp_path)
    write_json(report_url(out, "part-000000.tar"), {"samples_out": 5, "seconds": 1.0})
    writing = AtomicFile(report_url(out, "part-000001.tar"))
    writing.write(b'{"samples_out": ')
    assert [p.name for p in (tmp_path / REPORTS).iterdir() if ".tmp-" in p.name]
    assert [e.name for e in list_dir(f"{out}/{REPORTS}")] == ["part-000000.tar.json"]
    assert reported(out) == {"part-000000.tar"}
    progress = ReportProgress(out, 2, "label", done_before=0, rates=True)
    progress._update()
    assert progress.bar.n == 1
    progress.bar.close()
    writing.commit()
    assert reported(out) == {"part-000000.tar", "part-000001.tar"}

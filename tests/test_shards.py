"""Shard writing and reading: round trips, truncation, atomicity under a kill."""

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

from bench.fixtures import write_shard
from rs_pseudolabel.data.read import iter_samples
from rs_pseudolabel.data.specs import expand_shards
from rs_pseudolabel.data.write import AtomicShard, ShardSequence


def _samples(n: int, size: int = 3000) -> list[dict]:
    return [
        {"__key__": f"s{i:04d}", "bin": bytes([i % 256]) * size, "cls": b"%d" % i} for i in range(n)
    ]


def _read(urls: list[str]) -> tuple[list[dict], list]:
    drops: list = []
    return list(iter_samples(urls, drops.append)), drops


def test_written_samples_read_back_in_order(tmp_path: Path):
    url = str(tmp_path / "a.tar")
    assert write_shard(url, _samples(5)) == 5
    samples, drops = _read([url])
    assert [s["__key__"] for s in samples] == [f"s{i:04d}" for i in range(5)]
    assert samples[3]["bin"] == bytes([3]) * 3000 and samples[3]["cls"] == b"3"
    assert all(s["__url__"] == url for s in samples) and drops == []


def test_rewriting_gives_identical_bytes(tmp_path: Path):
    write_shard(str(tmp_path / "a.tar"), _samples(5))
    write_shard(str(tmp_path / "b.tar"), _samples(5))
    assert (tmp_path / "a.tar").read_bytes() == (tmp_path / "b.tar").read_bytes()


def test_truncated_tar_keeps_samples_before_the_cut_and_reports_it(tmp_path: Path):
    whole = tmp_path / "whole.tar"
    write_shard(str(whole), _samples(10))
    data = whole.read_bytes()
    after = tmp_path / "after.tar"
    write_shard(str(after), _samples(2))
    for cut in (len(data) // 2 + 100, 6 * 2 * (512 + 3072 // 512 * 512)):  # mid-member, boundary
        cut_path = tmp_path / "cut.tar"
        cut_path.write_bytes(data[:cut])
        samples, drops = _read([str(cut_path), str(after)])
        from_cut = [s for s in samples if s["__url__"] == str(cut_path) and "bin" in s]
        assert 3 <= len(from_cut) < 10
        assert all(s["bin"] == bytes([int(s["__key__"][1:])]) * 3000 for s in from_cut)
        assert [d.reason for d in drops] == ["truncated_shard"]
        assert drops[0].shard == str(cut_path)
        assert len([s for s in samples if s["__url__"] == str(after)]) == 2


def test_unreadable_shard_is_reported_and_reading_goes_on(tmp_path: Path):
    good = str(tmp_path / "good.tar")
    write_shard(good, _samples(2))
    junk = tmp_path / "junk.tar"
    junk.write_bytes(b"this is not a tar file at all" * 40)
    samples, drops = _read([str(junk), good])
    assert len(samples) == 2
    assert [(d.shard, d.reason) for d in drops] == [(str(junk), "not_a_tar")]


def test_failed_write_leaves_no_visible_shard(tmp_path: Path):
    url = tmp_path / "a.tar"
    try:
        with AtomicShard(str(url)) as shard:
            shard.write(_samples(1)[0])
            raise RuntimeError("disk fell off")
    except RuntimeError:
        pass
    assert list(tmp_path.iterdir()) == []


def test_killed_writer_leaves_only_whole_shards(tmp_path: Path):
    script = textwrap.dedent(f"""
        import time
        from rs_pseudolabel.data.write import ShardSequence
        with ShardSequence({str(tmp_path)!r}, "part", 20) as seq:
            for i in range(10**6):
                seq.write({{"__key__": "k%07d" % i, "bin": b"x" * 4000}})
                if i == 45:
                    print("ready", flush=True)
                    time.sleep(60)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, cwd=os.getcwd())
    assert proc.stdout.readline().strip() == b"ready"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    visible = expand_shards(str(tmp_path))
    assert [Path(u).name for u in visible] == ["part-000000.tar", "part-000001.tar"]
    samples, drops = _read(visible)
    assert len(samples) == 40 and drops == []


def test_shard_sequence_passes_over_finished_shards_on_rerun(tmp_path: Path):
    with ShardSequence(str(tmp_path), "p", 4) as seq:
        for s in _samples(10):
            seq.write(s)
    first = (tmp_path / "p-000001.tar").stat().st_mtime_ns
    (tmp_path / "p-000002.tar").unlink()
    with ShardSequence(str(tmp_path), "p", 4) as seq:
        for s in _samples(10):
            seq.write(s)
    assert seq.skipped == 2
    assert (tmp_path / "p-000001.tar").stat().st_mtime_ns == first
    samples, _ = _read(expand_shards(str(tmp_path)))
    assert [s["__key__"] for s in samples] == [f"s{i:04d}" for i in range(10)]


def test_member_names_that_climb_out_are_dropped_not_passed_on(tmp_path: Path):
    import io
    import tarfile

    shard = tmp_path / "evil.tar"
    with tarfile.open(shard, "w") as tar:
        for name in ("../../escape.png", "/etc/absolute.png", "ok.png", "nested/fine.png"):
            info = tarfile.TarInfo(name)
            info.size = 3
            tar.addfile(info, io.BytesIO(b"png"))
    samples, drops = _read([str(shard)])
    assert [s["__key__"] for s in samples] == ["ok", "nested/fine"]
    assert sorted((d.key, d.reason) for d in drops) == [
        ("../../escape", "unsafe_member_name"),
        ("/etc/absolute", "unsafe_member_name"),
    ]


def _with_header_field(shard: Path, member: int, offset: int, value: bytes) -> None:
    """Overwrite a field of the `member`-th tar header and make its checksum right again:
    damage the checksum does not catch."""
    data = bytearray(shard.read_bytes())
    pos = 0
    for _ in range(member):  # walk the headers: 512 bytes, then the data in 512-byte blocks
        size = int(data[pos + 124 : pos + 136].split(b"\0")[0].strip() or b"0", 8)
        pos += 512 + -(-size // 512) * 512
    data[pos + offset : pos + offset + len(value)] = value
    data[pos + 148 : pos + 156] = b" " * 8
    data[pos + 148 : pos + 156] = b"%06o\0 " % sum(data[pos : pos + 512])
    shard.write_bytes(bytes(data))


def test_a_header_field_that_is_no_number_is_an_unreadable_shard_not_a_crash(tmp_path: Path):
    url = tmp_path / "a.tar"
    write_shard(str(url), _samples(4, size=100))
    _with_header_field(url, 4, 124, b"zzzzzzzzzzz\0")  # the third sample's .bin
    samples, drops = _read([str(url)])
    assert [s["__key__"] for s in samples] == ["s0000", "s0001"]
    assert [(d.key, d.reason) for d in drops] == [(None, "unreadable_shard")]
    assert "size field" in drops[0].detail

"""The trainer where its users train: shards, validation, checkpoints and export in a bucket
(fake-gcs-server, moto) with the default recipe's batch and loader workers, for several
epochs, under torchrun too; and a bucket that stops answering mid-run, which must end the
run with one line and leave no loader worker behind."""

from __future__ import annotations

import fnmatch
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from rs_pseudolabel.data.storage import read_bytes, read_json, walk_files
from tests.conftest import message_lines, run_cli
from tests.servers import SilentRelay

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN = Path(sys.executable).with_name("torchrun")
EPOCH_LINE = re.compile(r"^epoch (\d+), ")


@pytest.fixture(scope="module")
def buckets(request: pytest.FixtureRequest) -> dict[str, str]:
    """The digits (200 labeled images in shards of 50) in a bucket of each store."""
    found = {}
    for store in ("gcs_server", "s3_server"):
        bucket = request.getfixturevalue(store).make_bucket("train-digits")
        result = run_cli("data", "digits", "--out", f"{bucket}/d", "--shard-size", "50")
        assert result.returncode == 0, result.stderr
        found[store] = bucket
    return found


def _train(bucket: str, out: str, *extra: str) -> list[str]:
    return [
        "-m", "rs_pseudolabel.pipeline", "train-student", "--model", "rs-mini", "--labeled",
        f"{bucket}/d/labeled", "--val", f"{bucket}/d/val", "--out", out, *extra,
    ]  # fmt: skip


def _log(run: str) -> list[dict]:
    return [json.loads(line) for line in read_bytes(f"{run}/log.jsonl").splitlines()]


def _family(pid: int) -> list[int]:
    """A process and every process below it, from /proc."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        found.append(todo.pop())
        todo += children.get(found[-1], [])
    return found


def _connections(pids: list[int], port: int) -> int:
    """Open TCP connections of these processes to 127.0.0.1:port."""
    inodes = set()
    for pid in pids:
        try:
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                target = os.readlink(fd)
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
        except OSError:
            continue
    count = 0
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        remote_port = int(fields[2].split(":")[1], 16)
        if remote_port == port and fields[3] == "01" and fields[9] in inodes:  # ESTABLISHED
            count += 1
    return count


def _alive(pids: list[int]) -> list[int]:
    alive = []
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z":
            alive.append(pid)
    return alive


@pytest.mark.parametrize("store", ["gcs_server", "s3_server"])
def test_four_epochs_of_the_default_batch_with_loader_workers_in_a_bucket(
    store: str, buckets: dict[str, str], request: pytest.FixtureRequest
):
    """The default recipe (a batch of 4,096 from 200 images, 4 loader workers) reads the
    shards over and over; its connections to the store do not grow with the epochs. They
    are counted every 20 ms through the run and each epoch is summed up by its median (one
    count at each epoch's line saw whichever requests were in flight, and failed at random).
    On fake-gcs-server the pools fill over the first epochs and stop: medians measured
    5-7, 8-9, 9-12, then 12 for four more epochs (+3 at most from the third to the fourth);
    a leak of one connection per loader worker and epoch adds 4 each epoch. moto closes
    every connection (medians 0)."""
    server, bucket = request.getfixturevalue(store), buckets[store]
    port = int(server.url.rsplit(":", 1)[1])
    out = f"{bucket}/default-run"
    proc = subprocess.Popen(
        [sys.executable, *_train(bucket, out, "--epochs", "4")],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    epochs: list[list[int]] = [[]]
    done = threading.Event()

    def count() -> None:
        while not done.wait(0.02):
            epochs[-1].append(_connections(_family(proc.pid), port))

    counter = threading.Thread(target=count, daemon=True)
    counter.start()
    for line in proc.stdout:
        if EPOCH_LINE.match(line):
            epochs.append([])
    done.set()
    counter.join()
    stderr = proc.stderr.read()
    assert proc.wait(timeout=600) == 0, stderr[-3000:]
    assert len(epochs) == 5 and all(epochs[2:4]), [len(c) for c in epochs]
    third, fourth = (statistics.median(counts) for counts in epochs[2:4])
    assert fourth <= third + 3, (third, fourth)
    log = _log(out)
    assert [r["epoch"] for r in log] == [1, 2, 3, 4]
    assert all(r["val_samples"] == 297 for r in log), log
    assert read_json(f"{out}/manifest.json")["state"] == "done"
    assert {u.rsplit("/", 1)[-1] for u in walk_files(out)} >= {
        "config.yaml", "log.jsonl", "checkpoint.pt", "model.safetensors", "model.json",
    }  # fmt: skip


def test_torchrun_two_ranks_train_three_epochs_in_a_bucket(buckets: dict[str, str]):
    bucket = buckets["gcs_server"]
    out = f"{bucket}/torchrun-run"
    result = subprocess.run(
        [str(TORCHRUN), "--standalone", "--nproc_per_node", "2"]
        + _train(bucket, out, "--epochs", "3", "--set", "workers=2"),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    log = _log(out)
    assert [r["epoch"] for r in log] == [1, 2, 3]
    assert all(r["val_samples"] == 297 for r in log), log  # both ranks' halves, summed
    assert read_json(f"{out}/manifest.json")["state"] == "done"


def _through_relay(bucket: str, relay: SilentRelay, tmp_path: Path, **env: str):
    """A trainer reading the bucket through `relay`, its run on the local disk, and a thread
    collecting its output lines."""
    proc = subprocess.Popen(
        [sys.executable, *_train(bucket, str(tmp_path / "run"), "--epochs", "50")]
        + ["--batch-size", "64", "--set", "workers=2", "--set", "epoch_samples=128"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "STORAGE_EMULATOR_HOST": relay.url, **env},
        start_new_session=True,
    )
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True).start()
    deadline = time.monotonic() + 240
    while not any(EPOCH_LINE.match(line) for line in lines):  # training, its loaders running
        assert proc.poll() is None and time.monotonic() < deadline, "".join(lines)[-3000:]
        time.sleep(0.2)
    return proc, lines


def test_a_bucket_that_stops_answering_ends_the_run_with_one_line(
    gcs_server, buckets: dict[str, str], tmp_path: Path
):
    """Every request has a time-out (here 1 s) and the client's retries: a silent server is
    an error of the run after them, named in one line, not a wait for ever nor a shard
    counted as truncated; the loader workers end with it."""
    relay = SilentRelay(gcs_server.url)
    try:
        proc, lines = _through_relay(
            buckets["gcs_server"], relay, tmp_path, PIPELINE_STORAGE_TIMEOUT="1"
        )
        silenced = time.monotonic()
        relay.silence()
        time.sleep(0.5)
        workers = _family(proc.pid)[1:]
        assert workers
        code = proc.wait(timeout=300)
        waited = time.monotonic() - silenced
    finally:
        relay.close()
    output = "".join(lines)
    assert code == 2, output[-3000:]
    errors = [line for line in output.splitlines() if "error:" in line]
    assert len(errors) == 1 and "Traceback" not in output, output[-3000:]
    assert re.match(r"pipeline train-student: error: reading gs://\S+\.tar: ", errors[0])
    assert waited < 120, waited
    time.sleep(1)
    assert not _alive(workers)


def test_killing_the_trainer_ends_its_loader_workers(
    gcs_server, buckets: dict[str, str], tmp_path: Path
):
    """Its workers blocked in reads of a silent server (with the default time-out of a
    minute), the trainer is killed: they end with it, not when their reads time out."""
    relay = SilentRelay(gcs_server.url)
    try:
        proc, _ = _through_relay(buckets["gcs_server"], relay, tmp_path)
        relay.silence()
        time.sleep(2)
        workers = _family(proc.pid)[1:]
        assert workers
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        deadline = time.monotonic() + 30
        while _alive(workers) and time.monotonic() < deadline:
            time.sleep(0.5)
        left = _alive(workers)
        for pid in left:
            os.kill(pid, signal.SIGKILL)
    finally:
        relay.close()
    assert not left


@pytest.mark.parametrize("output", ["local", "bucket"])
def test_a_bucket_that_stops_answering_mid_label_is_one_line(
    gcs_server, buckets: dict[str, str], random_teacher: Path, tmp_path: Path, output: str
):
    """Label reading 26 shards through a relay that goes silent after the first is labeled:
    each worker's read fails after the client's retries, its later shards fail at once
    with that error, and the launcher says so in one line (it printed 1,253 lines with 36
    tracebacks). What was labeled stays, and a rerun once the server is back finishes.
    With the output in the same bucket, no failure can be recorded either: the line names
    the output folder (it was 982 lines, 24 tracebacks, and a line naming nothing)."""
    relay = SilentRelay(gcs_server.url)
    if output == "local":
        out = str(tmp_path / "labels")
    else:
        out = f"{buckets['gcs_server']}/labels-{tmp_path.name}"

    def files(pattern: str) -> list[str]:  # asked of the server itself, not of the relay
        return [u for u in walk_files(out) if fnmatch.fnmatch(u, f"*/{pattern}")]

    command = [sys.executable, "-m", "rs_pseudolabel.pipeline", "label", "--teacher", str(random_teacher),
               "--input", f"{buckets['gcs_server']}/d/unlabeled", "--output", out,
               "--batch-size", "8"]  # fmt: skip
    proc = None
    try:
        proc = subprocess.Popen(
            command,
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "STORAGE_EMULATOR_HOST": relay.url, "PIPELINE_STORAGE_TIMEOUT": "1"},
        )
        deadline = time.monotonic() + 120
        # A shard's report is written just before its sidecar: wait for both, or the
        # silence could fall between them and leave no sidecar to count.
        while not (files("_reports/*.json") and files("*.tar")):
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
            time.sleep(0.05)
        relay.silence()
        silenced = time.monotonic()
        _, stderr = proc.communicate(timeout=300)
        waited = time.monotonic() - silenced
    finally:
        relay.close()
        if proc is not None and proc.poll() is None:  # a failed test leaves no labeler
            proc.kill()
    assert proc.returncode == 2, stderr[-3000:]
    lines = message_lines(stderr)
    assert len(lines) == 1 and "Traceback" not in stderr, stderr[-3000:]
    if output == "local":
        assert re.match(
            r"pipeline label: error: \d+ units failed .*: reading gs://\S+\.tar: ", lines[0]
        )
    else:
        assert lines[0].startswith(
            f"pipeline label: error: the storage of {out} stopped answering during the job ("
        ), lines[0]
    assert waited < 120, waited
    assert 1 <= len(files("*.tar")) < 26
    rerun = run_cli(*command[3:])
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert len(files("*.tar")) == 26
